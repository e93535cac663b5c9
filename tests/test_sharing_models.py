"""Parameter-sharing paradigms: MSSM, CSRec, GemNN, CFS-MTL, MRAN, cross-stitch, MFH, PEPNet.

Each model's defining mechanism is checked on a tiny planted dataset (one torch thread, a few
hundred steps at most), plus the properties every model must have: it learns the planted signal,
its shared and task parameters partition the model, and a task's own parameters get gradient
only from that task.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from mtlrec.balance import build_balancer
from mtlrec.cli import app
from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError
from mtlrec.models import MTLModel, build_model, describe_models
from mtlrec.schema import Schema
from mtlrec.train.metrics import auc
from mtlrec.train.trainer import predict
from tests.conftest import funnel_frame
from tests.model_properties import assert_own_gradients, assert_partition

NEW = ["mssm", "csrec", "gemnn", "cfs-mtl", "mran", "cross-stitch", "mfh", "pepnet"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(model: MTLModel, table, steps: int, lr: float = 0.01, batch_size: int = 256):
    torch.manual_seed(0)
    bal = build_balancer("ew", model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    history = []
    while len(history) < steps:
        for batch in table.batches(batch_size, shuffle=True, generator=gen):
            out = model(batch)
            losses = model.task_losses(out, batch)
            opt.zero_grad()
            history.append(float(bal.backward(losses, out.aux_loss)))
            opt.step()
            if len(history) == steps:
                break
    return history


def planted(rows: int, seed: int) -> pd.DataFrame:
    """Two parallel binary tasks: ``click`` from user and item, ``like`` from price; ``noise``
    is a categorical field unrelated to either."""
    rng = np.random.default_rng(seed)
    user, item = rng.integers(0, 20, rows), rng.integers(0, 30, rows)
    price, noise = rng.normal(0, 1, rows), rng.integers(0, 10, rows)
    click = 1.5 * (user % 2 == 0) + 1.0 * (item < 10) - 1.0
    like = -1.5 * price + 0.5
    return pd.DataFrame(
        {
            "user": [f"u{u}" for u in user],
            "item": [f"i{i}" for i in item],
            "noise": [f"n{v}" for v in noise],
            "price": price,
            "click": (rng.random(rows) < 1 / (1 + np.exp(-2 * click))).astype(int),
            "like": (rng.random(rows) < 1 / (1 + np.exp(-2 * like))).astype(int),
        }
    )


PLANTED_SCHEMA = {
    "features": [
        {"name": "user"},
        {"name": "item"},
        {"name": "noise"},
        {"name": "price", "type": "numeric"},
    ],
    "tasks": [{"name": "click"}, {"name": "like"}],
}
USER, ITEM, NOISE, PRICE = 0, 1, 2, 3  # unit order: embedded fields, then numeric columns


@pytest.fixture(scope="module")
def planted_table():
    frame = planted(3000, seed=1)
    enc = Encoder(Schema.from_dict(PLANTED_SCHEMA)).fit(frame)
    return enc, enc.transform(frame)


# --- registry -------------------------------------------------------------------------------------


def test_registry_and_cli_list_the_sharing_models():
    assert set(NEW) <= set(describe_models())
    result = CliRunner().invoke(app, ["list", "models"])
    assert result.exit_code == 0
    listed = {line.split("\t")[0] for line in result.output.splitlines() if line.strip()}
    assert set(NEW) <= listed


# --- properties every model has -------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_every_sharing_model_learns_the_planted_funnel_signal(name, funnel_tables):
    enc, train, valid = funnel_tables
    torch.manual_seed(0)
    model = build_model(name, enc.schema, enc.layout(), {"embed_dim": 8})
    with torch.no_grad():
        model.eval()
        before = float(model.task_losses(model(train), train).sum())
        model.train()
    _train(model, train, steps=120)
    with torch.no_grad():
        model.eval()
        after = float(model.task_losses(model(train), train).sum())
    assert after < before * 0.8, (before, after)
    cond, joint = predict(model, valid, 4096)
    assert cond.shape == joint.shape == (len(valid), 2)
    labels = valid.labels
    clicked = labels[:, 0] == 1
    assert auc(labels[:, 0].numpy(), cond[:, 0].numpy()) > 0.75
    assert auc(labels[clicked, 1].numpy(), cond[clicked, 1].numpy()) > 0.75


@pytest.mark.parametrize("name", NEW)
def test_sharing_models_fit_binary_and_regression(name, parallel_schema):
    frame = funnel_frame(1000, seed=5)
    enc = Encoder(parallel_schema).fit(frame)
    table = enc.transform(frame)
    model = build_model(name, enc.schema, enc.layout(), {"embed_dim": 8})
    history = _train(model, table, steps=40)
    assert sum(history[-5:]) < sum(history[:5])
    assert model(table.head(7)).logits.shape == (7, 2)


@pytest.mark.parametrize("name", NEW)
def test_shared_and_task_parameters_partition_the_model(name, funnel_tables):
    enc, _, _ = funnel_tables
    groups = assert_partition(build_model(name, enc.schema, enc.layout()))
    assert all(groups), "every model here has task-specific parameters"


@pytest.mark.parametrize("name", NEW)
def test_task_parameters_get_gradient_only_from_their_task(name, funnel_tables):
    """A parameter declared task-specific must not receive gradient from another task."""
    enc, train, _ = funnel_tables
    torch.manual_seed(0)
    assert_own_gradients(build_model(name, enc.schema, enc.layout()), train.head(256))


# --- MSSM -----------------------------------------------------------------------------------------


def test_mssm_field_and_cell_masks_end_sparse_and_binary(planted_table):
    enc, table = planted_table
    torch.manual_seed(0)
    model = build_model(
        "mssm",
        enc.schema,
        enc.layout(),
        {"embed_dim": 8, "l0_weight": 2.0, "gate_init": 3.0, "l0_warmup": 200},
    )
    assert torch.equal(model.field_masks(), torch.ones(2, 4))  # every field open at the start
    _train(model, table, steps=600, lr=0.03, batch_size=128)
    fields, cells = model.field_masks(), model.cell_masks()
    gates = torch.cat([fields.flatten(), cells.flatten()])
    binary = (gates == 0) | (gates == 1)
    assert binary.float().mean() >= 0.8, (fields, cells)
    assert fields[0, NOISE] == 0 and fields[1, NOISE] == 0, fields  # the noise field is cut
    assert fields[0, USER] == 1 and fields[0, ITEM] == 1, fields  # click keeps its fields
    assert fields[0, PRICE] == 0, fields  # ... and drops the other task's
    assert fields[1, PRICE] == 1, fields  # like keeps price
    assert torch.equal(model.eval()(table.head(3)).extras["field_masks"], fields)


def test_mssm_penalty_waits_for_the_warmup(planted_table):
    enc, table = planted_table
    model = build_model("mssm", enc.schema, enc.layout(), {"l0_warmup": 2, "l0_weight": 1.0})
    batch = table.head(32)
    assert model(batch).aux_loss.item() == 0.0
    assert model(batch).aux_loss.item() == 0.0
    assert model(batch).aux_loss.item() > 0.0
    assert int(model.step) == 3 and "step" in model.state_dict()


# --- CSRec ----------------------------------------------------------------------------------------


def test_csrec_masks_are_binary_and_prune_the_noise_field(planted_table):
    enc, table = planted_table
    torch.manual_seed(0)
    model = build_model("csrec", enc.schema, enc.layout(), {"embed_dim": 8, "mask_l1": 0.01})
    assert all(m.mean() == 1 for m in model.masks())  # dense at the start
    _train(model, table, steps=600, lr=0.03, batch_size=128)
    masks = model.masks()
    for t, module in enumerate(model.task_modules):
        for i, scores in enumerate(module["scores"]):
            assert torch.equal(masks[i][t], (scores > 0).float())
    assert all(((m == 0) | (m == 1)).all() for m in masks)
    first = masks[0]  # [T, out, in]; inputs: user, item, noise embeddings (8 each), price
    assert float(torch.cat([m.flatten() for m in masks]).mean()) < 0.5  # sparse
    density = [first[:, :, f * 8 : (f + 1) * 8].mean((1, 2)) for f in range(3)]
    density.append(first[:, :, -1].mean(1))
    assert density[NOISE][0] < density[USER][0], density  # click
    assert density[NOISE][1] < density[PRICE][1], density  # like


def test_csrec_alternates_the_conflict_weights_between_tasks(funnel_tables):
    enc, train, _ = funnel_tables
    model = build_model("csrec", enc.schema, enc.layout(), {"mask_init": 1.0})
    batch = train.head(128)
    weight = model.layers[0].weight
    for step in range(4):  # every weight is kept by both tasks: all are conflict weights
        assert int(model.step) == step
        losses = model.task_losses(model(batch), batch)
        active = step % 2
        g_active = torch.autograd.grad(losses[active], weight, retain_graph=True)[0]
        g_other = torch.autograd.grad(losses[1 - active], weight)[0]
        assert g_active.abs().max() > 0 and g_other.abs().max() == 0
    # Exclusive weights get their owner's gradient at every step.
    with torch.no_grad():
        model.task_modules[1]["scores"][0][:, :4] = -1.0  # only task 0 keeps these inputs
    for _ in range(2):
        losses = model.task_losses(model(batch), batch)
        g0 = torch.autograd.grad(losses[0], weight)[0]
        assert g0[:, :4].abs().max() > 0
    # Evaluation does not advance the rotation.
    model.eval()
    before = int(model.step)
    with torch.no_grad():
        model(batch)
    assert int(model.step) == before and "step" in model.state_dict()


# --- cross-stitch ---------------------------------------------------------------------------------


def test_cross_stitch_with_identity_units_is_independent_columns(funnel_tables):
    enc, train, _ = funnel_tables
    torch.manual_seed(0)
    model = build_model("cross-stitch", enc.schema, enc.layout(), {"hidden": [16, 8]})
    alpha = model.alphas[0]
    assert torch.allclose(alpha, torch.tensor([[0.9, 0.1], [0.1, 0.9]]))  # the paper's init
    with torch.no_grad():
        for a in model.alphas:
            a.copy_(torch.eye(2))
    batch = train.head(50)
    out = model(batch).logits
    x = model.embedding(batch)
    for t in range(2):
        h = x
        for column in model.columns:
            h = torch.relu(h @ column.weights[0][t] + column.biases[0][t, 0])
        assert torch.allclose(out[:, t : t + 1], model.task_modules[t](h), atol=1e-6)
    # A changed column of task 1 leaves task 0's output untouched under identity units.
    with torch.no_grad():
        model.columns[0].weights[0][1].add_(1.0)
    assert torch.allclose(model(batch).logits[:, 0], out[:, 0], atol=1e-6)


def test_cross_stitch_units_mix_columns():
    schema = Schema.from_dict(PLANTED_SCHEMA)
    enc = Encoder(schema).fit(planted(100, 0))
    batch = enc.transform(planted(20, 1))
    model = build_model("cross-stitch", schema, enc.layout())
    out = model(batch).logits
    with torch.no_grad():
        model.columns[0].weights[0][1].add_(1.0)
    assert not torch.allclose(model(batch).logits[:, 0], out[:, 0])


# --- MFH ------------------------------------------------------------------------------------------


def test_mfh_routes_a_row_to_its_groups_switcher(funnel_tables):
    enc, train, _ = funnel_tables
    torch.manual_seed(0)
    model = build_model("mfh", enc.schema, enc.layout(), {"group_feature": "user"})
    layout = enc.layout()
    col = [f.name for f in enc.schema.embedded_fields()].index("user")
    assert model.group_col == col and model.num_groups == layout.field_sizes[col] == 21

    def touched(batch) -> set[int]:
        model.zero_grad()
        model(batch).logits.sum().backward()
        per_group = [
            model.group_weight.grad,
            model.group_bias.grad,
            *(m["gate_weight"][0].grad for m in model.task_modules),
        ]
        return {g for g in range(model.num_groups) if any(p[g].abs().max() > 0 for p in per_group)}

    row = train.head(1)
    group = int(row.cat[0, col]) - layout.field_offsets[col]
    assert int(model.groups(row)[0]) == group
    assert touched(row) == {group}
    moved = row.take(torch.tensor([0]))
    new_group = (group % 20) + 1
    moved.cat[0, col] = layout.field_offsets[col] + new_group  # only the group feature changes
    assert int(model.groups(moved)[0]) == new_group
    assert touched(moved) == {new_group}
    batch = train.head(200)
    assert touched(batch) == set(model.groups(batch).tolist())


def test_mfh_group_feature_choices(funnel_tables):
    enc, _, _ = funnel_tables
    assert build_model("mfh", enc.schema, enc.layout()).group_feature == "user"  # first categorical
    with pytest.raises(ConfigError, match="sequence"):
        build_model("mfh", enc.schema, enc.layout(), {"group_feature": "tags"})
    with pytest.raises(ConfigError, match="group_feature"):
        build_model("mfh", enc.schema, enc.layout(), {"group_feature": "price"})
    with pytest.raises(ConfigError, match="max_groups"):
        build_model("mfh", enc.schema, enc.layout(), {"group_feature": "item", "max_groups": 5})


# --- PEPNet ---------------------------------------------------------------------------------------


def test_pepnet_gates_lie_between_zero_and_two(funnel_tables):
    enc, train, _ = funnel_tables
    torch.manual_seed(0)
    model = build_model("pepnet", enc.schema, enc.layout(), {"embed_dim": 8})
    start = model(train.head(500)).extras["epnet_gate"].detach()
    _train(model, train, steps=30)
    out = model(train.head(500))
    assert not torch.allclose(out.extras["epnet_gate"], start)  # the gates learn
    gates = {k: v for k, v in out.extras.items() if "gate" in k}
    assert gates["epnet_gate"].shape == (500, 3 + 1)  # user, item, tags; price
    assert {f"ppnet_gate_{i}" for i in range(3)} <= set(gates)
    for name, g in gates.items():
        assert ((g > 0) & (g < 2)).all(), name
    assert gates["ppnet_gate_0"].shape == (500, 2, 3 * 8 + 1)


def test_pepnet_prior_features_are_named(funnel_tables):
    enc, train, _ = funnel_tables
    model = build_model("pepnet", enc.schema, enc.layout())
    assert model.domain == model.prior == [0, 1]  # the categorical fields: user, item
    model = build_model(
        "pepnet", enc.schema, enc.layout(), {"domain_features": "user", "prior_features": "tags"}
    )
    assert model.domain == [0] and model.prior == [2]
    with pytest.raises(ConfigError, match="prior_features"):
        build_model("pepnet", enc.schema, enc.layout(), {"prior_features": "user,nope"})


# --- GemNN, CFS-MTL, MRAN ------------------------------------------------------------------------


def test_gemnn_downstream_reads_the_upstream_state(funnel_tables):
    enc, train, _ = funnel_tables
    model = build_model("gemnn", enc.schema, enc.layout())
    assert model.upstream_of == [-1, 0]
    batch = train.head(64)
    base = model(batch).logits
    with torch.no_grad():
        model.task_modules[0]["mlp"][0].weight.mul_(2.0)  # change the upstream network only
    changed = model(batch).logits
    assert not torch.allclose(base[:, 1], changed[:, 1])  # the downstream task sees it
    flat = build_model("gemnn", enc.schema, enc.layout(), {"pass_upstream": False})
    assert flat.upstream_of == [-1, -1]
    with pytest.raises(ConfigError, match="gate"):
        build_model("gemnn", enc.schema, enc.layout(), {"gate": "row"})


def test_cfs_mtl_regularises_importance_towards_intervention_effects(planted_table):
    enc, table = planted_table
    torch.manual_seed(0)
    model = build_model("cfs-mtl", enc.schema, enc.layout(), {"embed_dim": 8})
    batch = table.head(256)
    out = model(batch)
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    assert torch.allclose(out.extras["importance"].sum(-1), torch.ones(256, 2))
    model.eval()
    assert model(batch).aux_loss is None  # interventions only while training
    model.train()
    _train(model, table, steps=300, lr=0.02, batch_size=128)
    importance = model.eval()(table).extras["importance"].mean(0)  # [T, units]
    assert importance[0, NOISE] < 0.5 * importance[0, USER], importance
    assert importance[1, NOISE] < 0.5 * importance[1, PRICE], importance
    # Without the causal regulariser the selection is less sure the noise field is useless.
    torch.manual_seed(0)
    plain = build_model("cfs-mtl", enc.schema, enc.layout(), {"embed_dim": 8, "causal_weight": 0})
    _train(plain, table, steps=300, lr=0.02, batch_size=128)
    baseline = plain.eval()(table).extras["importance"].mean(0)
    assert importance[0, NOISE] < baseline[0, NOISE], (importance, baseline)


def test_mran_attention_is_normalised(funnel_tables):
    enc, train, _ = funnel_tables
    model = build_model("mran", enc.schema, enc.layout(), {"task_heads": 3})
    extras = model(train.head(10)).extras
    assert extras["task_attention"].shape == (10, 2, 2)
    assert torch.allclose(extras["task_attention"].sum(-1), torch.ones(10, 2))
    assert extras["feature_attention"].shape == (10, 2, 3, 4)  # 3 embedded fields + price
    assert torch.allclose(extras["feature_attention"].sum(-1), torch.ones(10, 2, 3))
    with pytest.raises(ConfigError, match="heads"):
        build_model("mran", enc.schema, enc.layout(), {"heads": 3})
