"""DMT (Gu et al., CIKM 2020): target attention over each behaviour sequence, padding and empty
histories, the training-only bias network, option checks, and the shared/task contract."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import mtlrec.models.multifaceted  # noqa: F401  (registers "dmt")
from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.models.multifaceted import DMT
from mtlrec.schema import Schema
from mtlrec.train.metrics import auc
from tests.model_properties import (
    assert_own_gradients,
    assert_partition,
    balancer_steps,
    train_steps,
)

ITEMS = 40
SMALL = {"embed_dim": 8, "num_heads": 2, "expert_hidden": [16], "tower_hidden": [8]}


pytestmark = pytest.mark.usefixtures("one_thread")


def history_frame(n: int, seed: int, clicks: int = 8, carts: int = 4) -> pd.DataFrame:
    """Impressions of a target ``movie`` with a click and a cart history (oldest first, some
    empty). Planted: ``click`` = 1 iff the target is in the click history, ``buy`` = 1 iff it is
    in the cart history; ``price`` is noise; ``pos`` (0-9) is where the item was shown."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, ITEMS, n)

    def histories(longest: int, hit_rate: float) -> tuple[list[str], np.ndarray]:
        cells, hit = [], np.zeros(n, dtype=int)
        for r in range(n):  # test data only: the model never sees rows one by one
            others = np.setdiff1d(np.arange(ITEMS), [target[r]])
            items = list(rng.choice(others, rng.integers(0, longest + 1), replace=False))
            if items and rng.random() < hit_rate:
                items[rng.integers(len(items))] = target[r]
                hit[r] = 1
            cells.append("|".join(f"m{i}" for i in items))
        return cells, hit

    click_cells, click = histories(clicks, 0.5)
    cart_cells, buy = histories(carts, 0.4)
    return pd.DataFrame(
        {
            "user": [f"u{u}" for u in rng.integers(0, 10, n)],
            "movie": [f"m{i}" for i in target],
            "price": rng.normal(0, 1, n).round(3),
            "pos": [f"p{p}" for p in rng.integers(0, 10, n)],
            "clicks": click_cells,
            "carts": cart_cells,
            "click": click,
            "buy": buy,
        }
    )


def history_schema(shared: bool = True, clicks: int = 8, carts: int = 4) -> Schema:
    share = {"vocab_of": "movie"} if shared else {}
    return Schema.from_dict(
        {
            "features": [
                {"name": "user"},
                {"name": "movie"},
                {"name": "price", "type": "numeric"},
                {"name": "pos"},
                {"name": "clicks", "type": "sequence", "max_len": clicks, **share},
                {"name": "carts", "type": "sequence", "max_len": carts, **share},
            ],
            "tasks": [{"name": "click"}, {"name": "buy"}],
        }
    )


def encoded(frame: pd.DataFrame, schema: Schema | None = None):
    enc = Encoder(schema or history_schema()).fit(frame)
    return enc, enc.transform(frame)


@pytest.fixture(scope="module")
def small():
    return encoded(history_frame(400, seed=1))


def dmt(enc, **options) -> DMT:
    torch.manual_seed(0)
    model = build_model("dmt", enc.schema, enc.layout(), {**SMALL, **options})
    assert isinstance(model, DMT)
    return model


def test_shapes_facets_target_and_gates(small):
    enc, table = small
    model = dmt(enc)
    assert model.facet_names == ["clicks", "carts"] and model.target_field == "movie"
    model.eval()
    with torch.no_grad():
        out = model(table.head(16))
    assert out.logits.shape == (16, 2)
    gates = out.extras["gates"]
    assert gates.shape == (16, 2, 4)  # the paper's 4 experts by default
    assert torch.allclose(gates.sum(-1), torch.ones(16, 2), atol=1e-5)
    assert "bias_logit" not in out.extras  # no bias features named: no bias network
    assert model.bias_net is None


def test_empty_histories_give_finite_outputs_and_gradients(small):
    enc, _ = small
    frame = history_frame(64, seed=2)
    frame["clicks"] = ""
    frame.loc[::2, "carts"] = ""  # half the rows have no history at all
    table = enc.transform(frame)
    assert (table.seq[:, :8] == 0).all()
    model = dmt(enc, dropout=0.2, bias_features="pos")
    for train in (True, False):
        model.train(train)
        out = model(table)
        assert torch.isfinite(out.logits).all()
    model.train()
    out = model(table)
    model.task_losses(out, table).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_padding_beyond_a_history_has_no_influence():
    """The same rows encoded with longer max_len (more padding) score the same once the position
    tables carry the same rows: padding keys are masked and positions count from the most recent
    behaviour, so appending padding moves nothing."""
    frame = history_frame(128, seed=3)
    enc_a, table_a = encoded(frame, history_schema(clicks=8, carts=4))
    enc_b, table_b = encoded(frame, history_schema(clicks=13, carts=9))
    a, b = dmt(enc_a), dmt(enc_b)
    state = a.state_dict()
    for key, value in b.state_dict().items():
        if key.endswith("positions"):  # longer table: same first rows
            value = value.clone()
            value[: state[key].shape[0]] = state[key]
            state[key] = value
    b.load_state_dict(state)
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.allclose(a(table_a).logits, b(table_b).logits, atol=1e-5)


def test_an_unseen_history_item_counts_as_absent(small):
    """An item the training data never had encodes to the vocabulary's out-of-vocabulary row,
    which is never trained: as a key it would be one random item that every unseen candidate
    matches. DMT scores a history holding unseen items exactly as the history without them."""
    enc, _ = small
    model = dmt(enc).eval()
    rows = history_frame(6, seed=9)
    rows["clicks"] = ["m1|m2", "m3", "", "m4|m5|m6", "m7", "m8|m9"]
    unseen = rows.assign(clicks=["m1|zz1|m2", "zz2|m3", "zz3", "m4|m5|m6|zz4", "zz5|m7", "m8|m9"])
    with torch.no_grad():
        expected = model(enc.transform(rows)).logits
        got = model(enc.transform(unseen)).logits
    assert torch.allclose(expected, got, atol=1e-6)
    hashed = history_schema()
    hashed.features[1].hash_buckets = 64  # hashed: no out-of-vocabulary row to leave out
    enc_h = Encoder(hashed).fit(history_frame(50, seed=2))
    assert (dmt(enc_h).oov_rows == -1).all()


def test_positions_count_back_from_the_most_recent_behaviour(small):
    """Where the padding sits does not matter: [a, b, c, pad, pad] and [pad, a, pad, b, c] give
    the same interest (recency 2, 1, 0 for a, b, c), while a real token added at the end does."""
    enc, _ = small
    transformer = dmt(enc).transformers[0].eval()
    gen = torch.Generator().manual_seed(0)
    items, target = torch.randn(4, 8, generator=gen), torch.randn(1, 8, generator=gen)
    zero = torch.zeros(8)

    def interest(rows: list[torch.Tensor]) -> torch.Tensor:
        seq = torch.stack(rows).unsqueeze(0)
        valid = (seq != 0).any(-1)
        with torch.no_grad():
            return transformer(target, seq, valid)

    a, b, c, d = items
    right = interest([a, b, c, zero, zero])
    assert torch.allclose(right, interest([zero, a, zero, b, c]), atol=1e-6)
    assert not torch.allclose(right, interest([a, b, c, d, zero]), atol=1e-3)
    assert not torch.allclose(right, interest([b, a, c, zero, zero]), atol=1e-3)


def test_token_order_reaches_the_interest_through_positions(small):
    """Reversing a history changes the interest (positions are learned per recency), and a row's
    interest does not depend on the other rows of the batch."""
    enc, table = small
    model = dmt(enc)
    model.eval()
    batch = table.head(32)
    reversed_rows = batch.take(torch.arange(32))
    seq = reversed_rows.seq[:, :8]
    lengths = (seq != 0).sum(1)
    for r in range(32):  # the test builds its input row by row; the model does not
        n = int(lengths[r])
        seq[r, :n] = seq[r, :n].flip(0)
    with torch.no_grad():
        base = model(batch).logits
        flipped = model(reversed_rows).logits
        alone = model(batch.head(1)).logits
    long_rows = lengths >= 2
    assert not torch.allclose(base[long_rows], flipped[long_rows])
    assert torch.allclose(base[~long_rows], flipped[~long_rows], atol=1e-6)
    assert torch.allclose(alone, base[:1], atol=1e-6)


def _valid_auc(model, valid) -> list[float]:
    model.eval()
    with torch.no_grad():
        cond, _ = model.predict(model(valid))
    return [auc(valid.labels[:, t].numpy(), cond[:, t].numpy()) for t in range(2)]


def test_target_attention_learns_whether_the_target_is_in_the_history():
    """Label = "the target is in the click (cart) history": DMT's target attention finds it;
    the same-size MMoE, which sees only the mean-pooled histories, does much worse."""
    schema = history_schema()
    enc = Encoder(schema).fit(history_frame(3000, seed=4))
    train = enc.transform(history_frame(3000, seed=4))
    valid = enc.transform(history_frame(1000, seed=5))
    model = dmt(enc, dropout=0.0)
    train_steps(model, train, steps=240, lr=0.01)
    got = _valid_auc(model, valid)
    torch.manual_seed(0)
    mmoe = build_model(
        "mmoe",
        schema,
        enc.layout(),
        {"embed_dim": 8, "num_experts": 4, "expert_hidden": [16], "tower_hidden": [8]},
    )
    train_steps(mmoe, train, steps=240, lr=0.01)
    base = _valid_auc(mmoe, valid)
    assert got[0] > 0.9 and got[1] > 0.9, got
    assert got[0] > base[0] + 0.1 and got[1] > base[1] + 0.1, (got, base)


def test_bias_network_shifts_training_logits_only(small):
    enc, table = small
    model = dmt(enc, bias_features="pos", dropout=0.0)
    batch = table.head(64)
    moved = batch.take(torch.arange(64))
    pos = [f.name for f in enc.schema.embedded_fields()].index("pos")
    moved.cat[:, pos] = batch.cat[:, pos].roll(1)  # other positions, same everything else
    with torch.no_grad():
        for p in model.bias_net.parameters():  # a bias net that clearly reacts to position
            p.normal_(0, 1.0)
        model.eval()
        clean, clean_moved = model(batch), model(moved)
        model.train()
        biased, biased_moved = model(batch), model(moved)
    assert torch.equal(clean.logits, clean_moved.logits)  # serving ignores the bias features
    assert "bias_logit" not in clean.extras
    shift = biased.extras["bias_logit"]
    assert torch.allclose(biased.logits, clean.logits + shift.unsqueeze(1), atol=1e-5)
    assert not torch.allclose(biased.logits, biased_moved.logits)
    # without bias_features, the same feature is an ordinary input of the main network
    plain = dmt(enc, dropout=0.0).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(batch).logits, plain(moved).logits)


def test_bias_features_of_every_type_feed_only_the_bias_network(small):
    enc, table = small
    model = dmt(enc, bias_features="pos,price,carts")
    assert model.facet_names == ["clicks"]
    cat_names = [f.name for f in enc.schema.embedded_fields()]
    assert [cat_names[j] for j in model.bias_cat.tolist()] == ["pos"]
    assert model.bias_num.tolist() == [0] and model.main_num.tolist() == []
    model.train()
    out = model(table.head(32))
    model.task_losses(out, table.head(32)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.bias_net.parameters())


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"target_field": "film"}, "model.target_field"),
        ({"target_field": "price"}, "model.target_field"),  # numeric, not an item id
        ({"target_field": "clicks"}, "model.target_field"),
        ({"bias_features": "pos,position"}, "model.bias_features"),
        ({"bias_features": "movie"}, "model.bias_features"),  # the target itself
        ({"num_heads": 3}, "model.num_heads"),  # 3 does not divide embed_dim 8
        ({"num_heads": 0}, "model.num_heads"),
        ({"decoder_layers": 0}, "model.decoder_layers"),
        ({"num_experts": 0}, "model.num_experts"),
        ({"sequence_fields": "movie"}, "model.sequence_fields"),
        ({"sequence_fields": "clicks", "bias_features": "clicks"}, "model.sequence_fields"),
        ({"bias_features": "clicks,carts"}, "model.sequence_fields"),  # no facet left
        ({"expert_hidden": []}, "model.expert_hidden"),
        ({"heads": 2}, "model.heads"),
    ],
)
def test_bad_options_name_the_option(options, key, small):
    enc, _ = small
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_model("dmt", enc.schema, enc.layout(), {**SMALL, **options})


def test_a_schema_without_sequences_is_refused():
    frame = history_frame(50, seed=6)
    schema = Schema.from_dict(
        {"features": [{"name": "user"}, {"name": "movie"}], "tasks": [{"name": "click"}]}
    )
    enc = Encoder(schema).fit(frame)
    with pytest.raises(ConfigError, match=r"model\.sequence_fields"):
        build_model("dmt", schema, enc.layout())


def test_default_target_without_shared_vocabulary_and_a_custom_facet_list():
    frame = history_frame(200, seed=7).rename(columns={"movie": "item_id"})
    spec = history_schema(shared=False).to_dict()
    spec["features"][1]["name"] = "item_id"
    enc, table = encoded(frame, Schema.from_dict(spec))
    model = dmt(enc, sequence_fields="carts")
    assert model.target_field == "item_id" and model.facet_names == ["carts"]
    history = train_steps(model, table, steps=12)
    assert all(np.isfinite(history)) and sum(history[-3:]) < sum(history[:3])
    named = dmt(enc, target_field="user")
    assert named.target_field == "user"


def test_parameter_groups_and_a_gradient_surgery_balancer(small):
    enc, table = small
    model = dmt(enc, bias_features="pos", dropout=0.1)
    groups = assert_partition(model)
    assert all(groups)
    tower_ids = [{id(p) for p in t.parameters()} for t in model.task_modules]
    assert groups == tower_ids
    assert_own_gradients(model, table.head(128))

    model.train()
    params, moved = balancer_steps(model, table, "pcgrad", 4)
    assert all(torch.isfinite(p).all() for p in params)
    assert sum(moved) > len(params) // 2


def test_dropout_reaches_the_transformers_experts_towers_and_bias_network(small):
    from torch import nn

    from mtlrec.nn.experts import Experts
    from mtlrec.nn.mlp import MLP

    enc, _ = small
    model = dmt(enc, dropout=0.3, bias_features="pos")
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    assert len(mlps) == 3  # two towers and the bias network
    assert all(any(isinstance(x, nn.Dropout) for x in m) for m in mlps)
    assert all(m.dropout is not None for m in model.modules() if isinstance(m, Experts))
    for transformer in model.transformers:
        assert isinstance(transformer.dropout, nn.Dropout) and transformer.dropout.p == 0.3
        blocks = list(transformer.encoder) + list(transformer.decoder)
        assert blocks and all(b.attention.dropout == 0.3 for b in blocks)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_traced_eval_model_matches_eager(small):
    """Export traces the eval-mode model (no bias network) on padded random ids."""
    from mtlrec.serve.export import ExportModule, example_inputs

    enc, _ = small
    model = dmt(enc, bias_features="pos")
    module = ExportModule(model).eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, example_inputs(enc.layout(), rows=4), check_trace=False)
        check = example_inputs(enc.layout(), rows=32, seed=1)
        for got, want in zip(traced(*check), module(*check)):
            assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_scoring_a_file_without_the_bias_columns(tmp_path):
    """The bias features (position...) exist in the training log only: `predict` on a run or
    an export, and `evaluate --data`, score a file without them exactly as the file with them;
    a missing column that the main network reads is still an error naming it."""
    from mtlrec import config as cfg
    from mtlrec.errors import DataError
    from mtlrec.serve.export import export_run
    from mtlrec.train.predict_file import predict_file
    from mtlrec.train.run import evaluate_run, train_run
    from tests.conftest import files_dataset

    frames = {"train": history_frame(300, 1), "valid": history_frame(100, 2)}
    dataset = files_dataset(tmp_path / "data", frames, history_schema().to_dict())
    config = cfg.resolve(
        {
            "dataset": dataset,
            "model": {"name": "dmt", "bias_features": "pos", **SMALL},
            "train": {"epochs": 1, "batch_size": 128, "seed": 0, "threads": 1},
        }
    )
    train_run(config, tmp_path / "run", echo=lambda *_: None)
    scored = history_frame(50, 3)
    with_pos, without_pos = tmp_path / "with.csv", tmp_path / "without.csv"
    scored.to_csv(with_pos, index=False)
    scored.drop(columns=["pos"]).to_csv(without_pos, index=False)
    folders = [tmp_path / "run", export_run(tmp_path / "run", "torchscript", tmp_path / "export")]
    for folder in folders:
        want = predict_file(folder, with_pos, tmp_path / "a.csv")
        got = predict_file(folder, without_pos, tmp_path / "b.csv")
        assert got.columns == want.columns and got.rows == 50
        pd.testing.assert_frame_equal(
            pd.read_csv(tmp_path / "b.csv"), pd.read_csv(tmp_path / "a.csv")
        )
    metrics = [evaluate_run(tmp_path / "run", str(f)) for f in (with_pos, without_pos)]
    assert metrics[0]["with.csv"] == metrics[1]["without.csv"]
    scored.drop(columns=["price"]).to_csv(tmp_path / "no_price.csv", index=False)
    with pytest.raises(DataError, match="'price'"):
        predict_file(tmp_path / "run", tmp_path / "no_price.csv", tmp_path / "c.csv")
