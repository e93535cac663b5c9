"""The balancer interface and its registry.

A balancer receives the per-task losses of one step (a [T] tensor, still attached to the graph)
and the model, and leaves the combined gradient in each parameter's ``.grad``; the trainer then
steps the optimizer. Loss weighting and gradient surgery are the same kind of object, so every
model works with every balancer.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from mtlrec.errors import ConfigError
from mtlrec.models.base import MTLModel
from mtlrec.text import summary

BALANCERS: dict[str, type[Balancer]] = {}
# The modules that define balancers, in the order ``mtlrec list balancers`` shows them.
FAMILIES = ("mtlrec.balance.weighting", "mtlrec.balance.surgery", "mtlrec.balance.recsys")


@dataclass
class BalancerConfig:
    """Options every balancer accepts (subclasses add their own)."""


class Balancer:
    """Base class. Subclasses implement :meth:`backward`."""

    Config: ClassVar[type[BalancerConfig]] = BalancerConfig
    name: ClassVar[str] = "base"
    # True when backward() differentiates each task's loss separately through the model's graph
    # (retain_graph); torch.compile's backward does not support that (see train.compile).
    per_task_backward: ClassVar[bool] = False

    def __init__(self, model: MTLModel, config: BalancerConfig) -> None:
        self.model = model
        self.config = config
        self.num_tasks = model.num_tasks

    def backward(self, losses: torch.Tensor, aux_loss: torch.Tensor | None = None) -> torch.Tensor:
        """Fill ``.grad`` from ``losses`` [T] (+ a model's auxiliary loss); return the scalar that
        was back-propagated, for logging."""
        raise NotImplementedError

    @property
    def weights(self) -> torch.Tensor | None:
        """Current task weights, where the method has them (for logs and diagnostics)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The balancer's own state (weights, running statistics) for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        pass

    def make_optimizer(
        self, params: list[torch.nn.Parameter], lr: float, weight_decay: float
    ) -> torch.optim.Optimizer | None:
        """The optimizer for ``params``, for a method that changes the update rule itself
        (AdaTask); ``None`` (the default) lets the trainer build its usual Adam."""
        return None


def register_balancer(name: str):
    """Class decorator: make a balancer buildable by ``name``."""

    def wrap(cls: type[Balancer]) -> type[Balancer]:
        if name in BALANCERS:
            raise ValueError(f"balancer {name!r} registered twice")
        cls.name = name
        BALANCERS[name] = cls
        return cls

    return wrap


def balancer_class(name: str) -> type[Balancer]:
    """The balancer class registered as ``name`` (a ConfigError listing the names otherwise)."""
    _load_all()
    if name not in BALANCERS:
        raise ConfigError(
            f"unknown balancer {name!r}; choose one of: {', '.join(sorted(BALANCERS))}"
        )
    return BALANCERS[name]


def check_compile(compile: bool, balancer: str | Balancer, diagnose: bool) -> None:
    """train.compile with a balancer (a name, or one built) or diagnostics that take one gradient
    per task: refused. Measured (torch 2.13, CPU): a second backward through a compiled graph
    with retain_graph=True returns wrong gradients. Checked before any data is read."""
    if not compile:
        return
    cls = balancer_class(balancer) if isinstance(balancer, str) else type(balancer)
    per_task = cls.per_task_backward
    if per_task or diagnose:
        what = f"balancer {cls.name!r}" if per_task else "train.diagnose"
        raise ConfigError(
            f"train.compile: {what} takes one gradient per task through the model's graph, "
            "which a compiled graph does not support; use a loss-weighting balancer (ew, "
            "fixed, uw, dwa, rlw, famo) or set train.compile=false"
        )


def build_balancer(name: str, model: MTLModel, options: dict[str, Any] | None = None) -> Balancer:
    """The balancer ``name`` for ``model``, with ``options`` (the ``balance:`` keys) checked; build
    it after moving the model to its device."""
    cls = balancer_class(name)
    options = dict(options or {})
    allowed = {f.name for f in fields(cls.Config)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key(s) balance.{', balance.'.join(unknown)} for balancer {name!r}"
            + (f"; allowed: {', '.join(sorted(allowed))}" if allowed else "; it takes no options")
        )
    return cls(model, cls.Config(**_coerce(cls.Config, options)))


def describe_balancers() -> dict[str, str]:
    """Name -> first docstring line, by family (loss weighting, gradient surgery,
    recommendation-specific) and, within one, in definition order."""
    _load_all()

    def family(item: tuple[str, type[Balancer]]) -> int:
        module = item[1].__module__
        return FAMILIES.index(module) if module in FAMILIES else len(FAMILIES)

    ordered = sorted(BALANCERS.items(), key=family)  # stable: keeps definition order
    return {n: summary(c.__doc__) for n, c in ordered}


def _coerce(kind: type[BalancerConfig], options: dict[str, Any]) -> dict[str, Any]:
    """YAML gives ``2`` where a float is meant; a string where a number is meant is an error."""
    from mtlrec.config import as_bool, as_float, as_int

    defaults = {f.name: f.default for f in fields(kind)}
    out = {}
    for key, value in options.items():
        default, name = defaults[key], f"balance.{key}"
        if isinstance(default, bool):
            value = as_bool(value, name)
        elif isinstance(default, int):
            value = as_int(value, name)  # 2.5 steps is an error, not 2
        elif isinstance(default, float):
            value = as_float(value, name)
        out[key] = value
    return out


def config_error(key: str, message: str) -> ConfigError:
    """A ConfigError naming the option ``balance.KEY``."""
    return ConfigError(f"balance.{key}: {message}")


def _load_all() -> None:
    # Importing a module runs its @register_balancer decorators.
    for module in FAMILIES:
        importlib.import_module(module)
