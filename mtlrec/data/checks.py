"""Data checks that warn instead of fail: the input is valid, but probably not what was meant.

An id column read as integers in the training file and as floats in the validation file
("5" vs "5.0"), or with another prefix or case, encodes every validation value as
out-of-vocabulary. Nothing crashes and the run trains; the model just never sees that feature
at evaluation time, which costs AUC without a word. A validation column whose values are almost
all unseen, while training saw few unseen ones, is worth a warning before a long run.
"""

from __future__ import annotations

import pandas as pd
import torch

from mtlrec.data.encoder import Encoder, _as_text
from mtlrec.data.table import TensorTable

UNSEEN_WARN = 0.5  # warn when at least this share of a split's values is out of vocabulary ...
TRAIN_BASELINE = 0.2  # ... and the training split's own share was below this


def unseen_value_warnings(
    encoder: Encoder,
    split: TensorTable,
    frame: pd.DataFrame,
    where: str,
    train: TensorTable | None = None,
) -> list[str]:
    """One line per vocabulary (not hashed) categorical feature whose values in ``split`` are
    mostly out of vocabulary. ``train``: the encoded training split, when in memory (rare values
    below ``min_freq`` are out of vocabulary there too, which this compares against)."""
    if len(split) == 0:
        return []
    layout = encoder.layout()
    lines = []
    for j, feat in enumerate(encoder.schema.embedded_fields()[: layout.num_categorical]):
        if feat.type != "categorical" or "vocab" not in encoder.state[feat.name]:
            continue
        oov_id = layout.field_offsets[j]  # local id 0
        unseen = split.cat[:, j] == oov_id
        share = float(unseen.float().mean())
        base = float((train.cat[:, j] == oov_id).float().mean()) if train is not None else 0.0
        if share < UNSEEN_WARN or base >= TRAIN_BASELINE:
            continue
        rows = torch.nonzero(unseen).flatten()[:1000].numpy()
        examples = list(dict.fromkeys(_as_text(frame[feat.source].iloc[rows])))[:3]
        known = encoder.state[feat.name]["vocab"][:3]
        lines.append(
            f"warning: {where}: column {feat.source!r}: {share:.0%} of its values were never "
            f"seen in training (e.g. {', '.join(map(repr, examples))}; training has "
            f"{', '.join(map(repr, known))}); check that the column has the same type and "
            "format in every file"
        )
    return lines


SAMPLE_ROWS = 10_000


def unseen_in_file_warnings(
    encoder: Encoder, frame: pd.DataFrame, where: str, first_row: int = 0
) -> list[str]:
    """:func:`unseen_value_warnings` for a file scored or evaluated with a finished run, from the
    first rows of its first chunk (the whole file is not held in memory)."""
    head = frame.head(SAMPLE_ROWS)
    table = encoder.transform(head, where=where, labels=False, first_row=first_row)
    return unseen_value_warnings(encoder, table, head, where)
