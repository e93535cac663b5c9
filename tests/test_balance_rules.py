"""Balancers on a stub model whose task gradients are written down: every number is by hand.

The stub's task losses are L_t = A[t] . w + B[t] + C[t] h_t at w = 0, h = 0: task t's loss is
B[t], its gradient on the shared parameters is A[t] and on its own scalar h_t is C[t]. So what a
balancer leaves in ``.grad`` can be compared with a hand computation of its paper's rule, and a
task with no observed row in a batch (loss exactly 0, gradient exactly 0: ABSENT for that step,
see :mod:`mtlrec.balance.base`) is a zero row with B[t] = 0.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mtlrec.balance import aggregators as agg
from mtlrec.balance import build_balancer
from mtlrec.balance.base import check_optimizer
from mtlrec.errors import ConfigError

# The audit's inputs: two conflicting tasks (A[0] . A[1] = -1).
A = np.array([[1.0, 2.0, 0.0], [-2.0, 0.5, 1.0]])
C = np.array([0.4, -0.6])
L1 = np.array([0.7, 0.3])
L2 = np.array([0.35, 0.3])
# Task 1 absent: no observed row, so its loss and both of its gradients are exactly 0.
A_EMPTY = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
L_EMPTY = np.array([0.7, 0.0])
C_EMPTY = np.array([0.4, 0.0])


class Toy(nn.Module):
    """A "model" with shared tensors of the given sizes and one scalar per task."""

    def __init__(self, sizes=(3,), types=("binary", "binary")) -> None:
        super().__init__()
        self.shared = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in sizes])
        self.own = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in types])
        self.num_tasks = len(types)
        tasks = [SimpleNamespace(name=f"t{i}", type=ty, weight=1.0) for i, ty in enumerate(types)]
        self.schema = SimpleNamespace(tasks=tasks, task_names=[t.name for t in tasks])

    def shared_parameters(self):
        return list(self.shared)

    def task_parameters(self):
        return [[p] for p in self.own]

    def losses(self, a, b, c) -> torch.Tensor:
        w = torch.cat([p.reshape(-1) for p in self.shared])
        h = torch.cat([p.reshape(-1) for p in self.own])
        a, b, c = (torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in (a, b, c))
        return a @ w + b + c * h


def _run(balancer, model: Toy, a, b, c=None):
    """One backward; (shared .grad flat, own .grad per task) as float64 numpy."""
    c = np.ones(len(b)) if c is None else c
    for p in model.parameters():
        p.grad = None
    balancer.backward(model.losses(a, b, c))
    shared = np.concatenate(
        [
            np.zeros(p.numel()) if p.grad is None else p.grad.double().numpy().reshape(-1)
            for p in model.shared
        ]
    )
    own = np.array([0.0 if p.grad is None else float(p.grad) for p in model.own])
    return shared, own


def _make(name, options=None, sizes=(3,), types=("binary", "binary")):
    model = Toy(sizes, types)
    return build_balancer(name, model, options or {}), model


def _toy_step(name, a, b, c, options=None):
    sizes = (np.asarray(a).shape[1],)
    balancer, model = _make(name, options, sizes=sizes, types=("binary",) * len(b))
    shared, own = _run(balancer, model, a, b, c)
    return shared, own, balancer


# --- the rules nothing else pins, by hand -----------------------------------------------------


def test_ew_and_fixed_by_hand():
    shared, own, _ = _toy_step("ew", A, L1, C)
    assert np.allclose(shared, [-1.0, 2.5, 1.0]) and np.allclose(own, [0.4, -0.6])
    shared, own, _ = _toy_step("fixed", A, L1, C, {"weights": {"t1": 0.25}})
    assert np.allclose(shared, [0.5, 2.125, 0.25]) and np.allclose(own, [0.4, -0.15])


def test_dwa_weights_from_the_ratio_of_the_last_two_windows():
    balancer, model = _make("dwa", {"window": 1})
    _run(balancer, model, A, [1.0, 2.0], C)
    _run(balancer, model, A, [0.5, 1.8], C)
    shared, own = _run(balancer, model, A, [0.4, 1.0], C)
    # r = (0.5 / 1, 1.8 / 2); w = 2 softmax(r / 2)
    w = np.array([0.900332, 1.099668])
    assert np.allclose(balancer.weights.numpy(), w, atol=1e-6)
    assert np.allclose(shared, [-1.299004, 2.350498, 1.099668], atol=1e-6)
    assert np.allclose(own, [0.360133, -0.659801], atol=1e-6)


def test_gradnorm_two_steps_by_hand():
    balancer, model = _make("gradnorm", {"lr": 0.1})
    shared, own = _run(balancer, model, A, L1, C)
    assert np.allclose(shared, A.sum(0)) and np.allclose(own, C)  # weights 1 on step 1
    # |A_0| < |A_1|: G_0 below the mean, so w_0 rises by Adam's first step (lr), w_1 falls.
    assert np.allclose(balancer.weights.numpy(), [1.1, 0.9], atol=1e-6)
    shared, own = _run(balancer, model, A, L2, C)
    assert np.allclose(shared, [-0.7, 2.65, 0.9], atol=1e-6)
    assert np.allclose(own, [0.44, -0.54], atol=1e-6)
    assert np.allclose(balancer.weights.numpy(), [1.094737, 0.905263], atol=1e-6)


def test_dbmtl_two_steps_by_hand():
    balancer, model = _make("dbmtl")
    shared, own = _run(balancer, model, A, L1, C)
    # EMA 0.1 A / L1; both rows rescaled to the larger norm; own: grad log L = C / L
    assert np.allclose(shared, [-0.325102, 0.849797, 0.333333], atol=1e-6)
    assert np.allclose(own, [0.571429, -2.0], atol=1e-6)
    shared, own = _run(balancer, model, A, L2, C)
    assert np.allclose(shared, [-0.617693, 1.614614, 0.633333], atol=1e-6)
    assert np.allclose(own, [1.142857, -2.0], atol=1e-6)


def test_famo_two_steps_by_hand():
    balancer, model = _make("famo")
    shared, own = _run(balancer, model, A, L1, C)
    # z = (1/2, 1/2): the update is sum_t (z_t / L_t) g_t / c with c = sum_t z_t / L_t
    assert np.allclose(shared, [-1.1, 0.95, 0.7], atol=1e-6)
    assert np.allclose(own, [0.12, -0.42], atol=1e-6)
    shared, own = _run(balancer, model, A, L2, C)
    # xi: one Adam step (lr 0.025, wd 1e-3) on J_softmax^T (log L1 - log L2)
    assert np.allclose(balancer.weights.numpy(), [0.487503, 0.512497], atol=1e-6)
    assert np.allclose(shared, [-0.652583, 1.173708, 0.550861], atol=1e-6)
    assert np.allclose(own, [0.179656, -0.330517], atol=1e-6)


def test_rlw_weights_are_the_softmax_of_the_seeded_draw():
    balancer, model = _make("rlw", {"seed": 3})
    shared, own = _run(balancer, model, A, L1, C)
    z = torch.randn(2, generator=torch.Generator().manual_seed(3))
    w = torch.softmax(z, 0).double().numpy()
    assert np.allclose(balancer.weights.numpy(), w)
    assert np.allclose(shared, w @ A, atol=1e-6) and np.allclose(own, w * C, atol=1e-6)


def test_cagrad_balancer_by_hand():
    # Authors' cagrad() (SLSQP on the raw Gram), c = 0.5; rescale 1 divides by 1 + c^2.
    shared, own, _ = _toy_step("cagrad", A, L1, C, {"c": 0.5, "rescale": 1})
    assert np.allclose(shared, [-0.5628, 1.5180, 0.5875], atol=1e-3)
    assert np.allclose(own, C)
    shared, _, _ = _toy_step("cagrad", A, L1, C, {"c": 0.5, "rescale": 0})
    assert np.allclose(shared, [-0.7035, 1.8975, 0.7343], atol=1e-3)


@pytest.mark.parametrize("rescale, factor", [(0, 1.5), (1, 1.2), (2, 1.0)])
def test_cagrad_with_one_task_is_one_plus_c_times_its_gradient(rescale, factor):
    # Authors' code with T = 1: w = 1, g_w = g_0 = g, update (1 + c) g, then the rescaling.
    g = np.array([[1.0, 2.0, 0.0]])
    shared, own, _ = _toy_step("cagrad", g, [0.7], [0.4], {"c": 0.5, "rescale": rescale})
    assert np.allclose(shared, factor * g[0], atol=1e-6)
    assert np.allclose(own, [0.4])
    coef = agg.cagrad_coefficients(torch.tensor([[5.0]], dtype=torch.float64), 0.5)
    assert float(coef[0]) == pytest.approx(1.5)


def test_metabalance_two_steps_by_hand():
    a = np.array([[1.0, 2.0, 0.5], [-2.0, 0.5, 1.0]])  # shared tensors of sizes 2 and 1
    balancer, model = _make("metabalance", {"relax_factor": 0.7}, sizes=(2, 1))
    _run(balancer, model, a, L1, C)
    shared, _ = _run(balancer, model, a * np.array([[2.0], [1.0]]), L1, C)
    assert np.allclose(shared, [-0.917672, 4.729418, 1.834182], atol=1e-5)


def test_alignedmtl_non_orthogonal_by_hand():
    shared, own, _ = _toy_step("alignedmtl", A, L1, C)
    # sigma_min U V^T summed over tasks (SVD of the gradient matrix)
    assert np.allclose(shared, [-0.965694, 2.515061, 0.9881], atol=1e-5)
    assert np.allclose(own, C)


def test_mgda_loss_normalisation_by_hand():
    shared, own, _ = _toy_step("mgda", A, L1, C, {"normalization": "loss"})
    # min-norm point of g_t / L_t; the weights apply to the raw gradients and own gradients
    assert np.allclose(shared, [0.424837, 1.712418, 0.191721], atol=1e-6)
    assert np.allclose(own, [0.323312, -0.115033], atol=1e-6)


def test_nash_balancer_update_is_scale_free_and_clipped():
    for k in (1.0, 0.01):
        g = k * np.array([[2.0, 0.0], [0.0, 1.0]])
        shared, own, bal = _toy_step("nashmtl", g, [1.0, 1.0], [1.0, 1.0], {"max_norm": 0.0})
        # alpha = (1/2, 1) / k; update (1, 1) at any scale; own gradients alpha_t x C_t
        assert np.allclose(bal.weights.numpy(), np.array([0.5, 1.0]) / k, rtol=1e-4)
        assert np.allclose(shared, [1.0, 1.0], rtol=1e-4)
        assert np.allclose(own, np.array([0.5, 1.0]) / k, rtol=1e-4)
        shared, _, _ = _toy_step("nashmtl", g, [1.0, 1.0], [1.0, 1.0], {"max_norm": 1.0})
        assert np.allclose(shared, [0.5**0.5, 0.5**0.5], rtol=1e-4)


# --- absent tasks: loss exactly 0 and a zero gradient -----------------------------------------

# Every balancer that backward()s by itself (AdaTask needs its optimizer: tested below).
ALONE = ["ew", "fixed", "uw", "dwa", "gradnorm", "rlw", "dbmtl", "famo", "mgda", "pcgrad"]
ALONE += ["cagrad", "gradvac", "imtl", "nashmtl", "alignedmtl", "metabalance"]


@pytest.mark.parametrize("name", ALONE)
def test_an_absent_task_leaves_the_step_to_the_present_ones(name):
    """Task 1 absent: task 0 gets exactly what a model with task 0 alone would get, and task 1's
    own layers get nothing."""
    shared, own, _ = _toy_step(name, A_EMPTY, L_EMPTY, C_EMPTY)
    alone_shared, alone_own, _ = _toy_step(name, A_EMPTY[:1], L_EMPTY[:1], C_EMPTY[:1])
    assert np.allclose(shared, alone_shared, atol=1e-6), (shared, alone_shared)
    assert np.allclose(own, [alone_own[0], 0.0], atol=1e-6), (own, alone_own)


@pytest.mark.parametrize("name", ALONE)
def test_every_task_absent_gives_a_zero_finite_update(name):
    balancer, model = _make(name)
    _run(balancer, model, A, L1, C)
    shared, own = _run(balancer, model, np.zeros_like(A), [0.0, 0.0], [0.0, 0.0])
    assert np.isfinite(shared).all() and np.isfinite(own).all()
    assert not shared.any() and not own.any()
    weights = balancer.weights
    assert weights is None or bool(torch.isfinite(weights).all())


@pytest.mark.parametrize("normalization", ["none", "l2", "loss"])
def test_mgda_with_an_absent_task_steps_on_the_present_gradient(normalization):
    # Before: the min-norm point of conv{g_0, 0} is 0, so nothing moved (and alpha_0 = 0 froze
    # task 0's own layers too).
    opts = {"normalization": normalization}
    shared, own, bal = _toy_step("mgda", A_EMPTY, L_EMPTY, C_EMPTY, opts)
    assert np.allclose(shared, A_EMPTY[0]) and np.allclose(own, C_EMPTY)
    assert np.allclose(bal.weights.numpy(), [1.0, 0.0])


def test_imtl_with_an_absent_task_steps_on_the_present_gradient():
    shared, own, bal = _toy_step("imtl", A_EMPTY, L_EMPTY, C_EMPTY)  # before: alpha (0, 1), 0
    assert np.allclose(shared, A_EMPTY[0]) and np.allclose(own, C_EMPTY)
    assert np.allclose(bal.weights.numpy(), [1.0, 0.0])


def test_cagrad_with_an_absent_task_is_its_one_task_rule():
    shared, _, _ = _toy_step("cagrad", A_EMPTY, L_EMPTY, C_EMPTY)  # before: 0.4 g_0 (the mean)
    assert np.allclose(shared, 1.2 * A_EMPTY[0], atol=1e-6)


def test_nash_with_an_absent_task_bargains_among_the_present():
    shared, own, bal = _toy_step("nashmtl", A_EMPTY, L_EMPTY, C_EMPTY, {"max_norm": 0.0})
    # One present task: alpha_0 |g_0|^2 = 1 / alpha_0, alpha_0 = 1 / |g_0|: a unit update.
    n = math.sqrt(5.0)
    assert np.allclose(bal.weights.numpy(), [1 / n, 0.0], rtol=1e-4)
    assert np.allclose(shared, A_EMPTY[0] / n, rtol=1e-4)
    assert np.allclose(own, [0.4 / n, 0.0], rtol=1e-4)


def test_nash_re_solves_when_the_present_tasks_change():
    balancer, model = _make("nashmtl", {"max_norm": 0.0, "update_weights_every": 10})
    _run(balancer, model, A, L1, C)
    full = balancer.weights.clone()
    _run(balancer, model, A_EMPTY, L_EMPTY, C_EMPTY)  # not an update step: re-solved anyway
    assert np.allclose(balancer.weights.numpy(), [1 / math.sqrt(5.0), 0.0], rtol=1e-4)
    _run(balancer, model, A, L1, C)
    assert torch.allclose(balancer.weights, full, rtol=1e-5)


def test_gradnorm_takes_the_initial_loss_where_the_task_is_first_present():
    # Before: L_1(0) = 0 from the empty first batch made r_1 ~ L x 1e12 for the whole run and
    # pushed w_0 to the 1e-3 floor.
    a = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.0]])
    balancer, model = _make("gradnorm", {"lr": 0.01})
    _run(balancer, model, A_EMPTY, L_EMPTY, C_EMPTY)
    assert np.allclose(balancer.weights.numpy(), [1.0, 1.0])  # no update: G_bar = G_0, rate 1
    for _ in range(300):
        _run(balancer, model, a, [0.7, 0.9])
    assert np.allclose(balancer.state_dict()["initial"].numpy(), [0.7, 0.9])
    # Equal training rates: the weights equalise w_t |g_t|, w = 2 (|g_1|, |g_0|) / sum |g|.
    n = np.linalg.norm(a, axis=1)
    assert np.allclose(balancer.weights.numpy(), 2 * n[::-1] / n.sum(), atol=0.01)


def test_gradnorm_leaves_an_absent_task_out_of_the_weight_update():
    balancer, model = _make("gradnorm", {"lr": 0.1})
    _run(balancer, model, A, L1, C)  # w = (1.1, 0.9)
    state = balancer.w.optimizer.state[balancer.w.param]
    moments = state["exp_avg"][1].item(), state["exp_avg_sq"][1].item()
    _run(balancer, model, A_EMPTY, L_EMPTY, C_EMPTY)
    w = balancer.weights.numpy()
    assert w[1] == pytest.approx(0.9, abs=1e-6) and w.sum() == pytest.approx(2.0)
    assert (state["exp_avg"][1].item(), state["exp_avg_sq"][1].item()) == moments


def test_famo_leaves_an_absent_task_out_of_c_and_of_the_next_logits_update():
    balancer, model = _make("famo")
    shared, own = _run(balancer, model, A_EMPTY, L_EMPTY, C_EMPTY)
    # Before: c = z_0 / L_0 + z_1 / 1e-8 ~ 5e7 divided the whole update away.
    assert np.allclose(shared, A_EMPTY[0], atol=1e-6) and np.allclose(own, C_EMPTY, atol=1e-6)
    _run(balancer, model, A, L1, C)
    # Task 1 had no loss on the step before, so no delta: xi and its Adam moments stay 0
    # (before: delta_1 = log 1e-8 - log L_1 ~ -17 moved the weights and inflated Adam's v).
    assert np.allclose(balancer.weights.numpy(), [0.5, 0.5])
    state = balancer.logits.optimizer.state[balancer.logits.param]
    assert not state["exp_avg_sq"].any()


def test_metabalance_keeps_the_moving_average_of_an_absent_task():
    # Before: the auxiliary task's average decayed by 0.9 per empty batch, so its gradient came
    # back enlarged (x1.41 after 5 empty batches).
    a = np.array([[1.0, 0.0], [0.0, 1.0]])  # |g_tar| = |g_aux| = 1
    empty = np.array([[1.0, 0.0], [0.0, 0.0]])
    balancer, model = _make("metabalance", sizes=(2,))
    for _ in range(150):  # the moving averages reach 1 - 0.9^150
        _run(balancer, model, a, [0.5, 0.5])
    for _ in range(5):
        _run(balancer, model, empty, [0.5, 0.0], [1.0, 0.0])
    shared, _ = _run(balancer, model, a, [0.5, 0.5])
    assert shared[1] == pytest.approx(1.0, abs=1e-4)


def test_dwa_skips_absent_steps_in_the_window_average():
    balancer, model = _make("dwa", {"window": 2})
    _run(balancer, model, A, [0.7, 0.9], C)
    _run(balancer, model, A, [0.7, 0.0], C)  # task 1 absent: its window average is 0.9
    _run(balancer, model, A, [0.6, 0.8], C)
    _run(balancer, model, A, [0.6, 0.8], C)
    _run(balancer, model, A, [0.5, 0.7], C)
    r = np.array([0.6 / 0.7, 0.8 / 0.9])  # before: 0.8 / 0.45 for task 1
    w = 2 * np.exp(r / 2) / np.exp(r / 2).sum()
    assert np.allclose(balancer.weights.numpy(), w, atol=1e-6)


def test_dwa_keeps_the_previous_weights_after_a_window_without_the_task():
    balancer, model = _make("dwa", {"window": 2})
    used = []
    for losses in ([0.7, 0.9], [0.7, 0.9], [0.6, 0.0], [0.6, 0.0], [0.5, 0.8], [0.5, 0.8]):
        _run(balancer, model, A, losses, C)
        used.append(balancer.weights.numpy().copy())
    _run(balancer, model, A, [0.5, 0.8], C)
    used.append(balancer.weights.numpy().copy())
    # No ratio for task 1 while an empty window is one of the last two: the weights stay 1
    # (before: (1.21, 0.79) from 0 / 0.9, then (0, 2) from 0.8 / clamp(0, 1e-12)).
    assert np.allclose(np.stack(used), 1.0)


def test_uw_leaves_the_log_variance_of_an_absent_task():
    balancer, model = _make("uw", {"lr": 0.1})
    _run(balancer, model, A_EMPTY, L_EMPTY, C_EMPTY)
    s = balancer.parameters()[0].detach().numpy()
    # Task 0: d/ds (exp(-s) L + s / 2) = 0.5 - 0.7 < 0, so s_0 rises by lr; task 1 stays 0
    # (before: its s / 2 term alone pushed s_1 down by lr on every empty batch).
    assert np.allclose(s, [0.1, 0.0], atol=1e-6)


def test_rlw_draws_over_the_present_tasks():
    balancer, model = _make("rlw", {"seed": 3})
    shared, _ = _run(balancer, model, A_EMPTY, L_EMPTY, C_EMPTY)
    assert np.allclose(balancer.weights.numpy(), [1.0, 0.0])
    assert np.allclose(shared, A_EMPTY[0], atol=1e-6)
    # The draw is still T numbers a step: the next step equals a fresh generator's second draw.
    gen = torch.Generator().manual_seed(3)
    torch.randn(2, generator=gen)
    expected = torch.softmax(torch.randn(2, generator=gen), 0).numpy()
    _run(balancer, model, A, L1, C)
    assert np.allclose(balancer.weights.numpy(), expected)


def test_dbmtl_keeps_an_absent_task_out_of_its_ema_and_the_update():
    balancer, model = _make("dbmtl")
    _run(balancer, model, A, L1, C)
    shared, own = _run(balancer, model, A_EMPTY, [0.35, 0.0], C_EMPTY)
    # Task 0's EMA: 0.9 (0.1 g_0 / 0.7) + 0.1 g_0 / 0.35; task 1's stays 0.1 g_1 / 0.3 and is
    # left out (before: it decayed to 0.09 g_1 / 0.3 and was added at the largest norm).
    buffer0 = 0.9 * 0.1 * A[0] / 0.7 + 0.1 * A[0] / 0.35
    assert np.allclose(shared, buffer0, atol=1e-6)
    assert np.allclose(own, [0.4 / 0.35, 0.0], atol=1e-5)
    kept = balancer.state_dict()["buffer"][1].double().numpy()
    assert np.allclose(kept, 0.1 * A[1] / 0.3, atol=1e-6)


# --- AdaTask: weight decay, absent tasks, train.optimizer -------------------------------------


def _adatask(weight_decay: float, lr: float = 1e-3):
    model = Toy((2,), ("binary", "binary"))
    with torch.no_grad():
        model.shared[0].copy_(torch.tensor([1.0, 1.0]))
    balancer = build_balancer("adatask", model)
    opt = balancer.make_optimizer(list(model.parameters()), lr, weight_decay, optimizer="adam")
    return balancer, model, opt


def _adatask_step(balancer, model, opt, a, b, c):
    opt.zero_grad(set_to_none=True)
    balancer.backward(model.losses(a, b, c))
    opt.step()


@pytest.mark.parametrize("weight_decay", [1e-6, 0.1])
def test_adatask_applies_weight_decay_once_per_shared_parameter(weight_decay):
    # Task 1 (present: loss 0.5, own gradient 1) has no gradient on the shared tensor, task 0 a
    # tiny one on its first coordinate. Before: weight_decay / T * p in each task's stream, each
    # Adam-normalised: ~lr per stream on every coordinate (2e-3 here), whatever weight_decay.
    balancer, model, opt = _adatask(weight_decay)
    a = np.array([[1e-3, 0.0], [0.0, 0.0]])
    _adatask_step(balancer, model, opt, a, [0.5, 0.5], [1.0, 1.0])
    decayed = 1.0 - 1e-3 * weight_decay  # p (1 - lr wd), once
    adam = 1e-3 * 1e-3 / (1e-3 + 1e-8)  # task 0's stream, first Adam step: ~lr
    got = model.shared[0].detach().double().numpy()
    assert np.allclose(got, [decayed - adam, decayed], rtol=0, atol=1e-7)


def test_adatask_without_weight_decay_is_unchanged_by_the_decay_fix():
    balancer, model, opt = _adatask(0.0)
    _adatask_step(balancer, model, opt, np.array([[1e-3, 0.0], [0.0, 0.0]]), [0.5, 0.5], [1, 1])
    got = model.shared[0].detach().double().numpy()
    assert np.allclose(got, [1.0 - 1e-3 * 1e-3 / (1e-3 + 1e-8), 1.0], atol=1e-7)


def test_adatask_absent_task_keeps_its_moments_and_adds_no_step():
    balancer, model, opt = _adatask(0.0, lr=0.01)
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    _adatask_step(balancer, model, opt, a, [0.5, 0.5], [1.0, 1.0])
    p = model.shared[0]
    state = opt.state[p]
    m1, v1 = state["exp_avg"][1].clone(), state["exp_avg_sq"][1].clone()
    before = p.detach().clone()
    _adatask_step(balancer, model, opt, np.array([[1.0, 0.0], [0.0, 0.0]]), [0.5, 0.0], [1, 0])
    assert torch.equal(state["exp_avg"][1], m1) and torch.equal(state["exp_avg_sq"][1], v1)
    # Only task 0's stream moves p: coordinate 1 (task 1's alone) stays put. Before, task 1's
    # zero-gradient stream kept stepping on momentum.
    moved = (p.detach() - before).numpy()
    assert moved[1] == 0.0
    # Task 0's stream on coordinate 0, step 2 of Adam with gradient 1 both times: -lr.
    assert moved[0] == pytest.approx(-0.01, rel=1e-5)


def test_adatask_every_task_absent_moves_no_shared_parameter():
    balancer, model, opt = _adatask(0.0, lr=0.01)
    _adatask_step(balancer, model, opt, np.array([[1.0, 0.0], [0.0, 2.0]]), [0.5, 0.5], [1, 1])
    p = model.shared[0]
    before = p.detach().clone()
    moments = opt.state[p]["exp_avg"].clone()
    _adatask_step(balancer, model, opt, np.zeros((2, 2)), [0.0, 0.0], [0.0, 0.0])
    assert torch.equal(p.detach(), before) and torch.equal(opt.state[p]["exp_avg"], moments)


def test_adatask_refuses_another_optimizer():
    model = Toy()
    balancer = build_balancer("adatask", model)
    with pytest.raises(ConfigError, match=r"train\.optimizer.*'sgd'.*adatask"):
        balancer.make_optimizer(list(model.parameters()), 1e-3, 0.0, optimizer="sgd")
    with pytest.raises(ConfigError, match=r"train\.optimizer"):
        check_optimizer("sgd", "adatask")
    check_optimizer("adam", "adatask")
    check_optimizer("sgd", "pcgrad")  # the trainer's own optimizer: nothing replaced


def test_adatask_says_it_replaces_the_optimizer_when_not_told_which(caplog):
    model = Toy()
    balancer = build_balancer("adatask", model)
    with caplog.at_level(logging.WARNING, logger="mtlrec.balance.recsys"):
        balancer.make_optimizer(list(model.parameters()), 1e-3, 0.0)
    assert "train.optimizer is not used" in caplog.text
