"""Cascaded and selection-bias models: probability chains, estimators on hand examples, training,
and the shared/task parameter contract (the same two properties tests/test_models.py checks)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from mtlrec.balance import build_balancer
from mtlrec.cli import app
from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.models.debias import dr_risk, imputation_loss, inverse_propensity, ipw_risk
from mtlrec.schema import Schema
from mtlrec.train.metrics import auc
from tests.conftest import FUNNEL_SCHEMA, funnel_frame
from tests.model_properties import assert_own_gradients, assert_partition

torch.set_num_threads(1)

NEW = ["esm2", "apem", "multi-ipw", "multi-dr", "escm2", "dbmtl"]
TWO_STEP = [m for m in NEW if m != "esm2"]  # ESM2 needs a D-action task
VARIANTS = [  # (model, options) beyond the defaults whose parameter groups differ
    ("multi-ipw", {"detach_propensity": False}),
    ("multi-dr", {"imputation": "error"}),
    ("escm2", {"variant": "dr"}),
    ("escm2", {"variant": "dr", "imputation": "error", "detach_propensity": False}),
]


def _frame3(n: int, seed: int):
    """The planted funnel plus a cart step: every purchase was carted, some clicks too."""
    frame = funnel_frame(n, seed=seed)
    rng = np.random.default_rng(seed + 100)
    frame["cart"] = (
        frame["click"].eq(1) & (frame["purchase"].eq(1) | (rng.random(n) < 0.3))
    ).astype(int)
    return frame


def _schema3(purchase_after: str) -> Schema:
    tasks = [
        {"name": "click"},
        {"name": "cart", "depends_on": "click"},
        {"name": "purchase", "depends_on": purchase_after},
    ]
    return Schema.from_dict({"features": FUNNEL_SCHEMA["features"], "tasks": tasks})


def _tables(schema: Schema):
    train, valid = _frame3(3000, 1), _frame3(1000, 2)
    enc = Encoder(schema).fit(train)
    return enc, enc.transform(train), enc.transform(valid)


@pytest.fixture(scope="module")
def funnel3():
    """click -> cart, click -> purchase (ESM2's D-action layout)."""
    return _tables(_schema3("click"))


@pytest.fixture(scope="module")
def chain3():
    """click -> cart -> purchase (a three-step chain)."""
    return _tables(_schema3("cart"))


def _train(model, table, steps: int, lr: float = 0.01):
    torch.manual_seed(0)
    bal = build_balancer("ew", model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    done = 0
    while done < steps:
        for batch in table.batches(256, shuffle=True, generator=gen):
            out = model(batch)
            losses = model.task_losses(out, batch)
            opt.zero_grad()
            bal.backward(losses, out.aux_loss)
            opt.step()
            done += 1
            if done == steps:
                break


def _loss(model, table) -> float:
    with torch.no_grad():
        out = model(table)
        total = model.task_losses(out, table).sum()
        if out.aux_loss is not None:
            total = total + out.aux_loss
    return float(total)


# --- registry and CLI ---------------------------------------------------------------------------


def test_cli_lists_the_new_models_and_datasets():
    runner = CliRunner()
    models = runner.invoke(app, ["list", "models"])
    assert models.exit_code == 0
    names = {line.split("\t")[0] for line in models.output.splitlines() if line.strip()}
    assert set(NEW) <= names
    datasets = runner.invoke(app, ["list", "datasets"])
    names = {line.split("\t")[0] for line in datasets.output.splitlines() if line.strip()}
    assert {"synthetic-funnel", "coat"} <= names


# --- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TWO_STEP)
def test_new_models_learn_the_funnel_fixture(name, funnel_tables):
    enc, train, valid = funnel_tables
    torch.manual_seed(0)
    model = build_model(name, enc.schema, enc.layout(), {"embed_dim": 8})
    before = _loss(model, train)
    _train(model, train, steps=80)
    after = _loss(model, train)
    assert after < before * 0.8, (before, after)
    with torch.no_grad():
        cond, joint = model.predict(model(valid))
    assert ((cond >= 0) & (cond <= 1)).all() and ((joint >= 0) & (joint <= 1)).all()
    y = valid.labels
    clicked = y[:, 0] == 1
    assert auc(y[:, 0].numpy(), cond[:, 0].numpy()) > 0.75
    assert auc(y[clicked, 1].numpy(), cond[clicked, 1].numpy()) > 0.7


@pytest.mark.parametrize("name", NEW)
def test_new_models_learn_a_three_task_funnel(name, funnel3):
    enc, train, _ = funnel3
    torch.manual_seed(0)
    model = build_model(name, enc.schema, enc.layout(), {"embed_dim": 8})
    before = _loss(model, train)
    _train(model, train, steps=60)
    assert _loss(model, train) < before * 0.8


# --- the two parameter-group properties ---------------------------------------------------------


def _cases():
    for name in NEW:
        yield name, {}, "funnel3"
        if name != "esm2":
            yield name, {}, "funnel2"
    for name, options in VARIANTS:
        yield name, options, "funnel3"


CASES = list(_cases())


@pytest.fixture
def tables_by_name(funnel_tables, funnel3):
    return {"funnel2": funnel_tables, "funnel3": funnel3}


@pytest.mark.parametrize("name,options,data", CASES)
def test_shared_and_task_parameters_partition_the_model(name, options, data, tables_by_name):
    enc, _, _ = tables_by_name[data]
    groups = assert_partition(build_model(name, enc.schema, enc.layout(), options))
    assert any(groups), "every model owns at least one task-specific parameter"


@pytest.mark.parametrize("name,options,data", CASES)
def test_task_parameters_get_gradient_only_from_their_task(name, options, data, tables_by_name):
    enc, train, _ = tables_by_name[data]
    model = build_model(name, enc.schema, enc.layout(), options)
    batch = train.head(256)
    assert model(batch).aux_loss is None  # every term is attributed to a task
    assert_own_gradients(model, batch)


# --- probability chains -------------------------------------------------------------------------


def test_esm2_composes_its_four_towers_by_hand(funnel3):
    enc, train, _ = funnel3
    model = build_model("esm2", enc.schema, enc.layout())
    batch = train.head(50)
    out = model(batch)
    cond, joint = model.predict(out)
    with torch.no_grad():
        x = model.embedding(batch)
        y1 = torch.sigmoid(model.task_modules[0](x)).squeeze(1)
        y2 = torch.sigmoid(model.task_modules[1](x)).squeeze(1)
        y3 = torch.sigmoid(model.task_modules[2]["after_daction"](x)).squeeze(1)
        y4 = torch.sigmoid(model.task_modules[2]["after_oaction"](x)).squeeze(1)
    cvr = y2 * y3 + (1 - y2) * y4
    assert torch.allclose(cond[:, 0], y1, atol=1e-6)
    assert torch.allclose(cond[:, 1], y2, atol=1e-6)
    assert torch.allclose(cond[:, 2], cvr, atol=1e-5)
    assert torch.allclose(joint[:, 1], y1 * y2, atol=1e-6)  # CTAVR
    assert torch.allclose(joint[:, 2], y1 * cvr, atol=1e-6)  # CTCVR
    # losses: CTR, CTAVR, CTCVR over all impressions
    losses = model.task_losses(out, batch)
    labels = batch.labels
    for t, p in enumerate((y1, y1 * y2, y1 * cvr)):
        expected = F.binary_cross_entropy(p, labels[:, t])
        assert losses[t].item() == pytest.approx(expected.item(), rel=1e-4)


def test_esm2_picks_or_names_its_daction_task(funnel3, funnel_tables):
    enc, _, _ = funnel3
    model = build_model("esm2", enc.schema, enc.layout())
    assert (model.idx_click, model.idx_daction, model.idx_buy) == (0, 1, 2)
    assert build_model("esm2", enc.schema, enc.layout(), {"daction_task": "cart"}).idx_daction == 1
    with pytest.raises(ConfigError, match="daction_task"):
        build_model("esm2", enc.schema, enc.layout(), {"daction_task": "click"})
    enc2, _, _ = funnel_tables
    with pytest.raises(ConfigError, match="three tasks"):
        build_model("esm2", enc2.schema, enc2.layout())
    chain = _schema3("cart")
    with pytest.raises(ConfigError, match="must depend on a task without depends_on"):
        build_model("esm2", chain, Encoder(chain).fit(_frame3(200, 3)).layout())


def test_esmm_chain_of_three_multiplies_down_the_funnel(chain3):
    enc, train, _ = chain3
    model = build_model("esmm", enc.schema, enc.layout())
    batch = train.head(64)
    out = model(batch)
    cond, joint = model.predict(out)
    assert torch.allclose(joint[:, 1], cond[:, 0] * cond[:, 1])
    assert torch.allclose(joint[:, 2], cond[:, 0] * cond[:, 1] * cond[:, 2])
    assert ((joint[:, 2] <= joint[:, 1]) & (joint[:, 1] <= joint[:, 0])).all()
    losses = model.task_losses(out, batch)
    for t in range(3):
        expected = F.binary_cross_entropy(joint[:, t], batch.labels[:, t])
        assert losses[t].item() == pytest.approx(expected.item(), rel=1e-4)


def test_aitm_chain_of_three_ratios_and_penalty(chain3):
    enc, train, _ = chain3
    model = build_model("aitm", enc.schema, enc.layout(), {"calibration_weight": 0.6})
    out = model(train.head(64))
    y = out.joint
    cond, joint = model.predict(out)
    assert torch.allclose(joint, y)
    for t in (1, 2):  # conditional = ratio of consecutive entire-space probabilities
        ratio = (y[:, t] / y[:, t - 1]).clamp(max=1 - 1e-7)
        assert torch.allclose(cond[:, t], ratio, atol=1e-5)
    expected = 0.6 * (torch.relu(y[:, 1] - y[:, 0]) + torch.relu(y[:, 2] - y[:, 1])).mean()
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_aitm_penalty_is_zero_when_each_step_is_rarer_than_the_last(chain3):
    enc, train, _ = chain3
    model = build_model("aitm", enc.schema, enc.layout())
    with torch.no_grad():  # heads ignore their input: y = sigmoid(bias), decreasing down the chain
        for t, bias in enumerate((2.0, -1.0, -4.0)):
            head = model.task_modules[t]["head"]
            head.weight.zero_()
            head.bias.fill_(bias)
    out = model(train.head(32))
    assert (out.joint[:, 1] <= out.joint[:, 0]).all() and (out.joint[:, 2] <= out.joint[:, 1]).all()
    assert out.aux_loss.item() == 0.0
    with torch.no_grad():  # a later step more likely than the one before: penalised
        model.task_modules[2]["head"].bias.fill_(0.0)
    out = model(train.head(32))
    expected = 0.6 * (torch.sigmoid(torch.tensor(0.0)) - torch.sigmoid(torch.tensor(-1.0)))
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_apem_and_causal_models_chain_their_joint(funnel3):
    enc, train, _ = funnel3
    for name in ("apem", "multi-ipw", "multi-dr", "escm2", "dbmtl"):
        model = build_model(name, enc.schema, enc.layout())
        cond, joint = model.predict(model(train.head(16)))
        assert torch.allclose(joint[:, 1], cond[:, 0] * cond[:, 1]), name
        assert torch.allclose(joint[:, 2], cond[:, 0] * cond[:, 2]), name


def test_apem_selector_is_a_distribution_over_shared_and_own_patterns(funnel_tables):
    enc, train, _ = funnel_tables
    model = build_model(
        "apem", enc.schema, enc.layout(), {"shared_patterns": 3, "step_patterns": 2}
    )
    sel = model(train.head(5)).extras["selection"]
    assert sel.shape == (5, 2, 5)
    assert torch.allclose(sel.sum(-1), torch.ones(5, 2))


def test_dbmtl_child_tower_reads_the_parent_hidden_state(funnel_tables, parallel_schema):
    enc, train, _ = funnel_tables
    model = build_model("dbmtl", enc.schema, enc.layout())
    batch = train.head(8)
    before = model(batch).logits.detach()
    with torch.no_grad():  # the click tower's hidden layer moves the purchase logit too
        model.task_modules[0]["hidden"][0].weight.mul_(2.0)
    after = model(batch).logits.detach()
    assert not torch.allclose(before[:, 1], after[:, 1])
    assert "link" not in model.task_modules[0] and "link" in model.task_modules[1]
    # parallel tasks, one of them regression: plain shared-bottom towers, no link
    frame = funnel_frame(300, seed=4)
    penc = Encoder(parallel_schema).fit(frame)
    parallel = build_model("dbmtl", parallel_schema, penc.layout())
    assert all("link" not in m for m in parallel.task_modules)
    assert parallel(penc.transform(frame).head(4)).logits.shape == (4, 2)


# --- the estimators on hand examples -------------------------------------------------------------


def test_ipw_weights_are_clipped_inverse_propensities():
    p = torch.tensor([0.5, 0.2, 0.001, 1.0])
    assert torch.allclose(inverse_propensity(p, 0.01), torch.tensor([2.0, 5.0, 100.0, 1.0]))
    errors = torch.tensor([[0.7], [0.1], [2.0], [0.3]])
    observed = torch.tensor([[1.0], [0.0], [1.0], [1.0]])
    # (1/|D|) sum o e / p = (0.7 * 2 + 0 + 2.0 * 100 + 0.3 * 1) / 4
    expected = (0.7 * 2 + 2.0 * 100 + 0.3) / 4
    assert ipw_risk(errors, observed, p.unsqueeze(1), 0.01).item() == pytest.approx(expected)


def test_dr_risk_reduces_to_ipw_with_zero_imputation_and_corrects_it_otherwise():
    torch.manual_seed(0)
    errors, p = torch.rand(6, 2), torch.rand(6, 2) * 0.9 + 0.05
    observed = (torch.rand(6, 2) < 0.5).float()
    zero = torch.zeros(6, 2)
    assert torch.allclose(
        dr_risk(errors, zero, observed, p, 0.01), ipw_risk(errors, observed, p, 0.01)
    )
    imputed = torch.full((6, 2), 0.4)
    by_hand = (imputed + observed * (errors - imputed) / p).mean(0)
    assert torch.allclose(dr_risk(errors, imputed, observed, p, 0.01), by_hand)
    by_hand_imp = (observed * (errors - imputed) ** 2 / p).mean(0)
    assert torch.allclose(imputation_loss(errors, imputed, observed, p, 0.01), by_hand_imp)


def test_multi_dr_with_zero_imputation_is_multi_ipw(funnel_tables):
    enc, train, _ = funnel_tables
    batch = train.head(128)
    torch.manual_seed(0)
    dr = build_model("multi-dr", enc.schema, enc.layout(), {"imputation": "error"})
    ipw = build_model("multi-ipw", enc.schema, enc.layout())
    missing, unexpected = ipw.load_state_dict(dr.state_dict(), strict=False)
    assert not missing and all("imputation" in k for k in unexpected)
    out = dr(batch)
    out.extras["imputation"] = torch.zeros_like(out.extras["imputation"])
    risk, _ = dr.counterfactual_terms(out, batch)
    ipw_losses = ipw.task_losses(ipw(batch), batch)
    assert risk[1].item() == pytest.approx(ipw_losses[1].item(), rel=1e-5)
    # the default (label) imputation gives unclicked rows a CVR gradient; IPW gives them none
    unclicked = batch.take(torch.nonzero(batch.labels[:, 0] == 0).squeeze(1))
    label_dr = build_model("multi-dr", enc.schema, enc.layout())
    cvr = list(label_dr.task_modules[1]["tower"].parameters())
    grads = torch.autograd.grad(label_dr.task_losses(label_dr(unclicked), unclicked)[1], cvr)
    assert any(g.abs().max() > 0 for g in grads)
    ipw_cvr = list(ipw.task_modules[1]["tower"].parameters())
    ipw_loss = ipw.task_losses(ipw(unclicked), unclicked)[1]
    grads = torch.autograd.grad(ipw_loss, ipw_cvr, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)


def test_multi_ipw_loss_by_hand(funnel_tables):
    enc, train, _ = funnel_tables
    model = build_model("multi-ipw", enc.schema, enc.layout(), {"min_propensity": 0.3})
    batch = train.head(40)
    out = model(batch)
    y = batch.labels
    pctr, pcvr = torch.sigmoid(out.logits[:, 0]), torch.sigmoid(out.logits[:, 1])
    e = F.binary_cross_entropy(pcvr, y[:, 1], reduction="none")
    expected = (y[:, 0] * e / pctr.clamp(min=0.3)).mean()
    losses = model.task_losses(out, batch)
    assert losses[1].item() == pytest.approx(expected.item(), rel=1e-4)
    assert losses[0].item() == pytest.approx(F.binary_cross_entropy(pctr, y[:, 0]).item(), rel=1e-4)


@pytest.mark.parametrize("variant", ["ips", "dr"])
def test_escm2_regulariser_matches_a_hand_computation(variant, funnel_tables):
    enc, train, _ = funnel_tables
    options = {
        "variant": variant,
        "imputation": "error",
        "counterfactual_weight": 0.3,
        "global_weight": 0.7,
        "min_propensity": 0.05,
    }
    model = build_model("escm2", enc.schema, enc.layout(), options)
    batch = train.head(12)
    out = model(batch)
    y = batch.labels
    o, conv = y[:, 0], y[:, 1]
    pctr, pcvr = torch.sigmoid(out.logits[:, 0]), torch.sigmoid(out.logits[:, 1])
    e = -(conv * torch.log(pcvr) + (1 - conv) * torch.log(1 - pcvr))
    w = 1 / pctr.clamp(min=0.05)
    if variant == "ips":
        regulariser = (o * e * w).mean()
    else:
        e_hat = out.extras["imputation"][:, 1]
        regulariser = (e_hat + o * (e - e_hat) * w).mean() + (o * (e - e_hat) ** 2 * w).mean()
    ctcvr = -(conv * torch.log(pctr * pcvr) + (1 - conv) * torch.log(1 - pctr * pcvr)).mean()
    losses = model.task_losses(out, batch)
    assert losses[1].item() == pytest.approx((0.7 * ctcvr + 0.3 * regulariser).item(), rel=1e-4)
    ctr = -(o * torch.log(pctr) + (1 - o) * torch.log(1 - pctr)).mean()
    assert losses[0].item() == pytest.approx(ctr.item(), rel=1e-4)
    assert math.isfinite(losses.sum().item())


def test_causal_model_options_are_checked(funnel_tables, parallel_schema):
    enc, _, _ = funnel_tables
    with pytest.raises(ConfigError, match="variant"):
        build_model("escm2", enc.schema, enc.layout(), {"variant": "snips"})
    with pytest.raises(ConfigError, match="min_propensity"):
        build_model("multi-ipw", enc.schema, enc.layout(), {"min_propensity": 0.0})
    with pytest.raises(ConfigError, match="imputation"):
        build_model("multi-dr", enc.schema, enc.layout(), {"imputation": "both"})
    penc = Encoder(parallel_schema).fit(funnel_frame(100))
    for name in ("multi-ipw", "escm2", "esm2", "apem"):
        with pytest.raises(ConfigError, match="binary"):
            build_model(name, parallel_schema, penc.layout())


def test_propensity_gradient_reaches_the_ctr_tower_only_when_not_detached(funnel_tables):
    enc, train, _ = funnel_tables
    batch = train.head(256)
    for detach, reaches in ((True, False), (False, True)):
        model = build_model("multi-ipw", enc.schema, enc.layout(), {"detach_propensity": detach})
        loss = model.task_losses(model(batch), batch)[1]
        ctr = list(model.task_modules[0].parameters())
        grads = torch.autograd.grad(loss, ctr, allow_unused=True)
        got = any(g is not None and g.abs().max() > 0 for g in grads)
        assert got == reaches
