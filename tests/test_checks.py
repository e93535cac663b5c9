"""Warnings about valid but suspicious input: a validation id column that training never saw."""

import pandas as pd

from mtlrec.data.checks import unseen_value_warnings
from mtlrec.data.encoder import Encoder
from mtlrec.schema import Feature, Schema, Task

SCHEMA = Schema(
    [Feature("user"), Feature("rare", min_freq=5), Feature("page", hash_buckets=8)],
    [Task("y")],
)


def _frame(users, rare=None, n=None):
    n = n or len(users)
    return pd.DataFrame(
        {
            "user": users,
            "rare": rare if rare is not None else [f"r{i}" for i in range(n)],
            "page": [f"p{i}" for i in range(n)],
            "y": [i % 2 for i in range(n)],
        }
    )


def test_ids_formatted_differently_in_validation_are_warned_about():
    train = _frame([str(i % 20) for i in range(200)])
    enc = Encoder(SCHEMA).fit(train)
    valid = _frame([f"{i % 20}.0" for i in range(50)])  # read as floats in this file
    lines = unseen_value_warnings(
        enc, enc.transform(valid), valid, "valid.parquet", enc.transform(train)
    )
    # 'rare' is all unseen in validation too, but mostly unseen in training as well (min_freq):
    # not a format problem. 'page' is hashed: it has no vocabulary to miss.
    assert len(lines) == 1
    assert lines[0].startswith(
        "warning: valid.parquet: column 'user': 100% of its values were never seen in training "
        "(e.g. '0.0', '1.0', '2.0'; training has '0', '1', '10'); unless they are genuinely new"
    )


def test_a_few_new_ids_are_normal():
    train = _frame([str(i % 20) for i in range(200)])
    enc = Encoder(SCHEMA).fit(train)
    valid = _frame([str(i % 30) for i in range(60)])  # a third are new users
    assert unseen_value_warnings(enc, enc.transform(valid), valid, "v", enc.transform(train)) == []
    assert unseen_value_warnings(enc, enc.transform(valid.head(0)), valid.head(0), "v") == []


def _history_schema(keep: str = "first") -> Schema:
    return Schema(
        [Feature("item"), Feature("hist", "sequence", max_len=3, vocab_of="item", keep=keep)],
        [Task("y")],
    )


def test_histories_cut_at_max_len_from_the_front_are_warned_about():
    from mtlrec.data.checks import sequence_warnings

    frame = pd.DataFrame(
        {"item": ["1", "2", "3", "4"], "hist": ["1|2|3|4", "2|3", "1|2|3|4|1", ""], "y": [0, 1] * 2}
    )
    lines = sequence_warnings(Encoder(_history_schema()).fit(frame), frame, "train.csv")
    assert len(lines) == 1
    assert "train.csv: column 'hist': 50% of rows have more than max_len=3 tokens" in lines[0]
    assert "keep: last" in lines[0]
    keep_last = _history_schema("last")
    assert sequence_warnings(Encoder(keep_last).fit(frame), frame, "train.csv") == []


def test_a_history_writing_ids_differently_from_its_vocabulary_owner_is_warned_about():
    from mtlrec.data.checks import sequence_warnings

    items = [str(i) for i in range(10)]
    same = pd.DataFrame({"item": items, "hist": items, "y": [0, 1] * 5})
    assert sequence_warnings(Encoder(_history_schema()).fit(same), same, "t") == []
    floats = same.assign(item=[f"{i}.0" for i in range(10)])  # a nullable int read as float
    lines = sequence_warnings(Encoder(_history_schema()).fit(floats), floats, "t")
    assert len(lines) == 1
    assert "column 'hist' shares the vocabulary of 'item' (vocab_of), but only 0%" in lines[0]
    assert "'0' vs '0.0'" in lines[0]


def test_training_prints_the_sequence_warnings(tmp_path):
    from mtlrec.config import resolve
    from mtlrec.train.run import train_run
    from tests.conftest import files_dataset

    frame = pd.DataFrame(
        {
            "item": [str(i % 7) for i in range(64)],
            "hist": ["|".join(str((i + k) % 7) for k in range(5)) for i in range(64)],
            "y": [i % 2 for i in range(64)],
        }
    )
    schema = {
        "features": [
            {"name": "item"},
            {"name": "hist", "type": "sequence", "max_len": 3, "vocab_of": "item"},
        ],
        "tasks": [{"name": "y"}],
    }
    dataset = files_dataset(tmp_path / "data", {"train": frame, "valid": frame}, schema)
    config = resolve({"dataset": dataset, "model": {"name": "mmoe"}, "train": {"epochs": 1}})
    lines: list[str] = []
    train_run(config, tmp_path / "run", echo=lambda *a, **_: lines.append(" ".join(map(str, a))))
    assert any("column 'hist': 100% of rows have more than max_len=3" in line for line in lines)


def test_a_sequence_written_with_another_separator_is_warned_about():
    """'5;3' with sep '|' encoded silently as one token per cell."""
    from mtlrec.data.checks import sequence_warnings

    schema = Schema([Feature("tags", "sequence", max_len=4)], [Task("y")])
    frame = pd.DataFrame({"tags": ["5;3", "1;2;7", "4", ""], "y": [0, 1, 0, 1]})
    lines = sequence_warnings(Encoder(schema).fit(frame), frame, "train.csv")
    assert len(lines) == 1
    assert "column 'tags': no cell holds its separator '|', but 67% hold ';'" in lines[0]
    frame["tags"] = ["5|3", "1;2", "4", ""]  # the declared separator occurs: no guess
    assert sequence_warnings(Encoder(schema).fit(frame), frame, "train.csv") == []
    frame["tags"] = ["5", "1", "4", ""]  # single tokens only: nothing to say
    assert sequence_warnings(Encoder(schema).fit(frame), frame, "train.csv") == []
