"""The balancer interface and its registry.

A balancer receives the per-task losses of one step (a [T] tensor, still attached to the graph)
and the model, and leaves the combined gradient in each parameter's ``.grad``; the trainer then
steps the optimizer. Loss weighting and gradient surgery are the same kind of object, so every
model works with every balancer.

Absent tasks. A task whose loss is exactly 0.0 in a step, with an all-zero gradient, is ABSENT for
that step. That is what a masked loss gives for a task with no observed row in the batch
(``MTLModel.task_losses`` divides a zero sum by ``clamp_min(1)``): a dependent task such as CVR in
a small batch without clicks. Every balancer follows one rule for it:

* it gets no update of its own: nothing of it enters ``.grad`` (its weight, or its share of the
  update, is 0 that step; its own layers keep the zero gradient its loss gives them, on which the
  trainer's Adam still coasts on momentum, as for any zero gradient);
* it does not enter the aggregation: the method combines the present tasks as if the batch had
  only them (MGDA's min-norm point, IMTL-G, CAGrad, Nash-MTL, Aligned-MTL over the present
  gradients; FAMO's normaliser c and RLW's softmax over the present tasks);
* it does not enter the method's state: moving averages (DB-MTL, MetaBalance), learned weights
  and their Adam moments (UW, GradNorm, FAMO), GradNorm's initial losses (taken on the first step
  where the task is present), DWA's loss windows (averaged over the steps where the task is
  present; a window without any keeps the previous weights) and AdaTask's per-task moments stay
  as they were.

Balancers that take per-task gradients check both conditions (:meth:`mtlrec.balance.grads.TaskGrads.presence`); the
ones that only see loss values check the loss alone (:func:`present_tasks`): the library's losses
are >= 0 and a loss of exactly 0 is at its minimum, where its gradient is 0. When every task is
absent the shared parameters get a zero gradient and no state changes (beyond step counters). A present task is never
treated as absent, so with every task present the rule changes nothing.
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
    # The optimizer the balancer brings through make_optimizer (AdaTask: "adam"), which replaces
    # train.optimizer; None where the trainer's own optimizer is used.
    own_optimizer: ClassVar[str | None] = None

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
        self,
        params: list[torch.nn.Parameter],
        lr: float,
        weight_decay: float,
        optimizer: str | None = None,
    ) -> torch.optim.Optimizer | None:
        """The optimizer for ``params``, for a method that changes the update rule itself
        (AdaTask); ``None`` (the default) lets the trainer build its usual optimizer.
        ``optimizer`` is ``train.optimizer`` where the caller passes it (see
        :func:`check_optimizer`)."""
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


def check_optimizer(optimizer: str, balancer: str | Balancer) -> None:
    """train.optimizer with a balancer that brings its own optimizer (AdaTask's per-task Adam):
    anything but that optimizer is refused instead of being replaced silently."""
    cls = balancer_class(balancer) if isinstance(balancer, str) else type(balancer)
    own = cls.own_optimizer
    if own is not None and optimizer != own:
        raise ConfigError(
            f"train.optimizer: {optimizer!r} cannot be used with balancer {cls.name!r}, which "
            f"trains with its own {own} (the method is an optimizer); set "
            f"train.optimizer={own} or choose another balancer"
        )


def present_tasks(losses: torch.Tensor) -> torch.Tensor:
    """[T] bool on the losses' device: False for a task ABSENT this step (loss exactly 0.0; see
    the module docstring), for the balancers that only see loss values. No host sync."""
    return losses.detach() != 0


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
