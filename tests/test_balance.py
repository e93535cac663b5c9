"""Balancers: every method trains every kind of model, and each rule matches a hand computation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mtlrec.balance import aggregators as agg
from mtlrec.balance import build_balancer
from mtlrec.balance.grads import trainable
from mtlrec.balance.recsys import AdaTaskAdam
from mtlrec.cli import app
from mtlrec.config import TrainConfig
from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.train.trainer import Trainer
from tests.conftest import encoded_funnel, funnel_frame

NAMES = [
    "ew",
    "fixed",
    "uw",
    "dwa",
    "gradnorm",
    "rlw",
    "dbmtl",
    "famo",
    "mgda",
    "pcgrad",
    "cagrad",
    "gradvac",
    "imtl",
    "nashmtl",
    "alignedmtl",
    "metabalance",
    "adatask",
]
MODELS = ["shared-bottom", "mmoe", "esmm", "aitm", "single-task"]
STATEFUL = ["uw", "dwa", "gradnorm", "rlw", "dbmtl", "famo"]
STATEFUL += ["pcgrad", "gradvac", "nashmtl", "metabalance"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small():
    """(encoder, table): 1,200 planted-signal funnel rows (click -> purchase)."""
    return encoded_funnel(1200)


def _model(enc, name: str = "shared-bottom", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(name, enc.schema, enc.layout(), {"embed_dim": 4})


def _optimizer(balancer, model, lr: float):
    params = trainable(model.parameters())
    made = balancer.make_optimizer(params, lr=lr, weight_decay=0.0)
    return made if made is not None else torch.optim.Adam(params, lr=lr)


def _step(model, balancer, batch) -> torch.Tensor:
    out = model(batch)
    return balancer.backward(model.task_losses(out, batch), out.aux_loss)


def _grads(model) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _task_grad(model, batch, task: int, params) -> list[torch.Tensor]:
    """Autograd of one task's loss alone (zeros where it does not reach a parameter)."""
    losses = model.task_losses(model(batch), batch)
    grads = torch.autograd.grad(losses[task], params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


# --- registry and options ---------------------------------------------------------------------


def test_list_balancers_prints_exactly_the_methods():
    result = CliRunner().invoke(app, ["list", "balancers"])
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.output.splitlines()] == NAMES


def test_unknown_or_bad_options_name_the_key(small):
    enc, _ = small
    model = _model(enc)
    with pytest.raises(ConfigError, match=r"balance\.sed"):
        build_balancer("pcgrad", model, {"sed": 1})
    with pytest.raises(ConfigError, match=r"balance\.c\b"):
        build_balancer("cagrad", model, {"c": "big"})
    with pytest.raises(ConfigError, match=r"balance\.beta"):
        build_balancer("gradvac", model, {"beta": 2.0})
    assert build_balancer("gradnorm", model, {"alpha": 2}).config.alpha == 2.0
    with pytest.raises(ConfigError, match=r"balance\.seed must be an integer, got 2.5"):
        build_balancer("pcgrad", model, {"seed": 2.5})  # not silently seed 2
    with pytest.raises(ConfigError, match=r"balance\.alpha must be a number, got True"):
        build_balancer("gradnorm", model, {"alpha": True})


# --- every balancer on every kind of model ----------------------------------------------------


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("name", NAMES)
def test_every_balancer_trains_every_model(name, model_name, small):
    enc, table = small
    model = _model(enc, model_name)
    model.unused = nn.Linear(3, 3)  # shared by nobody: must keep no (or a zero) gradient
    balancer = build_balancer(name, model)
    opt = _optimizer(balancer, model, lr=0.02)
    with torch.no_grad():
        before = float(model.task_losses(model(table), table).sum())
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        for batch in table.batches(200, shuffle=True, generator=gen):
            opt.zero_grad(set_to_none=True)
            total = _step(model, balancer, batch)
            assert total.dim() == 0 and not total.requires_grad and math.isfinite(float(total))
            assert model.unused.weight.grad is None or not model.unused.weight.grad.any()
            for p in model.parameters():
                assert p.grad is None or torch.isfinite(p.grad).all()
            opt.step()
    with torch.no_grad():
        after = float(model.task_losses(model(table), table).sum())
    assert after < before, (before, after)


# --- hand-computed rules ----------------------------------------------------------------------


def _gram(g: torch.Tensor) -> torch.Tensor:
    return g.double() @ g.double().T


def _combine(coef: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return coef.double() @ g.double()


def test_pcgrad_projects_on_the_original_gradients():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    out = _combine(agg.pcgrad_coefficients(_gram(g), torch.Generator().manual_seed(0)), g)
    # g1 - (g1.g2/|g2|^2) g2 = (0.5, 0.5); g2 - (g2.g1/|g1|^2) g1 = (0, 1): the ORIGINAL g1.
    assert torch.allclose(out, torch.tensor([0.5, 1.5], dtype=torch.float64))
    agree = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    out = _combine(agg.pcgrad_coefficients(_gram(agree), torch.Generator()), agree)
    assert torch.allclose(out, torch.tensor([2.0, 1.0], dtype=torch.float64))


def test_mgda_min_norm_point_matches_the_closed_form():
    g = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    g1, g2 = g.double()
    gamma = float((g2 - g1) @ g2 / (g1 - g2).pow(2).sum())  # weight of g1: 1/5
    alpha = agg.min_norm_coefficients(_gram(g))
    assert torch.allclose(alpha, torch.tensor([gamma, 1 - gamma], dtype=torch.float64))
    # Three tasks: the min-norm point w satisfies g_t . w >= |w|^2, with equality where alpha_t > 0.
    g3 = torch.tensor([[1.0, 0.2, 0.0, 0.3], [-0.5, 1.0, 0.1, 0.0], [0.2, -0.4, 1.0, 0.5]])
    alpha = agg.min_norm_coefficients(_gram(g3))
    w = _combine(alpha, g3)
    slack = g3.double() @ w - w @ w
    assert alpha.sum().item() == pytest.approx(1.0) and (alpha >= 0).all()
    assert (slack > -1e-4).all() and (slack[alpha > 1e-3].abs() < 1e-4).all()


def test_cagrad_with_c_zero_is_the_mean_and_solves_the_dual():
    g = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5]])
    assert torch.allclose(_combine(agg.cagrad_coefficients(_gram(g), 0.0), g), g.double().mean(0))
    c = 0.5
    m = _gram(g)
    g0 = g.double().mean(0)
    root_phi = c * g0.norm()
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    ws = torch.stack([grid, 1 - grid], 1)
    objective = ws @ m @ torch.full((2,), 0.5, dtype=torch.float64) + root_phi * (
        (ws @ m * ws).sum(1).sqrt()
    )
    w = ws[objective.argmin()]
    gw = _combine(w, g)
    expected = g0 + root_phi / gw.norm() * gw
    assert torch.allclose(_combine(agg.cagrad_coefficients(m, c), g), expected, atol=1e-3)


def test_cagrad_balancer_with_c_zero_gives_the_mean_gradient(small):
    enc, table = small
    model = _model(enc)
    batch = table.head(300)
    shared = trainable(model.shared_parameters())
    expected = [(a + b) / 2 for a, b in zip(*(_task_grad(model, batch, t, shared) for t in (0, 1)))]
    _step(model, build_balancer("cagrad", model, {"c": 0.0}), batch)
    assert torch.allclose(_flat([p.grad for p in shared]), _flat(expected), atol=1e-6)


def test_imtl_equalises_projections_on_unit_gradients():
    g = torch.tensor([[1.0, 0.3, 0.0, 2.0], [0.1, -1.0, 0.5, 0.0], [-0.4, 0.2, 3.0, 0.1]])
    alpha = agg.imtl_coefficients(_gram(g))
    out = _combine(alpha, g)
    units = g.double() / g.double().norm(dim=1, keepdim=True)
    proj = units @ out
    assert alpha.sum().item() == pytest.approx(1.0)
    assert torch.allclose(proj, proj[0].expand(3), atol=1e-9)


def test_aligned_mtl_by_hand():
    g = torch.tensor([[0.0, 2.0], [2.0, 0.0]])  # orthogonal, equal norms: unchanged, summed
    assert torch.allclose(_combine(agg.aligned_coefficients(_gram(g)), g), g.double().sum(0))
    # Orthogonal with norms 3 and 1: every singular value set to sigma_min = 1, so each gradient
    # is rescaled to norm 1: (1/3) g1 + g2.
    g = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    coef = agg.aligned_coefficients(_gram(g))
    assert torch.allclose(coef, torch.tensor([1 / 3, 1.0], dtype=torch.float64))


def test_nash_solution_satisfies_the_bargaining_equation():
    # Paper (Alg. 1): G^T G alpha = 1 / alpha on the RAW Gram matrix. G = diag(2, 1): Gram
    # diag(4, 1), alpha_t = 1 / |g_t| = (0.5, 1), update (1, 1) of norm sqrt(T) = sqrt(2).
    g = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    alpha = agg.nash_coefficients(_gram(g))
    assert torch.allclose(alpha, torch.tensor([0.5, 1.0], dtype=torch.float64), rtol=1e-4)
    assert torch.allclose(_combine(alpha, g), torch.ones(2, dtype=torch.float64), rtol=1e-4)
    # At 0.01 x the gradients alpha is 100 x larger and the update the same (the authors' code
    # gives the same; the previous normalised-Gram solution shrank the update with the scale).
    small = 0.01 * g
    alpha = agg.nash_coefficients(_gram(small))
    assert torch.allclose(alpha, torch.tensor([50.0, 100.0], dtype=torch.float64), rtol=1e-4)
    assert torch.allclose(_combine(alpha, small), torch.ones(2, dtype=torch.float64), rtol=1e-4)
    g = torch.tensor([[1.0, 0.5, 0.0], [-0.3, 1.0, 0.2], [0.4, 0.1, -2.0]])
    m = _gram(g)  # raw
    alpha = agg.nash_coefficients(m)
    assert (alpha > 0).all()
    assert torch.allclose(alpha * (m @ alpha), torch.ones(3, dtype=torch.float64), atol=1e-4)
    # The authors' solver (cvxpy + ECOS, transcribed in the audit) on this matrix.
    authors = torch.tensor([0.74275, 0.96801, 0.49845], dtype=torch.float64)
    assert torch.allclose(alpha, authors, atol=1e-4)
    assert float(_combine(alpha, g).norm()) == pytest.approx(3**0.5, rel=1e-4)
    # A warm start from a previous (raw-scale) solution lands on the same point.
    again = agg.nash_coefficients(1e-4 * m, start=alpha)
    assert torch.allclose(again, alpha * 100, rtol=1e-6)


def test_gradvac_raises_the_cosine_to_its_target():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cosine 0
    targets = torch.full((2, 2), 0.5, dtype=torch.float64)
    rows = []
    for i in range(2):
        t = targets.clone()
        t[1 - i] = -1.0  # only task i is below its target
        coef = agg.gradvac_coefficients(_gram(g), t, 0.01, torch.Generator())
        rows.append((coef, t))
    # Task 0's vaccinated gradient g0' = g0 + k g1 has cosine 0.5 with g1 and g0' . g0 = |g0|^2.
    coef, t = rows[0]
    g0 = torch.tensor([1.0, coef[1] - 1.0], dtype=torch.float64)  # g0' = sum - g1
    assert float(g0 @ g[1].double() / g0.norm()) == pytest.approx(0.5)
    assert float(t[0, 1]) == pytest.approx(0.99 * 0.5 + 0.01 * 0.0)
    # With zero targets the first step equals PCGrad on a conflict.
    c = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    zero = torch.zeros(2, 2, dtype=torch.float64)
    vac = _combine(agg.gradvac_coefficients(_gram(c), zero, 0.01, torch.Generator()), c)
    assert torch.allclose(vac, torch.tensor([0.5, 1.5], dtype=torch.float64))


def test_pcgrad_balancer_task_parameters_get_exactly_their_own_gradient(small):
    enc, table = small
    model = _model(enc)
    batch = table.head(300)
    shared = trainable(model.shared_parameters())
    per_task = [_flat(_task_grad(model, batch, t, shared)) for t in (0, 1)]
    own = [_task_grad(model, batch, t, group) for t, group in enumerate(model.task_parameters())]
    _step(model, build_balancer("pcgrad", model), batch)
    for group, expected in zip(model.task_parameters(), own):
        for p, e in zip(group, expected):
            assert torch.allclose(p.grad, e, atol=1e-7)
    g = torch.stack(per_task)
    coef = agg.pcgrad_coefficients(_gram(g), torch.Generator().manual_seed(0))
    got = _flat([p.grad for p in shared])
    assert torch.allclose(got, _combine(coef, g).float(), atol=1e-6)


def test_mgda_scales_task_parameters_by_alpha(small):
    enc, table = small
    model = _model(enc)
    batch = table.head(300)
    own = [_task_grad(model, batch, t, g) for t, g in enumerate(model.task_parameters())]
    balancer = build_balancer("mgda", model)
    _step(model, balancer, batch)
    alpha = balancer.weights
    assert alpha.sum().item() == pytest.approx(1.0)
    for t, (group, expected) in enumerate(zip(model.task_parameters(), own)):
        for p, e in zip(group, expected):
            assert torch.allclose(p.grad, alpha[t] * e, atol=1e-7)


@pytest.mark.parametrize("name", ["mgda", "imtl", "famo", "nashmtl"])
def test_a_batch_without_clicks_leaves_the_purchase_task_absent(name, small):
    """No clicked row: the purchase loss is exactly 0 with a zero gradient, so the step is the
    click task's alone (before, MGDA and IMTL-G returned a zero update and FAMO divided it by
    ~1e8). Nash-MTL with one present task steps by g / |g| (unit norm, not clipped further)."""
    enc, table = small
    model = _model(enc)
    batch = table.take((table.labels[:, 0] == 0).nonzero().flatten()[:64])
    shared = trainable(model.shared_parameters())
    click = _flat(_task_grad(model, batch, 0, shared))
    assert float(model.task_losses(model(batch), batch)[1].detach()) == 0.0
    _step(model, build_balancer(name, model), batch)
    got = _flat([torch.zeros_like(p) if p.grad is None else p.grad for p in shared])
    expected = click / click.norm() if name == "nashmtl" else click
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    for p in model.task_parameters()[1]:
        assert p.grad is None or not p.grad.any()


def test_gradnorm_weights_move_and_keep_summing_to_the_task_count(small):
    enc, table = small
    model = _model(enc)
    balancer = build_balancer("gradnorm", model, {"lr": 0.05})
    opt = _optimizer(balancer, model, 0.02)
    for batch in table.batches(100):
        opt.zero_grad(set_to_none=True)
        _step(model, balancer, batch)
        opt.step()
        assert balancer.weights.sum().item() == pytest.approx(2.0, abs=1e-5)
        assert (balancer.weights > 0).all()
    assert not torch.allclose(balancer.weights, torch.ones(2))


def test_uw_weights_are_exp_minus_log_variance_and_learned(parallel_schema):
    frame = funnel_frame(400, seed=4)
    enc = Encoder(parallel_schema).fit(frame)  # click (binary), score (regression)
    table = enc.transform(frame)
    model = build_model("shared-bottom", enc.schema, enc.layout(), {"embed_dim": 4})
    balancer = build_balancer("uw", model, {"lr": 0.1})
    s = balancer.parameters()[0]
    assert torch.allclose(balancer.weights, torch.tensor([1.0, 0.5]))
    out = model(table)
    losses = model.task_losses(out, table)
    balancer.backward(losses, out.aux_loss)
    # First Adam step moves s by -lr * sign(d/ds), d/ds = 1/2 - c_t exp(-s_t) L_t at s = 0.
    grad = 0.5 - torch.tensor([1.0, 0.5]) * losses.detach()
    assert torch.allclose(s.detach(), -0.1 * torch.sign(grad), atol=1e-6)
    expected = torch.tensor([1.0, 0.5]) * torch.exp(-s.detach())
    assert torch.allclose(balancer.weights, expected)


def test_metabalance_with_relax_one_matches_the_target_magnitude(small):
    enc, table = small
    model = _model(enc)
    balancer = build_balancer("metabalance", model, {"relax_factor": 1.0})
    shared = trainable(model.shared_parameters())
    ema = torch.zeros(2, len(shared))
    checked = 0
    for step, batch in enumerate(table.batches(300)):
        if step == 3:
            break
        grads = [_task_grad(model, batch, t, shared) for t in (0, 1)]
        norms = torch.tensor([[float(g.norm()) for g in task] for task in grads])
        ema = 0.9 * ema + 0.1 * norms
        for p in model.parameters():
            p.grad = None
        _step(model, balancer, batch)
        for k, p in enumerate(shared):
            aux = p.grad - grads[0][k]  # the auxiliary task's rescaled gradient
            ratio = ema[0, k] / (ema[1, k] + 1e-5)
            assert torch.allclose(aux, grads[1][k] * ratio, rtol=1e-4, atol=1e-8)
            if step == 0 and ema[1, k] > 1e-3:  # first step: |scaled aux| = |target| (+ eps)
                assert float(aux.norm()) == pytest.approx(float(grads[0][k].norm()), rel=0.02)
                checked += 1
    assert checked >= 1


def test_adatask_keeps_one_adam_per_task_on_shared_parameters(small):
    enc, table = small
    model = _model(enc)
    balancer = build_balancer("adatask", model)
    trainer = Trainer(model, balancer, TrainConfig(lr=0.01, batch_size=300, progress=False))
    assert isinstance(trainer.optimizer, AdaTaskAdam)
    batch = table.head(300)
    shared = trainable(model.shared_parameters())
    per_task = [_task_grad(model, batch, t, shared) for t in (0, 1)]
    own = [_task_grad(model, batch, t, g) for t, g in enumerate(model.task_parameters())]
    before = [p.detach().clone() for p in model.parameters()]
    trainer.optimizer.zero_grad(set_to_none=True)
    _step(model, balancer, batch)
    trainer.optimizer.step()
    # Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g), once per task stream.
    moved = {id(p): p.detach() - b for p, b in zip(model.parameters(), before)}
    for p, g0, g1 in zip(shared, *per_task):
        expected = -0.01 * (g0 / (g0.abs() + 1e-8) + g1 / (g1.abs() + 1e-8))
        assert torch.allclose(moved[id(p)], expected, atol=1e-5)
    for group, grads in zip(model.task_parameters(), own):
        for p, g in zip(group, grads):
            assert torch.allclose(moved[id(p)], -0.01 * g / (g.abs() + 1e-8), atol=1e-5)


# --- state ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STATEFUL)
def test_state_dict_round_trip_continues_identically(name, small):
    enc, table = small
    options = {"window": 2} if name == "dwa" else {}
    model = _model(enc)
    balancer = build_balancer(name, model, options)
    batches = list(table.batches(200))
    opt = _optimizer(balancer, model, 0.02)
    for batch in batches[:4]:
        opt.zero_grad(set_to_none=True)
        _step(model, balancer, batch)
        opt.step()
    twin = copy.deepcopy(model)
    restored = build_balancer(name, twin, options)
    restored.load_state_dict(copy.deepcopy(balancer.state_dict()))
    for m, b in ((model, balancer), (twin, restored)):
        for p in m.parameters():
            p.grad = None
        _step(m, b, batches[4])
    for a, b in zip(_grads(model), _grads(twin)):
        assert (a is None and b is None) or torch.equal(a, b)
    if balancer.weights is not None:
        assert torch.equal(balancer.weights, restored.weights)


def test_trainer_checkpoint_resumes_a_stateful_balancer(small, tmp_path):
    enc, table = small
    cfg = TrainConfig(epochs=1, lr=0.01, batch_size=300, progress=False)
    for name in ("famo", "adatask"):
        model = _model(enc)
        trainer = Trainer(model, build_balancer(name, model), cfg, tmp_path / f"{name}.pt")
        trainer.fit(table, table)
        state = torch.load(tmp_path / f"{name}.pt", weights_only=False)
        twin = _model(enc, seed=1)
        resumed = Trainer(twin, build_balancer(name, twin), cfg)
        resumed.load_state(state)
        assert resumed.start_epoch == 1
        if name == "famo":
            assert torch.equal(resumed.balancer.weights, trainer.balancer.weights)
        else:  # the per-task moments live in the optimizer's state: [T, *shape]
            assert isinstance(resumed.optimizer, AdaTaskAdam)
            p = trainable(twin.shared_parameters())[0]
            assert resumed.optimizer.state[p]["exp_avg"].shape == (2, *p.shape)
