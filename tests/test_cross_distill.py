"""CrossDistil (``cross-distill``, issue 7): the augmented ranking task, calibration, error
correction, warm-up, the planted funnel signal and the shared/task parameter contract."""

from __future__ import annotations

import math

import pytest
import torch

from mtlrec.data.encoder import Encoder
from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models import MTLModel, build_model, describe_models
from mtlrec.models.cross_distill import (
    PlattCalibrator,
    correct_teacher,
    quadruplet_levels,
    quadruplet_loss,
)
from mtlrec.schema import Schema
from mtlrec.train.metrics import auc
from tests.conftest import FUNNEL_SCHEMA, funnel_frame
from tests.model_properties import (
    assert_own_gradients,
    assert_partition,
)
from tests.model_properties import train_steps as _train

torch.set_num_threads(1)

NAME = "cross-distill"
VARIANTS = [
    {},
    {"backbone": "shared-bottom"},
    {"calibrate": False},
    {"correction": "none", "warmup_steps": 0},
]
# Two parallel binary tasks (no depends_on), so every row is observed for both.
PARALLEL = {"features": FUNNEL_SCHEMA["features"], "tasks": [{"name": "click"}, {"name": "buy"}]}


def sp(x: float) -> float:
    """softplus(x) = -ln sigmoid(-x)."""
    return math.log1p(math.exp(x))


@pytest.fixture(scope="module")
def parallel():
    """(encoder, table) with two parallel binary tasks, click and buy."""
    frame = funnel_frame(400, seed=4).rename(columns={"purchase": "buy"})
    enc = Encoder(Schema.from_dict(PARALLEL)).fit(frame)
    return enc, enc.transform(frame)


def with_labels(table: TensorTable, labels: list[list[float]]) -> TensorTable:
    n = len(labels)
    head = table.head(n)
    return TensorTable(head.cat, head.seq, head.num, torch.tensor(labels, dtype=torch.float32))


def _grads(loss: torch.Tensor, params) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True))


def _reached(grads) -> bool:
    return any(g is not None and g.abs().max() > 0 for g in grads)


# --- registry, training --------------------------------------------------------------------------
def test_registered_with_a_one_line_summary():
    line = describe_models()[NAME]
    assert line.startswith("CrossDistil:") and "distilled" in line


def test_learns_the_planted_funnel_signal_and_the_teacher_ranks_by_the_other_task(funnel_tables):
    enc, train, valid = funnel_tables
    torch.manual_seed(0)
    model = build_model(NAME, enc.schema, enc.layout(), {"embed_dim": 8, "warmup_steps": 40})
    history = _train(model, train, steps=120)
    assert int(model.step) == 120 and model.distilling()
    assert sum(history[-10:]) < sum(history[:10])
    model.eval()
    with torch.no_grad():
        out = model(valid)
    cond, _ = model.predict(out)
    labels = valid.labels
    clicked = labels[:, 0] == 1
    assert auc(labels[:, 0].numpy(), cond[:, 0].numpy()) > 0.75
    assert auc(labels[clicked, 1].numpy(), cond[clicked, 1].numpy()) > 0.75
    # The click teacher's augmented order puts (click, purchase) above (click, no purchase):
    # among clicked rows it ranks purchasers first, which click's own label never asks for.
    teacher = out.extras["teacher"]
    assert auc(labels[clicked, 1].numpy(), teacher[clicked, 0].numpy()) > 0.7
    assert auc(labels[:, 0].numpy(), teacher[:, 0].numpy()) > 0.75


def test_distillation_teaches_the_student_the_order_within_its_own_label(funnel_tables):
    """What CrossDistil is for: click's own label says nothing about which clicks convert, but
    its teacher (ordered by click, then purchase) does, and distillation passes that on. Among
    clicked rows the distilled click student ranks purchasers first; without distillation it
    does not."""
    enc, train, valid = funnel_tables
    clicked = valid.labels[:, 0] == 1
    bought = valid.labels[clicked, 1].numpy()
    result = {}
    for warmup in (40, 10**6):
        torch.manual_seed(0)
        model = build_model(
            NAME, enc.schema, enc.layout(), {"embed_dim": 8, "warmup_steps": warmup}
        )
        _train(model, train, steps=120)
        model.eval()
        with torch.no_grad():
            cond, _ = model.predict(model(valid))
        result[warmup] = auc(bought, cond[clicked, 0].numpy())
    assert result[40] > 0.6 and result[40] > result[10**6] + 0.08, result


# --- parameter contract --------------------------------------------------------------------------
@pytest.mark.parametrize("options", VARIANTS)
def test_shared_and_task_parameters_partition_the_model(options, small):
    enc, _ = small
    model = build_model(NAME, enc.schema, enc.layout(), options)
    groups = assert_partition(model)
    assert all(groups), "every task owns some parameters"
    own = set().union(*groups)
    for m in model.task_modules:  # teacher heads and calibrators are their task's
        assert {id(p) for p in m["teacher"].parameters()} <= own


@pytest.mark.parametrize("options", VARIANTS)
def test_task_parameters_get_gradient_only_from_their_task(options, small):
    enc, table = small
    torch.manual_seed(0)
    assert_own_gradients(build_model(NAME, enc.schema, enc.layout(), options), table.head(256))


# --- 1. augmented ranking task -------------------------------------------------------------------
def test_quadruplet_loss_matches_a_hand_computation():
    own = torch.tensor([1.0, 1.0, 0.0, 0.0])
    other = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert quadruplet_levels(own, other).tolist() == [3, 2, 1, 0]
    r = torch.tensor([2.0, 0.5, 1.0, -1.0])
    # (+,+) > (+,-) > (-,+) > (-,-): -ln s(2-0.5) - ln s(0.5-1) - ln s(1-(-1))
    expected = sp(0.5 - 2.0) + sp(1.0 - 0.5) + sp(-1.0 - 1.0)
    assert float(quadruplet_loss(r, own, other)) == pytest.approx(expected, rel=1e-6)

    # Several rows per level, a missing level (no (+,-) row) and a masked-out row: the terms are
    # means over the pairs of consecutive present levels, (+,+) > (-,+) > (-,-).
    own = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    other = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # row 5 would be (+,-): unobserved
    r = torch.tensor([1.0, -0.5, 0.2, 0.3, -2.0, 9.0])
    top = (sp(0.2 - 1.0) + sp(0.2 + 0.5)) / 2
    bottom = (sp(0.3 - 0.2) + sp(-2.0 - 0.2)) / 2
    assert float(quadruplet_loss(r, own, other, mask)) == pytest.approx(top + bottom, rel=1e-6)
    # One level only: nothing to rank.
    assert float(quadruplet_loss(r[:2], own[:2], other[:2])) == 0.0


def test_models_ranking_loss_orders_each_task_by_its_own_label_first(parallel):
    """On four rows, task click orders (1,1) > (1,0) > (0,1) > (0,0) and task buy orders by buy
    first: (1,1) > (0,1) > (1,0) > (0,0) in (click, buy); the aux loss is the sum of both."""
    enc, table = parallel
    torch.manual_seed(0)
    options = {"calibrate": False, "warmup_steps": 10**6, "rank_weight": 2.0}
    model = build_model(NAME, enc.schema, enc.layout(), options)
    batch = with_labels(table, [[1, 1], [1, 0], [0, 1], [0, 0]])
    out = model(batch)
    r = torch.logit(out.extras["teacher"].double()).tolist()  # uncalibrated: sigmoid(score)
    click = sp(r[1][0] - r[0][0]) + sp(r[2][0] - r[1][0]) + sp(r[3][0] - r[2][0])
    buy = sp(r[2][1] - r[0][1]) + sp(r[1][1] - r[2][1]) + sp(r[3][1] - r[1][1])
    assert float(out.extras["rank_loss"]) == pytest.approx(click + buy, rel=1e-4)
    assert float(out.aux_loss.detach()) == pytest.approx(2.0 * (click + buy), rel=1e-4)


def test_a_dependent_tasks_ranking_uses_only_its_observed_rows(small):
    """purchase depends on click: its teacher ranks purchasers over clicked non-purchasers only;
    rows without a click (unobserved for purchase) add no pairs."""
    enc, table = small
    torch.manual_seed(0)
    model = build_model(NAME, enc.schema, enc.layout(), {"calibrate": False, "warmup_steps": 99})
    batch = with_labels(table, [[1, 1], [1, 0], [0, 0], [0, 0]])
    out = model(batch)
    r = torch.logit(out.extras["teacher"].double()).tolist()
    click = sp(r[1][0] - r[0][0]) + (sp(r[2][0] - r[1][0]) + sp(r[3][0] - r[1][0])) / 2
    purchase = sp(r[1][1] - r[0][1])
    assert float(out.extras["rank_loss"]) == pytest.approx(click + purchase, rel=1e-4)


# --- 3. error correction -------------------------------------------------------------------------
def test_error_correction_fixes_a_teacher_that_contradicts_the_labels():
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    logit = torch.tensor([-2.0, 3.0, 1.0, -0.5, 0.4])  # rows 0 and 1 are on the wrong side
    fixed = correct_teacher(logit, labels)
    assert fixed.tolist() == pytest.approx([0.0, 0.0, 1.0, -0.5, 0.4])
    p = torch.sigmoid(fixed)
    pos, neg = p[labels == 1], p[labels == 0]
    assert pos.min() >= neg.max()  # the teacher's cross-label order now agrees with the labels
    assert p[2] > p[4] > p[0] and p[1] > p[3]  # the order within each label is kept
    assert bool((p[labels == 1] > 0.5).sum() == 2)
    with_margin = correct_teacher(logit, labels, margin=1.0)
    assert with_margin.tolist() == pytest.approx([1.0, -1.0, 1.0, -1.0, 1.0])


def _constant_teacher(model: MTLModel, value: float) -> None:
    """Make every teacher head output ``value`` (its last layer: zero weights, bias = value)."""
    with torch.no_grad():
        for m in model.task_modules:
            last = m["teacher"][-1]
            last.weight.zero_()
            last.bias.fill_(value)


@pytest.mark.parametrize("correction", ["clamp", "none"])
def test_the_distilled_soft_labels_are_the_corrected_calibrated_teacher(correction, parallel):
    enc, table = parallel
    torch.manual_seed(0)
    options = {"warmup_steps": 0, "correction": correction, "calibrate": False}
    model = build_model(NAME, enc.schema, enc.layout(), options)
    _constant_teacher(model, 3.0)  # sure every row is positive: wrong for the negatives
    batch = with_labels(table, [[1, 1], [1, 0], [0, 1], [0, 0]])
    out = model(batch)
    labels = batch.labels
    if correction == "clamp":
        soft = torch.where(labels > 0.5, torch.sigmoid(torch.tensor(3.0)), torch.tensor(0.5))
    else:
        soft = torch.full_like(labels, float(torch.sigmoid(torch.tensor(3.0))))
    logits = out.logits.detach()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, soft, reduction="none")
    assert float(out.extras["distill_loss"]) == pytest.approx(float(expected.mean(0).sum()))


# --- 2. calibration ------------------------------------------------------------------------------
def test_platt_calibrator_recovers_a_known_calibration():
    gen = torch.Generator().manual_seed(0)
    scores = 2.0 * torch.randn(20000, generator=gen)
    labels = (torch.rand(20000, generator=gen) < torch.sigmoid(0.5 * scores - 1.0)).float()
    cal = PlattCalibrator()
    opt = torch.optim.Adam(cal.parameters(), lr=0.05)
    ones = torch.ones_like(labels)
    for _ in range(400):
        opt.zero_grad()
        cal.loss(scores, labels, ones).backward()
        opt.step()
    assert float(cal.scale.detach()) == pytest.approx(0.5, abs=0.05)
    assert float(cal.bias.detach()) == pytest.approx(-1.0, abs=0.1)
    p = torch.sigmoid(cal(scores)).detach()
    for lo, hi in [(0.0, 0.2), (0.2, 0.5), (0.5, 1.0)]:  # reliability: predicted ~ observed
        sel = (p >= lo) & (p < hi)
        assert float(p[sel].mean()) == pytest.approx(float(labels[sel].mean()), abs=0.03)
    order = torch.argsort(scores)
    assert bool((p[order].diff() >= 0).all())  # calibration keeps the teacher's order


def test_calibration_and_distillation_gradients_are_isolated(parallel):
    """Bi-level: the calibration loss moves only the calibrators; the distillation loss moves the
    students (and what is under them) but neither the teacher heads nor the calibrators."""
    enc, table = parallel
    torch.manual_seed(0)
    batch = table.head(128)

    model = build_model(NAME, enc.schema, enc.layout(), {"rank_weight": 0.0, "warmup_steps": 99})
    aux = model(batch).aux_loss  # calibration only
    calibrators = [p for m in model.task_modules for p in m["calibrator"].parameters()]
    others = [p for p in model.parameters() if all(p is not c for c in calibrators)]
    assert _reached(_grads(aux, calibrators))
    assert not _reached(_grads(aux, others))

    model = build_model(NAME, enc.schema, enc.layout(), {"warmup_steps": 0})
    out = model(batch)
    calib_only = build_model(NAME, enc.schema, enc.layout(), {"warmup_steps": 99})
    calib_only.load_state_dict(model.state_dict())
    ref = calib_only(batch)
    teachers = [p for m in model.task_modules for p in m["teacher"].parameters()]
    ref_teachers = [p for m in calib_only.task_modules for p in m["teacher"].parameters()]
    for g, h in zip(_grads(out.aux_loss, teachers), _grads(ref.aux_loss, ref_teachers)):
        assert torch.allclose(g, h, atol=1e-6)  # distillation adds nothing to the teachers
    cal = [p for m in model.task_modules for p in m["calibrator"].parameters()]
    ref_cal = [p for m in calib_only.task_modules for p in m["calibrator"].parameters()]
    for g, h in zip(_grads(out.aux_loss, cal), _grads(ref.aux_loss, ref_cal)):
        assert torch.allclose(g, h, atol=1e-6)
    towers = [p for m in model.task_modules for p in m["tower"].parameters()]
    assert _reached(_grads(out.aux_loss, towers))


def test_the_teacher_is_calibrated_after_training(funnel_tables):
    """The ranking loss leaves the teacher's scores on no particular scale (sigmoid of the raw
    score is far off); the calibrator, fitted on the training batches, maps them to
    probabilities whose mean follows each task's positive rate."""
    enc, train, _ = funnel_tables
    torch.manual_seed(0)
    model = build_model(NAME, enc.schema, enc.layout(), {"embed_dim": 8, "warmup_steps": 10**6})
    _train(model, train, steps=150)
    model.eval()
    with torch.no_grad():
        teacher = model(train).extras["teacher"]
    labels = train.labels
    mask = model.observed_mask(labels) > 0
    bce = torch.nn.functional.binary_cross_entropy
    for t, module in enumerate(model.task_modules):
        cal = module["calibrator"]
        y, p = labels[mask[:, t], t], teacher[mask[:, t], t]
        raw = torch.sigmoid((torch.logit(p) - cal.bias) / cal.scale).detach()
        assert float(p.mean()) == pytest.approx(float(y.mean()), abs=0.05), t
        assert abs(float(raw.mean() - y.mean())) > 0.1, t  # uncalibrated: off
        assert float(bce(p, y)) < 0.85 * float(bce(raw, y)), t


# --- warm-up -------------------------------------------------------------------------------------
def test_distillation_starts_only_after_the_warm_up(parallel):
    enc, table = parallel
    torch.manual_seed(0)
    model = build_model(NAME, enc.schema, enc.layout(), {"warmup_steps": 3})
    batch = table.head(128)
    towers = [p for m in model.task_modules for p in m["tower"].parameters()]
    model.eval()  # evaluation and no-grad passes do not count as steps
    model(batch)
    with torch.no_grad():
        model.train()(batch)
    assert int(model.step) == 0
    for step in range(1, 6):
        out = model(batch)
        on = step > 3
        assert (float(out.extras["distill_loss"]) > 0) == on, step
        assert _reached(_grads(out.aux_loss, towers)) == on, step
    assert int(model.step) == 5
    # The counter is saved with the model: a resumed run does not warm up again.
    fresh = build_model(NAME, enc.schema, enc.layout(), {"warmup_steps": 3})
    assert not fresh.distilling()
    fresh.load_state_dict(model.state_dict())
    assert fresh.distilling() and float(fresh(batch).extras["distill_loss"]) > 0


def test_no_labels_no_aux_loss(small):
    enc, table = small
    model = build_model(NAME, enc.schema, enc.layout())
    head = table.head(8)
    out = model(TensorTable(head.cat, head.seq, head.num, torch.zeros(8, 0)))
    assert out.aux_loss is None and out.logits.shape == (8, 2)
    with torch.no_grad():
        assert model(head).aux_loss is None


# --- configuration -------------------------------------------------------------------------------
def test_bad_configs_are_refused_naming_the_key(small, parallel_schema):
    enc, frame_table = small
    one_task = Schema.from_dict({"features": FUNNEL_SCHEMA["features"], "tasks": [{"name": "c"}]})
    frame = funnel_frame(50, seed=0).rename(columns={"click": "c"})
    enc1 = Encoder(one_task).fit(frame)
    with pytest.raises(ConfigError, match="at least two tasks"):
        build_model(NAME, enc1.schema, enc1.layout())
    enc2 = Encoder(parallel_schema).fit(funnel_frame(50, seed=0))
    with pytest.raises(ConfigError, match="binary tasks.*score"):
        build_model(NAME, enc2.schema, enc2.layout())
    bad = {
        "distill_weight": -1.0,
        "rank_weight": -0.5,
        "warmup_steps": -1,
        "correction_margin": -0.1,
        "backbone": "ple",
        "correction": "blend",
        "num_experts": 0,
        "calibrator_speed": 0.0,
    }
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=f"model.{key}"):
            build_model(NAME, enc.schema, enc.layout(), {key: value})
    with pytest.raises(ConfigError, match="model.bottom_hidden"):
        build_model(
            NAME, enc.schema, enc.layout(), {"backbone": "shared-bottom", "bottom_hidden": []}
        )
