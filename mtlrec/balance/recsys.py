"""Balancers from the recommendation literature: MetaBalance and AdaTask."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtlrec.balance.base import (
    Balancer,
    BalancerConfig,
    check_optimizer,
    config_error,
    register_balancer,
)
from mtlrec.balance.grads import (
    GradientBalancer,
    TaskGrads,
    accumulate,
    flatten,
    task_gradients,
    trainable,
)

log = logging.getLogger(__name__)


@dataclass
class MetaBalanceConfig(BalancerConfig):
    beta: float = 0.9
    relax_factor: float = 0.7

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 1:
            raise config_error("beta", f"must be in [0, 1), got {self.beta!r}")
        if not 0 <= self.relax_factor <= 1:
            raise config_error("relax_factor", f"must be in [0, 1], got {self.relax_factor!r}")


@register_balancer("metabalance")
class MetaBalance(GradientBalancer):
    """MetaBalance: scale each auxiliary task's gradient toward the target task's magnitude.

    He, Feng, Cheng, Ji, Guo, Caverlee, "MetaBalance: Improving Multi-Task Recommendations via
    Adapting Gradient Magnitudes of Auxiliary Tasks", WWW 2022, Alg. 1. The FIRST task in schema
    order is the target. Per shared parameter tensor and task, m_t = beta m_t + (1 - beta) |g_t|
    (beta = 0.9, m starts at 0, no bias correction, as the authors' code); each auxiliary
    gradient becomes g_aux (r m_tar / (m_aux + 1e-5) + 1 - r) with relax factor r = 0.7, which
    both shrinks larger and enlarges smaller auxiliary gradients (the authors' code); the shared
    update is g_tar + sum g_aux. With r = 1 an auxiliary gradient's norm becomes
    m_tar |g_aux| / m_aux: the target's norm scaled by how the auxiliary norm deviates from its
    own average (exactly the target's current norm on the first step).
    Task-specific layers get the plain sum (their own task's gradient).
    Details not in the paper: a moving average is updated only on steps where the task reaches
    the tensor (the authors' code skips a None gradient) and is present (a task absent from the
    step, loss exactly 0 with a zero gradient, e.g. CVR in a batch without clicks, reaches every
    tensor with zeros: its averages would decay and then enlarge its gradient ~0.9^-k after k
    such steps), and where the target never reaches a tensor (e.g. an auxiliary task's own gate
    in MMoE) there is nothing to match and the auxiliary gradient is left unscaled. While the
    target is absent, the auxiliary gradients are scaled to its moving average as it stands.
    """

    Config = MetaBalanceConfig

    def __init__(self, model, config: MetaBalanceConfig) -> None:
        super().__init__(model, config)
        self.norms: torch.Tensor | None = None  # [T, P] moving averages of gradient norms

    def combine(self, grads: TaskGrads, losses: torch.Tensor):
        g = grads.matrix
        current = torch.stack([part.norm(dim=1) for part in g.split(grads.sizes, dim=1)], 1)
        if self.norms is None or self.norms.shape != current.shape:
            self.norms = torch.zeros_like(current)
        beta = self.config.beta
        used = grads.used.to(current.device) & grads.present_on(current.device)[:, None]
        self.norms = torch.where(used, beta * self.norms + (1 - beta) * current, self.norms)
        target = self.norms[:1]
        ratio = torch.where(target > 0, target / (self.norms + 1e-5), torch.ones_like(self.norms))
        ratio[0] = 1.0
        r = self.config.relax_factor
        scale = r * ratio + (1 - r)  # [T, P]
        return (grads.per_tensor(scale) * g).sum(0), None

    def state_dict(self) -> dict[str, Any]:
        return {"norms": None if self.norms is None else self.norms.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norms = None if state["norms"] is None else state["norms"].clone()


# --- AdaTask ----------------------------------------------------------------------------------


class AdaTaskAdam(torch.optim.Optimizer):
    """Adam that keeps, for the shared parameters, one pair of moments per task.

    Param groups flagged ``per_task`` hold shared parameters: their step is
    sum_t lr m_hat_t / (sqrt(v_hat_t) + eps) over per-task moments of the per-task gradients
    handed over by :meth:`set_task_grads` ([T, *shape] per parameter), over the tasks present in
    the step (an absent task's moments stay as they were and it adds no step). Weight decay on
    these parameters is applied once per parameter and step, decoupled: p <- p (1 - lr wd). (An
    L2 term in every task's stream would be normalised by each stream separately: in a stream
    whose task gradient is zero, e.g. a task that never reaches the tensor, Adam turns even a
    tiny decay into a full step ~lr sign(p), once per stream.) The authors' optimizer has no
    weight decay. Other groups are plain Adam on ``.grad`` (L2 weight decay added to the
    gradient, as ``torch.optim.Adam``). A shared parameter with a ``.grad`` but no task gradients
    (not handed over) splits ``.grad`` evenly over the T streams.
    """

    def __init__(
        self,
        groups: list[dict[str, Any]],
        num_tasks: int,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(groups, defaults)
        self.num_tasks = num_tasks
        self._task_grads: dict[torch.Tensor, torch.Tensor] = {}
        self._present: torch.Tensor | None = None

    def set_task_grads(
        self,
        params: list[nn.Parameter],
        grads: list[torch.Tensor],
        present: torch.Tensor | None = None,
    ) -> None:
        """The next step's per-task gradients ([T, *shape] per parameter) and which tasks are
        present ([T] bool; None: all)."""
        self._task_grads = dict(zip(params, grads))
        self._present = None if present is None or bool(present.all()) else present.cpu()

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            per_task = group.get("per_task", False)
            for p in group["params"]:
                grad = self._task_grads.get(p) if per_task else None
                present = self._present if grad is not None else None
                if grad is None:
                    if p.grad is None:
                        continue
                    grad = p.grad.unsqueeze(0)
                    if per_task:
                        grad = grad.expand(self.num_tasks, *p.shape) / self.num_tasks
                if group["weight_decay"]:
                    if per_task:  # once per parameter, outside the task streams
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    else:
                        grad = grad + group["weight_decay"] * p
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                correction1 = 1 - beta1 ** state["step"]
                correction2 = 1 - beta2 ** state["step"]
                if present is None:
                    m.mul_(beta1).add_(grad, alpha=1 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = (v.sqrt() / math.sqrt(correction2)).add_(group["eps"])
                    p.sub_((m / denom).sum(0), alpha=group["lr"] / correction1)
                else:  # absent tasks: their moments stay, their streams add nothing
                    keep = present.to(p.device).view(-1, *([1] * p.dim()))
                    m.copy_(torch.where(keep, m * beta1 + (1 - beta1) * grad, m))
                    v.copy_(torch.where(keep, v * beta2 + (1 - beta2) * grad * grad, v))
                    denom = (v.sqrt() / math.sqrt(correction2)).add_(group["eps"])
                    steps = torch.where(keep, m / denom, torch.zeros_like(m))
                    p.sub_(steps.sum(0), alpha=group["lr"] / correction1)
        self._task_grads = {}
        self._present = None
        return loss


@dataclass
class AdaTaskConfig(BalancerConfig):
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise config_error(key, f"must be in [0, 1), got {getattr(self, key)!r}")
        if not self.eps > 0:
            raise config_error("eps", f"must be > 0, got {self.eps!r}")


@register_balancer("adatask")
class AdaTask(Balancer):
    """AdaTask: a separate adaptive learning rate per task on the shared parameters.

    Yang, Pan, Wang, Yu, Shen, Chen, Xiao, Jiang, Guo, "AdaTask: A Task-Aware Adaptive Learning
    Rate Approach to Multi-Task Learning", AAAI 2023 (its Adam variant): each task t keeps its
    own Adam moments m_t, v_t of its gradient on every shared parameter, and the shared update is
    sum_t lr m_hat_t / (sqrt(v_hat_t) + eps); task-specific parameters use plain Adam on their
    own gradient. Adam's defaults (betas 0.9, 0.999, eps 1e-8) as in the paper.
    Design: the method changes the optimizer itself, so the balancer supplies it through
    :meth:`make_optimizer` (:class:`AdaTaskAdam`, built by the trainer in place of its
    optimizer, with ``train.lr`` and ``train.weight_decay``); ``train.optimizer`` other than adam
    is an error where the caller passes it (:func:`~mtlrec.balance.base.check_optimizer`), a
    logged warning where it does not. ``backward`` leaves the plain sum of task gradients in
    ``.grad`` (the combined gradient) and hands the per-task gradients to that optimizer. Used
    with another optimizer it degrades to equal weighting (with a warning). A model's auxiliary
    loss (weight 1) is split evenly over the task streams of the present tasks. Weight decay on
    the shared parameters is applied once per parameter, decoupled (see :class:`AdaTaskAdam`;
    the authors' optimizer has none). A task absent from a step keeps its moments and adds no
    step of its own.
    """

    per_task_backward = True
    own_optimizer = "adam"

    Config = AdaTaskConfig

    def __init__(self, model, config: AdaTaskConfig) -> None:
        super().__init__(model, config)
        self._optimizer: AdaTaskAdam | None = None
        self._warned = False

    def make_optimizer(
        self,
        params: list[nn.Parameter],
        lr: float,
        weight_decay: float,
        optimizer: str | None = None,
    ) -> torch.optim.Optimizer:
        if optimizer is None:
            log.warning(
                "adatask: trains with its own per-task Adam (AdaTaskAdam); train.optimizer is "
                "not used"
            )
        else:
            check_optimizer(optimizer, self)
        shared_ids = {id(p) for p in self.model.shared_parameters()}
        shared = [p for p in params if id(p) in shared_ids]
        rest = [p for p in params if id(p) not in shared_ids]
        groups = [{"params": shared, "per_task": True}, {"params": rest, "per_task": False}]
        groups = [g for g in groups if g["params"]]
        cfg = self.config
        self._optimizer = AdaTaskAdam(
            groups,
            self.num_tasks,
            lr=lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=weight_decay,
        )
        return self._optimizer

    def backward(self, losses: torch.Tensor, aux_loss: torch.Tensor | None = None) -> torch.Tensor:
        grads = task_gradients(self.model, losses)
        grads.write_shared(grads.matrix.sum(0))
        grads.write_own()
        present = grads.presence(losses)
        has_aux = aux_loss is not None and aux_loss.requires_grad
        if has_aux and not bool(present.any()):  # every task absent: aux in every stream
            present = torch.ones_like(present)
        per_task = grads.matrix
        total = losses.detach().sum()
        if has_aux:
            params = trainable(self.model.parameters())
            aux = torch.autograd.grad(aux_loss, params, allow_unused=True)
            for p, g in zip(params, aux):
                if g is not None:
                    accumulate(p, g)
            if grads.num_shared:
                by_id = {id(p): g for p, g in zip(params, aux)}
                flat = flatten([by_id[id(p)] for p in grads.shared], grads.shared)
                flat = flat.to(per_task)
                if bool(present.all()):
                    per_task = per_task + flat / self.num_tasks
                else:  # only the present tasks' streams
                    mask = present.to(per_task)[:, None]
                    per_task = per_task + mask * flat / int(present.sum())
        if aux_loss is not None:
            total = total + aux_loss.detach()
        if self._optimizer is None:
            if not self._warned:
                log.warning("adatask: the optimizer was not built by make_optimizer; plain sum")
                self._warned = True
            return total
        # Shared parameters that got any gradient (from a task or the aux loss) this step.
        chunks = per_task.split(grads.sizes, dim=1)
        pairs = [(p, c.reshape(self.num_tasks, *p.shape)) for p, c in zip(grads.shared, chunks)]
        pairs = [(p, c) for p, c in pairs if p.grad is not None]
        self._optimizer.set_task_grads([p for p, _ in pairs], [c for _, c in pairs], present)
        return total
