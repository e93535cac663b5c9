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
        "(e.g. '0.0', '1.0', '2.0'; training has '0', '1', '10')"
    )


def test_a_few_new_ids_are_normal():
    train = _frame([str(i % 20) for i in range(200)])
    enc = Encoder(SCHEMA).fit(train)
    valid = _frame([str(i % 30) for i in range(60)])  # a third are new users
    assert unseen_value_warnings(enc, enc.transform(valid), valid, "v", enc.transform(train)) == []
    assert unseen_value_warnings(enc, enc.transform(valid.head(0)), valid.head(0), "v") == []
