import json

import numpy as np
import pandas as pd
import pytest
import torch

from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError, DataError
from mtlrec.schema import Feature, Schema, Task
from tests.conftest import funnel_frame


def _schema(**kw):
    return Schema(
        features=[Feature("c", min_freq=kw.get("min_freq", 1)), Feature("x", "numeric")],
        tasks=[Task("y")],
    )


def test_vocabulary_oov_and_offsets():
    train = pd.DataFrame(
        {"c": ["a", "b", "a", "c"], "x": ["1", "2", "3", ""], "y": ["0", "1", "0", "1"]}
    )
    enc = Encoder(_schema(min_freq=2)).fit(train)
    layout = enc.layout()
    # row 0 = padding; feature 'c' owns rows 1.. with OOV first; only 'a' is frequent enough
    assert layout.field_offsets == (1,)
    assert layout.field_sizes == (2,)
    assert layout.vocab_size == 3
    table = enc.transform(
        pd.DataFrame({"c": ["a", "b", "zzz"], "x": ["2", "nan", "?"], "y": [1, 0, 1]})
    )
    assert table.cat[:, 0].tolist() == [2, 1, 1]  # a -> 1+1, rare b and unseen zzz -> OOV (1+0)
    # numeric: mean of 1,2,3 = 2 (missing ignored), missing at transform -> mean -> 0 after scaling
    assert table.num[0, 0].item() == pytest.approx(0.0)
    assert table.num[1, 0].item() == 0.0 and table.num[2, 0].item() == 0.0
    assert table.labels[:, 0].tolist() == [1.0, 0.0, 1.0]


def test_numeric_standardisation_uses_training_statistics():
    train = pd.DataFrame({"c": ["a"] * 4, "x": [1.0, 2.0, 3.0, 4.0], "y": [0, 1, 0, 1]})
    enc = Encoder(_schema()).fit(train)
    table = enc.transform(pd.DataFrame({"c": ["a"], "x": [10.0], "y": [1]}))
    expected = (10.0 - 2.5) / np.std([1.0, 2.0, 3.0, 4.0])
    assert table.num[0, 0].item() == pytest.approx(expected, rel=1e-5)


def test_hashing_is_stable_and_bounded():
    schema = Schema([Feature("c", hash_buckets=7)], [Task("y")])
    frame = pd.DataFrame({"c": [f"v{i}" for i in range(100)], "y": [0, 1] * 50})
    enc = Encoder(schema).fit(frame)
    a = enc.transform(frame).cat[:, 0]
    b = Encoder.from_dict(enc.to_dict()).transform(frame).cat[:, 0]
    assert torch.equal(a, b)
    assert a.min() >= 1 and a.max() <= 7
    assert len(set(a.tolist())) > 3


def test_sequence_feature_is_padded_truncated_and_shares_the_table():
    schema = Schema([Feature("c"), Feature("s", "sequence", sep="|", max_len=3)], [Task("y")])
    train = pd.DataFrame({"c": ["a", "b"], "s": ["x|y", "y|z|w|v"], "y": [0, 1]})
    enc = Encoder(schema).fit(train)
    table = enc.transform(pd.DataFrame({"c": ["a", "a"], "s": ["", "x|new|y|z"], "y": [0, 1]}))
    seq_offset = enc.layout().field_offsets[1]
    assert table.seq.shape == (2, 3)
    assert table.seq[0].tolist() == [0, 0, 0]  # empty -> all padding
    vocab = enc.state["s"]["vocab"]
    x, y = vocab.index("x") + 1 + seq_offset, vocab.index("y") + 1 + seq_offset
    assert table.seq[1].tolist() == [x, seq_offset, y]  # 'new' -> OOV, cut at 3


def test_sequence_tokens_skip_empty_parts_and_missing_cells_with_any_separator():
    """Empty parts (leading, trailing, doubled separators) and missing cells give no token; a
    token's position counts only the tokens before it; a multi-character separator is literal."""
    schema = Schema([Feature("s", "sequence", sep="::", max_len=4)], [Task("y")])
    train = pd.DataFrame({"s": ["a::b::c", "d"], "y": [0, 1]})
    enc = Encoder(schema).fit(train)
    assert enc.state["s"]["vocab"] == ["a", "b", "c", "d"]
    frame = pd.DataFrame(
        {"s": ["::a::::b::", None, "", "c:d::é", "d::d::d::d::d", "a|b"], "y": [0] * 6}
    )
    off = enc.layout().field_offsets[0]
    ids = {v: off + 1 + i for i, v in enumerate(["a", "b", "c", "d"])}
    oov = off
    assert enc.transform(frame).seq.tolist() == [
        [ids["a"], ids["b"], 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
        [oov, oov, 0, 0],  # 'c:d' and 'é' are unseen tokens
        [ids["d"]] * 4,  # cut at max_len
        [oov, 0, 0, 0],  # '|' is not this feature's separator
    ]


def test_a_list_column_reads_like_the_same_values_joined_by_the_separator(tmp_path):
    """Parquet stores multi-value fields as lists (list<string>, list<int64>); each item is a
    token, as if the list were written as text joined by ``sep``. Read back through pandas, each
    row is an array."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mtlrec.data.readers import read_frame

    schema = Schema([Feature("s", "sequence", max_len=3), Feature("n", "sequence")], [Task("y")])
    text = pd.DataFrame(
        {"s": ["x|y", "", "y|z|w|v", "x"], "n": ["1|2", "3", "", "2"], "y": [0, 1, 0, 1]}
    )
    lists = pa.table(
        {
            "s": pa.array(
                [["x", "y"], None, ["y", "z", "w", "v"], ["", "x"]], pa.list_(pa.string())
            ),
            "n": pa.array([[1, 2], [3], [], [2]], pa.list_(pa.int64())),
            "y": [0, 1, 0, 1],
        }
    )
    pq.write_table(lists, tmp_path / "lists.parquet")
    frame = read_frame(tmp_path / "lists.parquet")
    from_text, from_lists = Encoder(schema).fit(text), Encoder(schema).fit(frame)
    assert from_lists.state == from_text.state
    assert torch.equal(from_lists.transform(frame).seq, from_text.transform(text).seq)
    nested = pd.DataFrame({"s": [[["x"]], [["y"]]], "n": ["1", "2"], "y": [0, 1]})
    with pytest.raises(DataError, match="train: column 's': sequence feature 's' holds lists"):
        Encoder(schema).fit(nested, where="train")


def test_round_trip_through_json_file_encodes_identically(tmp_path, funnel_schema):
    train, other = funnel_frame(500, seed=3), funnel_frame(200, seed=4)
    enc = Encoder(funnel_schema).fit(train)
    enc.save(tmp_path / "encoder.json")
    loaded = Encoder.load(tmp_path / "encoder.json")
    a, b = enc.transform(other), loaded.transform(other)
    for name in ("cat", "seq", "num", "labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert loaded.layout() == enc.layout()


def test_an_encoder_file_of_the_wrong_shape_is_named(tmp_path, funnel_schema):
    """Valid JSON that is not an encoder (a KeyError/TypeError traceback before) names the file;
    so does a feature missing from the fitted state."""
    enc = Encoder(funnel_schema).fit(funnel_frame(50))
    path = tmp_path / "encoder.json"
    for content, needle in (
        ("{}", "not an mtlrec encoder"),
        ("[]", "not an mtlrec encoder"),
        ('{"schema": 5, "state": {}}', "schema: expected a mapping"),
    ):
        path.write_text(content)
        with pytest.raises(DataError, match=f"encoder.json: {needle}"):
            Encoder.load(path)
    enc.save(path)
    data = json.loads(path.read_text())
    del data["state"]["price"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="encoder.json: encoder: no fitted state for .*price"):
        Encoder.load(path)
    assert not list(tmp_path.glob(".encoder.json.*"))  # the atomic write left no temporary


def test_unseen_values_at_evaluation_never_crash(funnel_schema):
    enc = Encoder(funnel_schema).fit(funnel_frame(300))
    weird = funnel_frame(50, seed=9)
    weird["user"] = "never-seen"
    weird["tags"] = "brand-new|t1"
    table = enc.transform(weird)
    assert (table.cat[:, 0] == enc.layout().field_offsets[0]).all()  # all OOV


def test_a_regression_label_too_large_for_float32_names_row_and_column():
    """1e300 is finite in float64 and passed; training then stopped on an inf loss that named no
    row."""
    schema = Schema([Feature("c")], [Task("r", type="regression")])
    frame = pd.DataFrame({"c": ["a"] * 3, "r": ["1.5", "-1e300", "1e14"]})
    with pytest.raises(DataError, match=r"column 'r' row 1: label '-1e300' is too large"):
        Encoder(schema).fit(frame).transform(frame)
    frame.loc[1, "r"] = "-1e15"  # the largest accepted magnitude
    label = Encoder(schema).fit(frame).transform(frame).labels[1, 0].item()
    assert label == pytest.approx(-1e15, rel=1e-7)  # float32


def test_binary_labels_written_as_true_false_read_as_one_zero():
    schema = Schema([Feature("c")], [Task("y"), Task("r", type="regression")])
    frame = pd.DataFrame(
        {"c": ["a"] * 4, "y": ["true", "False", " TRUE ", "0"], "r": ["1.5", "2", "0", "1"]}
    )
    table = Encoder(schema).fit(frame).transform(frame)
    assert table.labels[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]
    frame.loc[2, "y"] = "yes"
    with pytest.raises(DataError, match="column 'y' row 2: 'yes'"):
        Encoder(schema).fit(frame).transform(frame)
    frame.loc[2, "y"] = "1"
    frame.loc[1, "r"] = "true"  # a regression target is a number, never a boolean
    with pytest.raises(DataError, match="column 'r' row 1: 'true' is not a number"):
        Encoder(schema).fit(frame).transform(frame)


@pytest.mark.parametrize(
    "column, value, needle",
    [
        ("y", "2", "column 'y' row 1: label '2' is not 0 or 1"),
        ("y", "", "column 'y' row 1"),
        ("y", "nan", "column 'y' row 1"),
        ("x", "abc", "column 'x' row 1: 'abc' is not a number"),
        (
            "x",
            "1e200",
            r"column 'x' row 1: '1e200' is too large for feature 'x' \(\|x\| > 1e\+30\)",
        ),
    ],
)
def test_bad_values_name_column_and_row(column, value, needle):
    frame = pd.DataFrame({"c": ["a", "b", "c"], "x": ["1", "2", "3"], "y": ["0", "1", "0"]})
    frame.loc[1, column] = value
    with pytest.raises(DataError, match=needle):
        Encoder(_schema()).fit(frame).transform(frame, where="train.csv")


def test_a_huge_value_is_fine_after_log():
    schema = Schema([Feature("x", "numeric", log=True)], [Task("y")])
    frame = pd.DataFrame({"x": ["1e200", "1", "10"], "y": ["0", "1", "0"]})
    table = Encoder(schema).fit(frame).transform(frame)
    assert torch.isfinite(table.num).all() and table.num[:, 0].std() > 0


def test_missing_column_is_named():
    frame = pd.DataFrame({"c": ["a"], "y": [1]})
    with pytest.raises(DataError, match="missing column.*'x'"):
        Encoder(_schema()).fit(frame, where="train.csv")


def test_dependent_task_positive_without_upstream_is_rejected(funnel_schema):
    frame = funnel_frame(100)
    row = int(np.flatnonzero(frame["click"].to_numpy() == 0)[0])
    frame.loc[row, "purchase"] = 1
    with pytest.raises(DataError, match=f"row {row}: task 'purchase' is positive"):
        Encoder(funnel_schema).fit(frame).transform(frame)


def test_serving_mode_needs_no_labels(funnel_schema):
    enc = Encoder(funnel_schema).fit(funnel_frame(100))
    frame = funnel_frame(10).drop(columns=["click", "purchase"])
    table = enc.transform(frame, labels=False)
    assert table.labels.shape == (10, 2)


def _shared_schema(**item):
    return Schema(
        [
            Feature("item", **item),
            Feature("hist", "sequence", max_len=4, vocab_of="item"),
            Feature("prev", vocab_of="item"),
        ],
        [Task("y")],
    )


SHARED_TRAIN = pd.DataFrame(
    {
        "item": ["a", "b", "a"],
        "hist": ["c|a", "", "b|c|d"],  # 'c' and 'd' are never a candidate item
        "prev": ["d", "a", "e"],
        "y": [1, 0, 1],
    }
)


def test_vocab_of_gives_the_same_id_the_same_row_and_fits_on_every_user():
    enc = Encoder(_shared_schema()).fit(SHARED_TRAIN)
    assert enc.state["item"]["vocab"] == ["a", "b", "c", "d", "e"]
    layout = enc.layout()
    assert layout.vocab_size == 1 + 6  # padding + one block (OOV + 5), no block per user
    assert layout.field_offsets == (1, 1, 1) and layout.field_sizes == (6, 6, 6)
    frame = pd.DataFrame({"item": ["c", "zz"], "hist": ["a|c|zz", "c"], "prev": ["c", "a"]})
    table = enc.transform(frame, labels=False)
    c_row = 1 + 1 + 2  # block start + OOV + position of 'c'
    assert table.cat[0].tolist() == [c_row, c_row]
    assert table.seq[0].tolist() == [2, c_row, 1, 0]  # a, c, unseen -> OOV, padding
    assert table.seq[1, 0].item() == table.cat[0, 0].item()


def test_vocab_of_min_freq_counts_the_owner_and_its_users_together():
    enc = Encoder(_shared_schema(min_freq=2)).fit(SHARED_TRAIN)
    # a: 2 + 2 (hist) + 1 (prev); b: 1 + 1; c: 2; d: 1 + 1; e: 1
    assert enc.state["item"]["vocab"] == ["a", "b", "c", "d"]


def test_vocab_of_follows_a_hashed_owner_and_survives_a_round_trip(tmp_path):
    enc = Encoder(_shared_schema(hash_buckets=11)).fit(SHARED_TRAIN)
    assert enc.layout().vocab_size == 1 + 11
    enc.save(tmp_path / "encoder.json")
    again = Encoder.load(tmp_path / "encoder.json")
    frame = pd.DataFrame({"item": ["q"], "hist": ["q|a"], "prev": ["q"]})
    a, b = enc.transform(frame, labels=False), again.transform(frame, labels=False)
    assert torch.equal(a.seq, b.seq) and torch.equal(a.cat, b.cat)
    assert a.cat[0, 0] == a.cat[0, 1] == a.seq[0, 0]


def test_streaming_fit_shares_vocabularies_like_the_in_memory_fit(tmp_path):
    from mtlrec.data.stream import fit_encoder_stream

    path = tmp_path / "train.parquet"
    SHARED_TRAIN.to_parquet(path)
    schema = _shared_schema(min_freq=2)
    streamed = fit_encoder_stream(schema, path, read_rows=1)
    assert streamed.state == Encoder(schema).fit(SHARED_TRAIN).state


@pytest.mark.parametrize(
    "features, needle",
    [
        ([Feature("s", "sequence", vocab_of="nope")], "vocab_of 'nope' must name a categorical"),
        (
            [Feature("x", "numeric"), Feature("s", "sequence", vocab_of="x")],
            "vocab_of 'x' must name a categorical",
        ),
        (
            [Feature("t", "sequence"), Feature("s", "sequence", vocab_of="t")],
            "vocab_of 't' must name a categorical",
        ),
        (
            [Feature("a"), Feature("b", vocab_of="a"), Feature("c", vocab_of="b")],
            "vocab_of 'b' must name a categorical feature of the schema that has its own",
        ),
        ([Feature("a", vocab_of="a")], "vocab_of 'a' must name"),
    ],
)
def test_vocab_of_must_name_a_categorical_feature_with_its_own_vocabulary(features, needle):
    from mtlrec.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        Schema(features, [Task("y")])


def test_vocab_of_refuses_its_own_min_freq_or_hashing_and_numeric_features():
    from mtlrec.errors import ConfigError

    with pytest.raises(ConfigError, match="set min_freq and hash_buckets on 'item'"):
        Feature("h", "sequence", vocab_of="item", min_freq=3)
    with pytest.raises(ConfigError, match="vocab_of applies to categorical and sequence"):
        Feature("n", "numeric", vocab_of="item")
    with pytest.raises(ConfigError, match="unknown key"):
        Schema.from_dict({"features": [{"name": "a", "vocab": "b"}], "tasks": [{"name": "y"}]})
    loaded = Schema.from_dict(
        {
            "features": [{"name": "i"}, {"name": "h", "type": "sequence", "vocab_of": "i"}],
            "tasks": [{"name": "y"}],
        }
    )
    assert loaded.features[1].vocab_of == "i"
    assert Schema.from_dict(loaded.to_dict()) == loaded


def test_keep_last_keeps_the_most_recent_tokens_of_a_long_history():
    schema = Schema(
        [Feature("h", "sequence", max_len=3, keep="last"), Feature("f", "sequence", max_len=3)],
        [Task("y")],
    )
    frame = pd.DataFrame(
        {"h": ["a|b|c|d|e", "a||b", ""], "f": ["a|b|c|d|e", "a", ""], "y": [1, 0, 1]}
    )
    enc = Encoder(schema).fit(frame)
    table = enc.transform(frame)
    off_h, off_f = enc.layout().field_offsets
    vocab = enc.state["h"]["vocab"]

    def ids(tokens, offset):
        return [vocab.index(t) + 1 + offset for t in tokens]

    assert table.seq[0, :3].tolist() == ids("cde", off_h)  # the last three, in order
    assert table.seq[1, :3].tolist() == ids("ab", off_h) + [0]  # short: left-aligned as before
    assert table.seq[2, :3].tolist() == [0, 0, 0]
    assert table.seq[0, 3:].tolist() == ids("abc", off_f)  # keep: first (default)
    with pytest.raises(ConfigError, match="keep must be 'first' or 'last'"):
        Feature("h", "sequence", keep="end")
    with pytest.raises(ConfigError, match="keep applies to sequence features only"):
        Feature("c", keep="last")


def test_an_embedding_table_too_large_to_allocate_is_named():
    """hash_buckets with a few zeros too many was a bare 'can't allocate memory' RuntimeError."""
    from mtlrec.models import build_model

    schema = Schema([Feature("c", hash_buckets=10**11)], [Task("y")])
    frame = pd.DataFrame({"c": ["a", "b"], "y": [0, 1]})
    enc = Encoder(schema).fit(frame)
    with pytest.raises(ConfigError, match=r"embedding table of 100,000,000,00\d rows x 16"):
        build_model("shared-bottom", schema, enc.layout(), {"embed_dim": 16})


def test_a_list_column_declared_categorical_is_named(tmp_path):
    """A Parquet list column read as a categorical feature became one category per printed
    list without a word."""
    frame = pd.DataFrame({"tags": [["a", "b"], ["c"], None], "y": [0, 1, 0]})
    frame.to_parquet(tmp_path / "t.parquet")
    read = pd.read_parquet(tmp_path / "t.parquet")
    schema = Schema([Feature("tags")], [Task("y")])
    with pytest.raises(DataError, match="column 'tags' holds lists.*type: sequence"):
        Encoder(schema).fit(read, where="t.parquet")
    as_sequence = Schema([Feature("tags", "sequence", max_len=2)], [Task("y")])
    assert Encoder(as_sequence).fit(read).transform(read).seq.shape == (3, 2)
