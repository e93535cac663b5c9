"""Turning per-task losses into one update: loss weighting and gradient methods, one interface."""

from mtlrec.balance.base import Balancer, build_balancer, describe_balancers

__all__ = ["Balancer", "build_balancer", "describe_balancers"]
