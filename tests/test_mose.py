"""MoSE (model ``mose``): LSTM experts over the history stream with the current row as last step.

The planted signal is pure order: a row is positive iff token A comes before token B in its
history, and every history holds both exactly once, so the bag of items (all that mean pooling
sees) carries no information.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.models import sequential_experts as _mose  # noqa: F401  (runs @register("mose"))
from mtlrec.schema import Feature, Schema, Task
from mtlrec.train.metrics import auc
from tests.model_properties import (
    assert_own_gradients,
    assert_partition,
    balancer_steps,
    train_steps,
)

A, B = "t0", "t1"
FILLER = [f"t{i}" for i in range(2, 10)]
SMALL = {"embed_dim": 8, "bottom_hidden": 16, "lstm_hidden": 16, "num_experts": 3}


pytestmark = pytest.mark.usefixtures("one_thread")


def schema(max_len: int = 6, second: bool = True, other_len: int | None = None) -> Schema:
    """item (categorical), hist (+ its aligned category ``hist_cat``), price; a binary ``order``
    task and a regression ``spend`` task."""
    features = [Feature("item"), Feature("hist", "sequence", max_len=max_len)]
    if second:
        features.append(Feature("hist_cat", "sequence", max_len=other_len or max_len))
    features.append(Feature("price", "numeric"))
    return Schema(features, [Task("order"), Task("spend", "regression")])


def frame(rows: int, seed: int, empty: float = 0.0) -> pd.DataFrame:
    """Histories of 2-6 tokens holding A and B once each at random positions (a share ``empty``
    of rows has no history, label 0); ``order`` = A before B; ``spend`` = price / 2 + noise (a
    loss on the scale of the binary task's: see the order-signal test)."""
    rng = np.random.default_rng(seed)
    hist, order = [], []
    for _ in range(rows):
        if rng.random() < empty:
            hist.append([])
            order.append(0)
            continue
        tokens = list(rng.choice(FILLER, rng.integers(0, 5)))
        a, b = sorted(rng.choice(len(tokens) + 2, 2, replace=False))
        first, second = (A, B) if rng.random() < 0.5 else (B, A)
        tokens.insert(a, first)
        tokens.insert(b, second)
        hist.append(tokens)
        order.append(int(first == A))
    price = rng.normal(size=rows)
    return pd.DataFrame(
        {
            "item": rng.choice(FILLER + [A, B], rows),
            "hist": ["|".join(h) for h in hist],
            "hist_cat": ["|".join(f"c{int(t[1:]) % 3}" for t in h) for h in hist],
            "price": price,
            "order": order,
            "spend": 0.5 * price + 0.05 * rng.normal(size=rows),
        }
    )


def encoded(rows: int = 64, seed: int = 0, empty: float = 0.25, **schema_args):
    df = frame(rows, seed, empty)
    enc = Encoder(schema(**schema_args)).fit(df)
    return enc, enc.transform(df), df


def mose(enc, **options):
    torch.manual_seed(0)
    return build_model("mose", enc.schema, enc.layout(), {**SMALL, **options})


def loud(model):
    """Item embeddings start at std 0.01, so an untrained model barely hears the history: scale
    them to std 1 for the checks of what the LSTMs read."""
    with torch.no_grad():
        model.embedding.table.weight.mul_(100.0)
    return model


# --- shapes, padding, order ----------------------------------------------------------------------


def test_outputs_gates_and_empty_histories():
    enc, table, df = encoded()
    model = mose(enc).eval()
    with torch.no_grad():
        out = model(table)
    n = len(df)
    assert out.logits.shape == (n, 2)
    gates = out.extras["gates"]
    assert gates.shape == (n, 2, 3) and (gates >= 0).all()
    assert torch.allclose(gates.sum(-1), torch.ones(n, 2), atol=1e-5)
    empty = torch.from_numpy((df["hist"] == "").to_numpy().copy())
    assert empty.any() and torch.isfinite(out.logits[empty]).all()
    assert torch.isfinite(out.logits).all()
    # a batch of empty histories only: every stream is the current step alone
    with torch.no_grad():
        alone = model(table.take(torch.nonzero(empty).flatten()))
    assert torch.allclose(alone.logits, out.logits[empty], atol=1e-6)


def test_more_padding_gives_the_same_output():
    """Same rows, max_len 6 vs 12 (twice the padding), same weights: same predictions."""
    df = frame(64, seed=1, empty=0.2)
    short, long = (Encoder(schema(max_len=m)).fit(df) for m in (6, 12))
    model_short = loud(mose(short)).eval()
    model_long = mose(long).eval()
    model_long.load_state_dict(model_short.state_dict())
    with torch.no_grad():
        a = model_short(short.transform(df)).logits
        b = model_long(long.transform(df)).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_output_is_a_run_over_the_history_then_the_current_row():
    """Row by row (test-only loop): the LSTMs over exactly [history items..., current step], no
    padding, reproduce the batched model, empty histories included."""
    enc, table, df = encoded(rows=24, seed=2)
    model = loud(mose(enc)).eval()
    with torch.no_grad():
        want = model(table).logits
        x, _, _ = model.inputs(table)
        table_rows = model.embedding.table.weight
        hist_len = enc.schema.features[1].max_len
        for r in range(len(df)):
            ids = table.seq[r]
            steps = [
                torch.cat([table_rows[ids[j]], table_rows[ids[hist_len + j]]])
                for j in range(hist_len)
                if ids[j] != 0
            ]
            steps.append(model.current(x[r]))
            stream = torch.stack(steps).unsqueeze(0)  # [1, n + 1, 2d]
            h = model.bottom(stream)[0]
            states = torch.stack([e(h)[1][0][-1, 0] for e in model.experts])  # [K, H]
            row = []
            for gate, tower in zip(model.gates, model.task_modules):
                row.append(tower(gate(x[r : r + 1])[0] @ states))
            assert torch.allclose(torch.cat(row), want[r], atol=1e-5), r


def test_reversing_a_history_changes_the_prediction():
    enc, table, df = encoded(rows=64, seed=3, empty=0.0)
    model = loud(mose(enc)).eval()
    flipped = df.copy()
    for col in ("hist", "hist_cat"):
        flipped[col] = ["|".join(h.split("|")[::-1]) for h in df[col]]
    with torch.no_grad():
        a = model(table).logits
        b = model(enc.transform(flipped)).logits
    # no history is a palindrome: each holds A and B exactly once
    assert ((a - b).abs().amax(1) > 1e-4).all()


# --- the planted order signal --------------------------------------------------------------------


def test_learns_an_order_signal_that_mean_pooling_cannot_see():
    """A before B: MoSE reaches AUC > 0.9 in 300 steps; MMoE (mean-pooled history) stays at
    chance. The regression task on the current row's numeric is learned alongside.

    Measured (4 seeds, steps to AUC > 0.9): 125-225 here, 25-50 without the shared-bottom LSTM
    (``bottom_hidden: 0``); with ``spend`` = 2 price (an MSE of 4 against the BCE's 0.7 at the
    start, both through the one recurrent path) 550 to over 600, and 225 to over 600 without
    the bottom."""
    train_df, valid_df = frame(2000, seed=4), frame(600, seed=5)
    enc = Encoder(schema(second=False)).fit(train_df)
    train, valid = enc.transform(train_df), enc.transform(valid_df)
    scores = {}
    for name, options in (("mose", SMALL), ("mmoe", {"embed_dim": 8})):
        torch.manual_seed(0)
        model = build_model(name, enc.schema, enc.layout(), options)
        train_steps(model, train, steps=300, lr=0.02)
        model.eval()
        with torch.no_grad():
            cond, _ = model.predict(model(valid))
        scores[name] = auc(valid.labels[:, 0].numpy(), cond[:, 0].numpy())
        if name == "mose":
            mse = float((cond[:, 1] - valid.labels[:, 1]).pow(2).mean())
            assert mse < 0.5 * float(valid.labels[:, 1].var()), mse
    assert scores["mose"] > 0.9, scores
    assert scores["mmoe"] < 0.65, scores


# --- options -------------------------------------------------------------------------------------


def test_sequence_fields_choose_the_stream_and_pool_the_rest():
    enc, table, _ = encoded()
    both = mose(enc)
    assert both.current.out_features == 2 * 8 and both.pooled_slices == []
    only = mose(enc, sequence_fields="hist")
    assert only.current.out_features == 8
    assert only.stream_slices == [(0, 6)] and only.pooled_slices == [(6, 6)]
    # hist_cat is pooled into the current row: changing it changes the output
    with torch.no_grad():
        before = only.eval()(table).logits
        other = table.take(torch.arange(len(table)))
        other.seq[:, 6:] = other.seq[:, 6:].roll(1, 0)
        after = only(other).logits
    assert not torch.allclose(before, after)
    no_bottom = mose(enc, bottom_hidden=0)
    assert no_bottom.bottom is None and no_bottom.experts[0].input_size == 16
    assert torch.isfinite(no_bottom(table).logits).all()


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"sequence_fields": "item"}, "model.sequence_fields: 'item' is a categorical feature"),
        ({"sequence_fields": "hist, nope"}, "model.sequence_fields: 'nope' is not a feature"),
        ({"sequence_fields": "hist,hist"}, "model.sequence_fields: a feature is listed twice"),
        ({"num_experts": 0}, r"model.num_experts must be >= 1"),
        ({"lstm_hidden": 0}, r"model.lstm_hidden must be >= 1"),
        ({"bottom_hidden": -1}, r"model.bottom_hidden must be >= 0"),
        ({"tower_hidden": [8, 0]}, r"model.tower_hidden: layer widths"),
        ({"expert_hidden": [8]}, r"model.expert_hidden"),
    ],
)
def test_bad_options_are_named(options, needle):
    enc, _, _ = encoded()
    with pytest.raises(ConfigError, match=needle):
        build_model("mose", enc.schema, enc.layout(), options)


def test_unaligned_or_missing_sequences_are_refused():
    enc, _, _ = encoded(other_len=4)  # hist: 6, hist_cat: 4
    with pytest.raises(ConfigError, match=r"model.sequence_fields: .*same max_len.*hist: 6"):
        build_model("mose", enc.schema, enc.layout())
    assert mose(enc, sequence_fields="hist").stream_slices == [(0, 6)]
    df = frame(16, seed=6)
    flat = Schema([Feature("item"), Feature("price", "numeric")], [Task("order")])
    flat_enc = Encoder(flat).fit(df)
    with pytest.raises(ConfigError, match="needs at least one sequence feature"):
        build_model("mose", flat, flat_enc.layout())


def test_a_schema_with_only_the_history_works():
    """No current-row features: the current step is the projection's bias."""
    df = frame(32, seed=7, empty=0.3)
    only = Schema([Feature("hist", "sequence", max_len=6)], [Task("order")])
    enc = Encoder(only).fit(df)
    model = mose(enc)
    out = model(enc.transform(df))
    assert out.logits.shape == (32, 1) and torch.isfinite(out.logits).all()


# --- parameter groups, balancers, dropout, export ------------------------------------------------


def test_towers_are_the_tasks_own_and_nothing_else_is():
    enc, table, _ = encoded()
    model = mose(enc)
    groups = assert_partition(model)
    assert all(groups)
    assert groups[0] == {id(p) for p in model.task_modules[0].parameters()}
    assert_own_gradients(model, table)


@pytest.mark.parametrize("balancer_name", ["pcgrad", "cagrad", "mgda", "gradnorm"])
def test_trains_with_gradient_balancers(balancer_name):
    """As tests/test_model_balancer_matrix.py drives a pair: three steps, finite, weights move."""
    enc, table, _ = encoded(rows=288, seed=8)
    model = mose(enc, dropout=0.1)
    params, changed = balancer_steps(model, table, balancer_name, 3)
    assert all(torch.isfinite(p).all() for p in params)
    moved = {id(p) for p, c in zip(params, changed) if c}
    assert id(model.experts[0].weight_hh_l0) in moved and id(model.bottom.weight_ih_l0) in moved


def test_dropout_reaches_towers_bottom_and_experts():
    from torch import nn

    from mtlrec.nn.mlp import MLP

    enc, table, _ = encoded()
    model = mose(enc, dropout=0.3)
    towers = [m for m in model.modules() if isinstance(m, MLP)]
    assert len(towers) == 2
    assert all(any(isinstance(layer, nn.Dropout) for layer in t) for t in towers)
    assert model.dropout is not None and model.dropout.p == 0.3
    model.train()
    torch.manual_seed(1)
    a = model(table).logits
    b = model(table).logits
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(table).logits, model(table).logits)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_graph_matches_the_eager_model_on_other_rows(fmt, tmp_path):
    """The export path (a graph traced on 4 rows) reproduces the eager model on 64 others, with
    padding holes inside histories as ``example_inputs`` draws them. ONNX refuses a packed
    sequence read by several LSTMs, so tracing takes the padded path."""
    import warnings

    from mtlrec.data.table import TensorTable
    from mtlrec.serve.export import ExportModule, _export_onnx, example_inputs
    from mtlrec.serve.predictor import load_onnx

    enc, _, _ = encoded()
    module = ExportModule(mose(enc, dropout=0.2)).eval()
    inputs = example_inputs(enc.layout(), rows=4)
    check = example_inputs(enc.layout(), rows=64, seed=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = module(*check)
        if fmt == "torchscript":
            got = torch.jit.trace(module, inputs, check_trace=False)(*check)
        else:
            _export_onnx(module, inputs, tmp_path / "model.onnx")
            batch = TensorTable(*check, torch.zeros(64, 2))
            got = [torch.from_numpy(g) for g in load_onnx(tmp_path / "model.onnx")(batch)]
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))


def test_packed_and_padded_runs_agree():
    """Training runs the LSTMs over the packed stream; export over the padded one."""
    enc, table, _ = encoded(rows=48, seed=9)
    model = loud(mose(enc)).eval()
    with torch.no_grad():
        x, history, lengths = model.inputs(table)
        steps = model.stream(x, history, lengths)
        packed = model.expert_states(steps, lengths, packed=True)
        padded = model.expert_states(steps, lengths, packed=False)
    assert torch.allclose(packed, padded, atol=1e-6)


def test_the_default_packs_only_a_mostly_empty_stream(monkeypatch):
    """Packing pays for short histories and costs for full ones (the packed backward zero-fills
    the whole input per step), so the default chooses by how much of the stream is real."""
    from mtlrec.models import sequential_experts

    enc, _, _ = encoded()
    model = mose(enc).eval()
    calls: list[bool] = []
    real = sequential_experts.pack_padded_sequence

    def spy(*args, **kwargs):
        calls.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(sequential_experts, "pack_padded_sequence", spy)
    steps = torch.zeros(4, 7, model.current.out_features)
    with torch.no_grad():
        model.expert_states(steps, torch.tensor([0, 1, 0, 2]), None)  # 7 of 28 steps real
        assert calls == [True]
        model.expert_states(steps, torch.tensor([6, 5, 6, 4]), None)  # 25 of 28
        assert calls == [True]


def test_stream_features_whose_items_are_not_aligned_are_refused():
    """hist and hist_cat describe the same events (aligned); a hist_cat with items missing in
    some rows would join unrelated items into one step."""
    from mtlrec.errors import DataError

    enc, table, df = encoded()
    model = mose(enc).train()
    model(table)  # aligned: fine
    shifted = df.assign(hist_cat=["|".join(h.split("|")[1:]) for h in df["hist_cat"]])
    with pytest.raises(DataError, match=r"'hist', 'hist_cat' are read together .* not aligned"):
        model(enc.transform(shifted))
    mose(enc, sequence_fields="hist")(enc.transform(shifted))  # one stream feature: no check
    model.eval()(enc.transform(shifted))  # checked in training only (export draws random rows)
