"""Gradient surgery: combine the task gradients of the shared parameters into one update.

Each method takes the per-task gradients of ``model.shared_parameters()`` as a [T, D] matrix
(:mod:`mtlrec.balance.grads`), computes coefficients from their Gram matrix
(:mod:`mtlrec.balance.aggregators`) and writes sum_t c_t g_t into the shared ``.grad``. Task
parameters get their own task's gradient: plain, or scaled by the method's task weight where
the authors' code backpropagates a weighted loss (MGDA, Nash-MTL). Gradients are those of all
shared parameters, not of the shared representation (the "UB" variants), because the models do
not expose one representation common to all architectures.

A task absent from a step (:mod:`mtlrec.balance.base`) is left out: MGDA, CAGrad, IMTL-G,
Nash-MTL and Aligned-MTL solve on the present tasks' Gram matrix only (one present task: its
gradient under the method's own normalisation); PCGrad and GradVac skip a zero gradient already
(no projection onto it, no target update for its pairs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mtlrec.balance import aggregators as agg
from mtlrec.balance.base import BalancerConfig, config_error, register_balancer
from mtlrec.balance.grads import GradientBalancer, TaskGrads

MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def _combination(coef: torch.Tensor, grads: TaskGrads) -> torch.Tensor:
    return coef.to(grads.matrix) @ grads.matrix


@dataclass
class MGDAConfig(BalancerConfig):
    normalization: str = "none"

    def __post_init__(self) -> None:
        if self.normalization not in MGDA_NORMALIZATIONS:
            raise config_error(
                "normalization",
                f"{self.normalization!r} is not one of {', '.join(MGDA_NORMALIZATIONS)}",
            )


@register_balancer("mgda")
class MGDA(GradientBalancer):
    """MGDA: the min-norm point of the convex hull of the task gradients (a common descent step).

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018:
    alpha = argmin_{alpha in simplex} |sum_t alpha_t g_t|^2 by the paper's Frank-Wolfe solver
    (Alg. 2, with the two-task closed form for the starting pair); the shared update is
    sum_t alpha_t g_t and each task's own parameters get alpha_t times its gradient (the authors'
    code backpropagates sum_t alpha_t L_t). ``normalization`` (none, l2, loss, loss+) divides
    the gradients before solving, as the authors' code may; the default is none. Only the tasks
    present in the step enter the solver (one present task: alpha = 1, its plain gradient).
    Departure: the MGDA-UB variant runs the solver on the gradients of the shared
    representation; here it runs on the gradients of all shared parameters (exact MGDA, costlier).
    """

    Config = MGDAConfig

    def __init__(self, model, config: MGDAConfig) -> None:
        super().__init__(model, config)
        self._alpha = torch.ones(self.num_tasks)

    def combine(self, grads: TaskGrads, losses: torch.Tensor):
        gram = grads.gram()
        mode = self.config.normalization
        norms = gram.diagonal().clamp_min(0).sqrt()
        scale = {
            "none": torch.ones_like(norms),
            "l2": norms,
            "loss": losses.double().cpu(),
            "loss+": losses.double().cpu() * norms,
        }[mode].clamp_min(1e-12)
        alpha = agg.on_present(
            agg.min_norm_coefficients, gram / torch.outer(scale, scale), grads.present
        )
        self._alpha = alpha.float()
        return _combination(alpha, grads), self._alpha.to(losses)

    @property
    def weights(self) -> torch.Tensor:
        return self._alpha


@dataclass
class SeedConfig(BalancerConfig):
    seed: int = 0


class _Seeded(GradientBalancer):
    """A method that draws a random task order each step from its own seeded generator."""

    def __init__(self, model, config) -> None:
        super().__init__(model, config)
        self.generator = torch.Generator().manual_seed(int(config.seed))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


@register_balancer("pcgrad")
class PCGrad(_Seeded):
    """PCGrad: project away the conflicting component of each task gradient, then sum.

    Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020, Alg. 1: for each task i, over the other tasks j in a random order, if
    g_i^PC . g_j < 0 then g_i^PC -= (g_i^PC . g_j) / |g_j|^2 g_j, where g_j is the ORIGINAL
    gradient; the update is sum_i g_i^PC. The order comes from a generator seeded by ``seed``.
    Task parameters get their plain gradient.
    """

    Config = SeedConfig

    def combine(self, grads: TaskGrads, losses: torch.Tensor):
        return _combination(agg.pcgrad_coefficients(grads.gram(), self.generator), grads), None


@dataclass
class CAGradConfig(BalancerConfig):
    c: float = 0.5
    rescale: int = 1

    def __post_init__(self) -> None:
        if self.c < 0:
            raise config_error("c", f"must be >= 0, got {self.c!r}")
        if self.rescale not in (0, 1, 2):
            raise config_error("rescale", f"must be 0, 1 or 2, got {self.rescale!r}")


@register_balancer("cagrad")
class CAGrad(GradientBalancer):
    """CAGrad: the update near the mean gradient that maximises the worst task's improvement.

    Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021, Alg. 1: with g_0 the mean task gradient and phi = c^2 |g_0|^2 (c = 0.5),
    w* = argmin_{w in simplex} g_w . g_0 + sqrt(phi) |g_w| (solved with SLSQP on the T weights,
    as the authors' code), update g_0 + sqrt(phi) / |g_w*| g_w*. ``rescale`` as the authors'
    code: 1 divides by 1 + c^2 (default), 2 by 1 + c, 0 not at all. c = 0 gives the mean
    gradient; one task (or one present task) gets (1 + c) g before the rescaling, as the
    authors' code. Task parameters get their plain gradient.
    """

    Config = CAGradConfig

    def combine(self, grads: TaskGrads, losses: torch.Tensor):
        c = self.config.c
        coef = agg.on_present(lambda m: agg.cagrad_coefficients(m, c), grads.gram(), grads.present)
        divisor = {0: 1.0, 1: 1.0 + self.config.c**2, 2: 1.0 + self.config.c}[self.config.rescale]
        return _combination(coef / divisor, grads), None


@dataclass
class GradVacConfig(BalancerConfig):
    beta: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.beta <= 1:
            raise config_error("beta", f"must be in (0, 1], got {self.beta!r}")


@register_balancer("gradvac")
class GradVac(_Seeded):
    """Gradient Vaccine: raise each pair's gradient cosine to its running (EMA) target.

    Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021, Alg. 1: for each task i and other
    task j (random order), phi = cos(g_i', g_j); if phi < phi_hat_ij,
    g_i' += |g_i'| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) /
    (|g_j| sqrt(1 - phi_hat^2)) g_j; phi_hat_ij = (1 - beta) phi_hat_ij + beta phi (beta = 0.01,
    targets start at 0); the update is sum_i g_i'. Task parameters get their plain gradient.
    Departure: one target per task pair over all shared parameters together (the paper also
    studies per-layer targets).
    """

    Config = GradVacConfig

    def __init__(self, model, config: GradVacConfig) -> None:
        super().__init__(model, config)
        self.targets = torch.zeros(self.num_tasks, self.num_tasks, dtype=torch.float64)

    def combine(self, grads: TaskGrads, losses: torch.Tensor):
        coef = agg.gradvac_coefficients(
            grads.gram(), self.targets, self.config.beta, self.generator
        )
        return _combination(coef, grads), None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "targets": self.targets.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.targets = state["targets"].clone()


class _Weighted(GradientBalancer):
    """Methods whose coefficients are task weights (exposed as ``weights``)."""

    def __init__(self, model, config) -> None:
        super().__init__(model, config)
        self._alpha = torch.ones(self.num_tasks)

    @property
    def weights(self) -> torch.Tensor:
        return self._alpha


@register_balancer("imtl")
class IMTL(_Weighted):
    """IMTL-G: the update whose projections on every task's unit gradient are equal.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021, Sec. 3.2 (IMTL-G, closed form): u_t = g_t / |g_t|, D = [g_1 - g_t]_{t>=2},
    U = [u_1 - u_t]_{t>=2}, alpha_{2:T} = g_1 U^T (D U^T)^-1, alpha_1 = 1 - sum alpha_{2:T};
    shared update sum_t alpha_t g_t; task parameters get their plain gradient (Alg. 1).
    Departure: gradient balancing only (IMTL-G); the hybrid IMTL also learns loss scales
    (IMTL-L), which is not included. A pseudo-inverse replaces the inverse when D U^T is singular.
    Only the tasks present in the step enter (one present task: alpha = 1).
    """

    def combine(self, grads: TaskGrads, losses: torch.Tensor):
        alpha = agg.on_present(agg.imtl_coefficients, grads.gram(), grads.present)
        self._alpha = alpha.float()
        return _combination(alpha, grads), None


@dataclass
class NashMTLConfig(BalancerConfig):
    max_norm: float = 1.0
    update_weights_every: int = 1

    def __post_init__(self) -> None:
        if self.max_norm < 0:
            raise config_error("max_norm", f"must be >= 0 (0 disables), got {self.max_norm!r}")
        if self.update_weights_every < 1:
            raise config_error("update_weights_every", "must be >= 1")


@register_balancer("nashmtl")
class NashMTL(_Weighted):
    """Nash-MTL: the Nash bargaining solution among tasks, G^T G alpha = 1 / alpha.

    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as a
    Bargaining Game", ICML 2022, Alg. 1: alpha > 0 solving G^T G alpha = 1 / alpha on the raw
    Gram matrix of the task gradients (so |sum_t alpha_t g_t| = sqrt(T) at any gradient scale;
    the authors' code normalises the Gram for its solver and multiplies the factor back in its
    constraint, which is the same point), update sum_t alpha_t g_t; every task's own parameters
    get alpha_t times its gradient (the authors backpropagate sum_t alpha_t L_t); the shared
    update is clipped to norm ``max_norm`` (1.0, the authors' default; 0 disables); alpha is
    recomputed every ``update_weights_every`` steps (1), and on any step whose set of present
    tasks differs from the one alpha was solved for (an absent task gets alpha = 0).
    Departure: cvxpy is not available; the fixed point is found as the minimiser of the convex
    a^T M a / 2 - sum log a (M the Gram divided by its Frobenius norm n, for conditioning;
    alpha = a / sqrt(n)) by damped Newton steps (exact up to 1e-10, where the paper's sequential
    convex approximation stops after 20 iterations). A task with no shared gradient gets
    alpha = 1; a 1e-6 ridge on M keeps linearly dependent gradients solvable.
    """

    Config = NashMTLConfig

    def __init__(self, model, config: NashMTLConfig) -> None:
        super().__init__(model, config)
        self._step = 0
        self._solution: torch.Tensor | None = None
        self._solved_for: torch.Tensor | None = None  # the present tasks alpha was solved for

    def combine(self, grads: TaskGrads, losses: torch.Tensor):
        present = grads.present_on()
        if (
            self._solution is None
            or self._step % self.config.update_weights_every == 0
            or self._solved_for is None
            or not torch.equal(self._solved_for, present)
        ):
            start = self._solution

            def solve(gram: torch.Tensor) -> torch.Tensor:
                warm = None if start is None else start[present]
                return agg.nash_coefficients(gram, start=warm)

            self._solution = agg.on_present(solve, grads.gram(), present)
            self._solved_for = present.clone()
        self._step += 1
        self._alpha = self._solution.float()
        shared = _combination(self._solution, grads)
        norm = float(shared.norm())
        if self.config.max_norm > 0 and norm > self.config.max_norm:
            shared = shared * (self.config.max_norm / norm)
        return shared, self._alpha.to(losses)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step, "solution": self._solution, "solved_for": self._solved_for}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._step, self._solution = int(state["step"]), state["solution"]
        solved = state.get("solved_for")
        if solved is None and self._solution is not None:  # a checkpoint from before the field
            solved = torch.ones(self.num_tasks, dtype=torch.bool)
        self._solved_for = solved


@register_balancer("alignedmtl")
class AlignedMTL(_Weighted):
    """Aligned-MTL: align the principal components of the task-gradient matrix.

    Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023, Alg. 1: from the eigendecomposition of the Gram matrix
    G^T G = V Lambda V^T (rank r), the aligned gradients are G B with
    B = sqrt(lambda_min) V Lambda^-1/2 V^T (every singular value set to the smallest, sigma_min),
    and the update is their sum with equal task weights, sum_t (B 1)_t g_t. Orthogonal
    gradients of equal norm come out unchanged (their sum). Task parameters get their plain
    gradient; ``weights`` are B 1.
    """

    def combine(self, grads: TaskGrads, losses: torch.Tensor):
        coef = agg.on_present(agg.aligned_coefficients, grads.gram(), grads.present)
        self._alpha = coef.float()
        return _combination(coef, grads), None
