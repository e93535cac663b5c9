"""Loss weighting (the gradient of a weighted sum of task losses), and DB-MTL (a gradient method).

Fixed and equal weights; learned (UW) and adaptive (DWA, GradNorm, RLW, FAMO) weights give the
gradient of sum_t w_t L_t (FAMO: of sum_t z_t log L_t / c, i.e. weights z_t / (c L_t)). DB-MTL
is listed here with the loss-level methods but is a gradient method: its shared update is an EMA
of past per-task gradients of log L_t, each rescaled to the largest norm, not the gradient of any
weighted loss. GradNorm and DB-MTL look at per-task gradients (:mod:`mtlrec.balance.grads`); the
others only at loss values and use one plain backward. A task absent from a step (loss exactly 0,
:mod:`mtlrec.balance.base`) leaves every method's state as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mtlrec.balance.base import (
    Balancer,
    BalancerConfig,
    config_error,
    present_tasks,
    register_balancer,
)
from mtlrec.balance.grads import GradientBalancer, TaskGrads
from mtlrec.errors import ConfigError


class _StaticWeights(Balancer):
    def _static(self) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, losses: torch.Tensor, aux_loss: torch.Tensor | None = None) -> torch.Tensor:
        total = (self._static().to(losses) * losses).sum()
        if aux_loss is not None:
            total = total + aux_loss
        total.backward()
        return total.detach()

    @property
    def weights(self) -> torch.Tensor:
        return self._static()


@register_balancer("ew")
class EqualWeighting(_StaticWeights):
    """Equal weighting: the plain sum of task losses (the usual multi-task baseline)."""

    def _static(self) -> torch.Tensor:
        return torch.ones(self.num_tasks)


@dataclass
class FixedConfig(BalancerConfig):
    weights: dict[str, float] = field(default_factory=dict)


@register_balancer("fixed")
class FixedWeighting(_StaticWeights):
    """Fixed weights: each task's ``weight`` from the schema, overridden by ``balance.weights``."""

    Config = FixedConfig

    def __init__(self, model, config: FixedConfig) -> None:
        super().__init__(model, config)
        names = model.schema.task_names
        unknown = sorted(set(config.weights) - set(names))
        if unknown:
            raise ConfigError(
                f"balance.weights: unknown task(s) {', '.join(unknown)}; tasks are {', '.join(names)}"
            )
        self._w = torch.tensor(
            [float(config.weights.get(t.name, t.weight)) for t in model.schema.tasks]
        )

    def _static(self) -> torch.Tensor:
        return self._w


# --- learned and adaptive weights -------------------------------------------------------------


class _Learned:
    """A [T] vector the balancer learns itself, with its own Adam.

    Design: the trainer's optimizer only sees the model, so a balancer with learnable weights
    owns them and steps them inside :meth:`Balancer.backward` (after setting their gradient).
    Adam is elementwise, so with the same learning rate this equals putting them in the model's
    optimizer, as the papers do.
    """

    def __init__(self, init: torch.Tensor, lr: float, weight_decay: float = 0.0) -> None:
        self.param = nn.Parameter(init.clone())
        self.optimizer = torch.optim.Adam([self.param], lr=lr, weight_decay=weight_decay)

    def step(self, grad: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """One Adam step on ``grad``; entries where ``keep`` is True (absent tasks) keep their
        value and their Adam moments (the shared step count still advances)."""
        if keep is not None:
            keep = keep.to(self.param.device)
            before = self.param.detach().clone()
            state = self.optimizer.state.get(self.param, {})
            moments = {
                k: v.clone()
                for k, v in state.items()
                if torch.is_tensor(v) and v.shape == self.param.shape
            }
        self.param.grad = grad.detach().to(self.param)
        self.optimizer.step()
        self.param.grad = None
        if keep is not None:
            with torch.no_grad():
                self.param.copy_(torch.where(keep, before, self.param))
                for k, v in self.optimizer.state[self.param].items():
                    if torch.is_tensor(v) and v.shape == self.param.shape:
                        old = moments.get(k, torch.zeros_like(v))  # none yet: they start at 0
                        v.copy_(torch.where(keep, old, v))

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.param.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.param.copy_(state["value"])
        self.optimizer.load_state_dict(state["optimizer"])


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise config_error(key, f"must be > 0, got {value!r}")


def _unit(key: str, value: float) -> None:
    if not 0 <= value < 1:
        raise config_error(key, f"must be in [0, 1), got {value!r}")


@dataclass
class UWConfig(BalancerConfig):
    lr: float = 1e-3

    def __post_init__(self) -> None:
        _positive("lr", self.lr)


@register_balancer("uw")
class UncertaintyWeighting(Balancer):
    """Uncertainty weighting: learned homoscedastic task uncertainty scales each loss.

    Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018. With s_t = log sigma_t^2 (learned, initialised to 0),
    the objective is sum_t c_t exp(-s_t) L_t + s_t / 2, where c_t = 1/2 for a regression task
    (Sec. 3.2: L / (2 sigma^2) + log sigma) and c_t = 1 for a classification task
    (L / sigma^2 + log sigma). ``weights`` = c_t exp(-s_t).
    Design: s is an ``nn.Parameter`` owned by the balancer and stepped by its own Adam inside
    ``backward``; the paper optimises s jointly with the network, which is the same thing when
    ``balance.lr`` equals ``train.lr`` (both default to 1e-3). A task absent from a step drops
    out of the objective (both terms), and its s_t and Adam moments stay as they were.
    """

    Config = UWConfig

    def __init__(self, model, config: UWConfig) -> None:
        super().__init__(model, config)
        self.log_vars = _Learned(torch.zeros(self.num_tasks, device=_device(model)), config.lr)
        self._c = torch.tensor(
            [0.5 if t.type == "regression" else 1.0 for t in model.schema.tasks],
            device=_device(model),
        )

    def parameters(self) -> list[nn.Parameter]:
        """The learned log-variances s_t (one per task)."""
        return [self.log_vars.param]

    def backward(self, losses: torch.Tensor, aux_loss: torch.Tensor | None = None) -> torch.Tensor:
        s = self.log_vars.param
        present = present_tasks(losses).to(s.device)
        terms = self._c * torch.exp(-s) * losses + 0.5 * s
        total = torch.where(present, terms, torch.zeros_like(terms)).sum()
        if aux_loss is not None:
            total = total + aux_loss
        total.backward()
        self.log_vars.step(s.grad if s.grad is not None else torch.zeros_like(s), keep=~present)
        return total.detach()

    @property
    def weights(self) -> torch.Tensor:
        return (self._c * torch.exp(-self.log_vars.param)).detach()

    def state_dict(self) -> dict[str, Any]:
        return {"log_vars": self.log_vars.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_vars.load_state_dict(state["log_vars"])


@dataclass
class DWAConfig(BalancerConfig):
    temperature: float = 2.0
    window: int = 100

    def __post_init__(self) -> None:
        _positive("temperature", self.temperature)
        if int(self.window) != self.window or self.window < 1:
            raise config_error("window", f"must be an integer >= 1, got {self.window!r}")
        self.window = int(self.window)


@register_balancer("dwa")
class DynamicWeightAverage(Balancer):
    """Dynamic weight average: weights from each task's recent rate of loss decrease.

    Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, Sec. 3.3:
    w_k = T_tasks exp(r_k / temperature) / sum_i exp(r_i / temperature), r_k = L_k(-1) / L_k(-2)
    with temperature 2; the weights are 1 until two loss averages exist.
    Departure: the paper averages the loss over the two previous epochs; the balancer does not
    see epochs, so it averages over consecutive windows of ``window`` steps (default 100) and
    uses the last two complete windows. A task's window average is over the steps where it is
    present (absent steps, loss exactly 0, are skipped); when a task has no present step in one
    of the two windows its ratio does not exist and the previous weights are kept.
    """

    Config = DWAConfig

    def __init__(self, model, config: DWAConfig) -> None:
        super().__init__(model, config)
        self._sum = torch.zeros(self.num_tasks, dtype=torch.float64)
        self._count = torch.zeros(self.num_tasks, dtype=torch.float64)  # present steps per task
        self._steps = 0  # steps in the current window
        self._history: list[torch.Tensor] = []  # window averages (NaN: no present step)
        self._next = torch.ones(self.num_tasks)  # the weights of the coming steps
        self._w = self._next  # the weights of the last step

    def _next_weights(self) -> torch.Tensor:
        """The weights from the last two windows; the held ones where a ratio is missing."""
        if len(self._history) < 2:
            return torch.ones(self.num_tasks)
        last, before = self._history[-1], self._history[-2]
        if bool(last.isnan().any() or before.isnan().any()):
            return self._next
        ratio = last / before.clamp_min(1e-12)
        return (self.num_tasks * torch.softmax(ratio / self.config.temperature, 0)).float()

    def backward(self, losses: torch.Tensor, aux_loss: torch.Tensor | None = None) -> torch.Tensor:
        self._w = self._next
        total = (self._w.to(losses) * losses).sum()
        if aux_loss is not None:
            total = total + aux_loss
        total.backward()
        current = losses.detach().double().cpu()
        present = current != 0
        self._sum += torch.where(present, current, torch.zeros_like(current))
        self._count += present.double()
        self._steps += 1
        if self._steps == self.config.window:
            average = torch.where(
                self._count > 0, self._sum / self._count.clamp_min(1.0), float("nan")
            )
            self._history = [*self._history[-1:], average]
            self._sum = torch.zeros_like(self._sum)
            self._count = torch.zeros_like(self._count)
            self._steps = 0
            self._next = self._next_weights()
        return total.detach()

    @property
    def weights(self) -> torch.Tensor:
        return self._w

    def state_dict(self) -> dict[str, Any]:
        return {
            "sum": self._sum,
            "count": self._count,
            "steps": self._steps,
            "history": list(self._history),
            "next": self._next,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sum = state["sum"].clone()
        self._history = [h.clone() for h in state["history"]]
        count = state["count"]
        if torch.is_tensor(count):
            self._count, self._steps = count.clone(), int(state["steps"])
        else:  # a checkpoint from before per-task counts: every step counted for every task
            self._count = torch.full_like(self._sum, float(count))
            self._steps = int(count)
        if "next" in state:
            self._next = state["next"].clone()
        else:  # before the field: the weights followed from the history alone
            self._next = torch.ones(self.num_tasks)
            self._next = self._next_weights()
        self._w = self._next


@dataclass
class GradNormConfig(BalancerConfig):
    alpha: float = 1.5
    lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise config_error("alpha", f"must be >= 0, got {self.alpha!r}")
        _positive("lr", self.lr)


@register_balancer("gradnorm")
class GradNorm(GradientBalancer):
    """GradNorm: learn weights so that each task's weighted gradient norm tracks its training rate.

    Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018, Alg. 1. G_i = |grad_W w_i L_i|,
    G_bar = mean G_i (a constant), r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0)); the weights
    descend L_grad = sum_i |G_i - G_bar r_i^alpha| (alpha = 1.5) and are renormalised to sum to
    the task count after each step; the network gets sum_i w_i L_i with the weights before the
    step. Since G_i = w_i |grad_W L_i|, dL_grad/dw_i = sign(G_i - G_bar r_i^alpha) |grad_W L_i|
    exactly, so no second-order backward is needed.
    Departures: W is all shared parameters (the paper suggests the last shared layer, which has
    no model-independent definition here); L_i(0) is the task's loss on the first step where it
    is present; the weights have their own Adam (``lr``, default 1e-3 = the default
    ``train.lr``; the paper uses the network's optimizer) and are floored at 1e-3 before
    renormalising, so none turns negative. A task absent from a step (loss exactly 0, zero
    gradient) is left out of that step's weight update: G_bar and the mean rate are over the
    present tasks, its weight and Adam moments stay as they were, and the present weights are
    renormalised to sum to T minus the absent ones.
    """

    Config = GradNormConfig

    def __init__(self, model, config: GradNormConfig) -> None:
        super().__init__(model, config)
        self.w = _Learned(torch.ones(self.num_tasks, device=_device(model)), config.lr)
        self._initial: torch.Tensor | None = None  # L_i(0); NaN until task i is present

    def combine(self, grads: TaskGrads, losses: torch.Tensor):
        w = self.w.param.detach().clone()
        present = grads.present_on(w.device)
        if self._initial is None:
            self._initial = torch.full_like(losses, float("nan"))
        self._initial = torch.where(present & self._initial.isnan(), losses, self._initial)
        norms = grads.gram().diagonal().clamp_min(0).sqrt().to(w)
        ratio = losses / self._initial.clamp_min(1e-12)
        rate = ratio / ratio[present].mean().clamp_min(1e-12)
        g = w * norms
        target = g[present].mean() * rate.pow(self.config.alpha)
        step = torch.where(present, torch.sign(g - target) * norms, torch.zeros_like(norms))
        self.w.step(step, keep=~present)
        with torch.no_grad():
            floored = self.w.param.clamp_min(1e-3)
            absent_sum = torch.where(present, torch.zeros_like(w), w).sum()
            scaled = floored * (self.num_tasks - absent_sum) / floored[present].sum()
            self.w.param.copy_(torch.where(present, scaled, w))
        return w @ grads.matrix, w

    @property
    def weights(self) -> torch.Tensor:
        return self.w.param.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.state_dict(), "initial": self._initial}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.w.load_state_dict(state["w"])
        self._initial = state["initial"]


@dataclass
class RLWConfig(BalancerConfig):
    seed: int = 0


@register_balancer("rlw")
class RandomLossWeighting(Balancer):
    """Random loss weighting: fresh random weights every step.

    Lin, Ye, Zhang, Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning", TMLR 2022: w = softmax(z), z ~ N(0, I) sampled each step, loss
    sum_t w_t L_t (weights sum to 1, as in the paper). Samples come from a generator seeded by
    ``seed``, saved with the balancer's state. On a step with an absent task (loss exactly 0) the
    softmax runs over the present tasks' draws (the draw itself is unchanged, T numbers a step).
    """

    Config = RLWConfig

    def __init__(self, model, config: RLWConfig) -> None:
        super().__init__(model, config)
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self._w = torch.full((self.num_tasks,), 1.0 / self.num_tasks)

    def backward(self, losses: torch.Tensor, aux_loss: torch.Tensor | None = None) -> torch.Tensor:
        w = torch.softmax(torch.randn(self.num_tasks, generator=self.generator), 0).to(losses)
        # Absent tasks: renormalise over the present ones (on the device: no host sync; with
        # every task present the draw's softmax is used as it is).
        present = present_tasks(losses)
        kept = torch.where(present, w, torch.zeros_like(w))
        renormalised = kept / kept.sum().clamp_min(1e-30)
        self._w = torch.where(present.all(), w, renormalised).detach()
        total = (self._w * losses).sum()
        if aux_loss is not None:
            total = total + aux_loss
        total.backward()
        return total.detach()

    @property
    def weights(self) -> torch.Tensor:
        return self._w

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class DBMTLConfig(BalancerConfig):
    beta: float = 0.9
    beta_sigma: float = 0.0

    def __post_init__(self) -> None:
        _unit("beta", self.beta)
        if self.beta_sigma < 0:
            raise config_error("beta_sigma", f"must be >= 0, got {self.beta_sigma!r}")


@register_balancer("dbmtl")
class DualBalancing(GradientBalancer):
    """DB-MTL, a gradient method: an EMA of each task's grad log L, rescaled to the largest norm.

    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Kwok, "Dual-Balancing for Multi-Task Learning",
    arXiv 2308.12029, 2023 (v3, 2025, accepted by Neural Networks, adds Ivor W. Tsang as an
    author). Loss-scale balancing: each task's loss is log L_t. Gradient-magnitude balancing: an
    EMA of each task's gradient of log L_t on the shared parameters,
    g_hat_t = beta_k g_hat_t + (1 - beta_k) grad log L_t with beta_k = beta / k^beta_sigma
    (beta = 0.9, beta_sigma = 0, the authors' LibMTL defaults; the EMA starts at zero), and the
    shared update sum_t (max_s |g_hat_s| / |g_hat_t|) g_hat_t: not the gradient of a weighted
    loss, although the class lives with the loss-weighting methods. Each task's own parameters
    get grad log L_t = grad L_t / L_t. ``weights`` are the last rescaling factors. A task absent
    from a step keeps its EMA as it was and is left out of that step's update (and of the max
    norm); its factor is 0.
    """

    Config = DBMTLConfig

    def __init__(self, model, config: DBMTLConfig) -> None:
        super().__init__(model, config)
        self._buffer: torch.Tensor | None = None
        self._step = 0
        self._alpha = torch.ones(self.num_tasks)

    def transform(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.log(losses + 1e-8)

    def combine(self, grads: TaskGrads, losses: torch.Tensor):
        g = grads.matrix
        if self._buffer is None or self._buffer.shape != g.shape:
            self._buffer, self._step = torch.zeros_like(g), 0
        self._step += 1
        beta = self.config.beta / self._step**self.config.beta_sigma
        present = grads.present_on(g.device)
        updated = beta * self._buffer + (1.0 - beta) * g
        self._buffer = torch.where(present[:, None], updated, self._buffer)
        norms = self._buffer.norm(dim=1)
        factors = norms[present].max() / (norms + 1e-8)
        self._alpha = torch.where(present, factors, torch.zeros_like(factors))
        return self._alpha @ self._buffer, None

    @property
    def weights(self) -> torch.Tensor:
        return self._alpha

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self._buffer, "step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buf = state["buffer"]
        self._buffer = None if buf is None else buf.clone()
        self._step = int(state["step"])


@dataclass
class FAMOConfig(BalancerConfig):
    lr: float = 0.025
    gamma: float = 1e-3

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        if self.gamma < 0:
            raise config_error("gamma", f"must be >= 0, got {self.gamma!r}")


@register_balancer("famo")
class FAMO(Balancer):
    """FAMO: weights that make every task's log-loss fall at the same rate, at O(1) cost.

    Liu, Feng, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023,
    Alg. 2. z = softmax(xi); the network gets the gradient of
    sum_t z_t log(L_t + eps) / c with c = sum_t z_t / (L_t + eps) held constant (a convex
    combination of the task gradients, each divided by its loss); the logits xi are learned by
    Adam (lr 0.025, weight decay gamma = 1e-3) on the gradient J_softmax(xi)^T delta, where
    delta_t = log L_t(before the update) - log L_t(after it). Task losses are assumed >= 0 (the
    paper's min-loss offset is 0 here).
    Departure: the paper re-evaluates the same mini-batch after the model step to get
    L(after); a balancer cannot run the model, so delta uses the next step's losses (a different
    mini-batch), and xi is stepped at the start of that next ``backward``.
    Absent tasks (loss exactly 0: no observed row): such a task is left out of c and of the
    network's objective (the update is a convex combination of the present tasks' gradients),
    and out of the logits update that reads its delta (absent before or after): that update
    uses the softmax over the tasks present on both steps and leaves the others' logits and Adam
    moments as they were.
    """

    Config = FAMOConfig

    def __init__(self, model, config: FAMOConfig) -> None:
        super().__init__(model, config)
        zeros = torch.zeros(self.num_tasks, device=_device(model))
        self.logits = _Learned(zeros, config.lr, weight_decay=config.gamma)
        self._previous: torch.Tensor | None = None

    def backward(self, losses: torch.Tensor, aux_loss: torch.Tensor | None = None) -> torch.Tensor:
        current = losses.detach()
        present = present_tasks(current)
        if self._previous is not None:
            # Tasks present on both steps; the others have no delta. Device-side masks, no sync.
            both = (present & (self._previous != 0)).to(self.logits.param.device)
            delta = (torch.log(self._previous + 1e-8) - torch.log(current + 1e-8)).to(both.device)
            delta = torch.where(both, delta, torch.zeros_like(delta))
            xi = self.logits.param.detach().requires_grad_(True)
            z_both = torch.softmax(xi.masked_fill(~both, float("-inf")), 0)
            (grad,) = torch.autograd.grad(z_both, xi, grad_outputs=delta.to(xi))
            grad = torch.where(both, grad, torch.zeros_like(grad))  # also no NaN if none is
            self.logits.step(grad, keep=~both)
        self._previous = current.clone()
        z = self.weights.to(losses)
        z = torch.where(present, z, torch.zeros_like(z))
        shifted = losses + 1e-8
        c = (z / shifted.detach()).sum()
        c = c + (c == 0).to(c)  # every task absent: 0 / 1, no update
        total = (z * torch.log(shifted)).sum() / c
        if aux_loss is not None:
            total = total + aux_loss
        total.backward()
        reported = (z / (c * shifted.detach()) * current).sum()
        return reported + aux_loss.detach() if aux_loss is not None else reported

    @property
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits.param.detach(), 0)

    def state_dict(self) -> dict[str, Any]:
        return {"logits": self.logits.state_dict(), "previous": self._previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.logits.load_state_dict(state["logits"])
        self._previous = state["previous"]
