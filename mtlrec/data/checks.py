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
            f"{', '.join(map(repr, known))}); unless they are genuinely new (users who "
            "joined after the training period), check that the column has the same type and "
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


CUT_WARN = 0.05  # warn when at least this share of rows loses tokens to max_len (keep: first)
SHARED_WARN = 0.5  # warn when less than this share of a sharer's values occur in its owner
SEPARATORS = ("|", ",", ";", " ", "\t", ":")  # common separators of multi-value cells
SEPARATOR_SAMPLE = 10_000  # cells read to guess a sequence's separator


def sequence_warnings(encoder: Encoder, frame: pd.DataFrame, where: str) -> list[str]:
    """Lines about sequence and ``vocab_of`` features in ``frame`` (a training split) that
    encode without error but probably not as meant:

    - cells longer than ``max_len`` with ``keep: first``: a history written oldest first then
      loses its most recent items, which sequence models rely on most;
    - a feature sharing another's vocabulary (``vocab_of``) whose values mostly do not occur in
      that feature's column: the same id written two ways (``42`` and ``42.0``) gets two rows,
      so the history never matches the candidate;
    - a text sequence column whose cells never hold its ``sep`` but mostly hold another
      separator: every cell is read as one token (``5;3`` with ``sep: "|"``)."""
    import numpy as np

    from mtlrec.data.encoder import _tokens

    if len(frame) == 0:
        return []
    schema = encoder.schema
    sharing = {f.vocab_of for f in schema.features} | {
        f.name for f in schema.features if f.vocab_of is not None
    }
    values: dict[str, pd.Series] = {}  # feature -> its non-empty values, each read once
    for feat in schema.features:
        if feat.type == "sequence" and (feat.keep == "first" or feat.name in sharing):
            values[feat.name] = _tokens(frame[feat.source], feat, where=where)
        elif feat.name in sharing:
            text = _as_text(frame[feat.source])
            values[feat.name] = text[text != ""]
    lines = []
    for feat in schema.features_of("sequence"):
        if feat.keep != "first":
            continue
        rows = values[feat.name].index.to_numpy(dtype=np.int64)
        share = float((np.bincount(rows, minlength=len(frame)) > feat.max_len).mean())
        if share >= CUT_WARN:
            lines.append(
                f"warning: {where}: column {feat.source!r}: {share:.0%} of rows have more than "
                f"max_len={feat.max_len} tokens and keep their first {feat.max_len}; a history "
                "written oldest first needs `keep: last` to keep its most recent items"
            )
    for feat in schema.features_of("sequence"):
        line = _separator_mismatch(frame[feat.source], feat.sep)
        if line:
            lines.append(f"warning: {where}: column {feat.source!r}: {line}")
    for feat in schema.features:
        owner = schema.vocabulary_owner(feat)
        used = values.get(feat.name)
        if owner is feat or owner.hash_buckets or used is None or used.empty:
            continue
        found = used.isin(set(values[owner.name].unique()))
        share = float(found.mean())
        if share < SHARED_WARN:
            example = values[owner.name].iloc[0] if len(values[owner.name]) else ""
            lines.append(
                f"warning: {where}: column {feat.source!r} shares the vocabulary of "
                f"{owner.name!r} (vocab_of), but only {share:.0%} of its values occur in column "
                f"{owner.source!r} (e.g. {used[~found].iloc[0]!r} vs {example!r}); check that "
                "both write the ids the same way"
            )
    return lines


def _separator_mismatch(column: pd.Series, sep: str) -> str | None:
    """Why ``column`` looks written with another separator than ``sep``, or None: no non-empty
    cell holds ``sep`` while most hold one other common separator. List cells (Parquet) are
    already split and never checked."""
    from mtlrec.data.encoder import _as_text

    sample = column.head(SEPARATOR_SAMPLE)
    first = sample.dropna()
    if first.empty or not isinstance(first.iloc[0], str):
        return None
    text = _as_text(sample)
    text = text[text.str.strip() != ""]
    if text.empty or text.str.contains(sep, regex=False).any():
        return None
    for other in SEPARATORS:
        share = float(text.str.contains(other, regex=False).mean()) if other != sep else 0.0
        if share >= SHARED_WARN:
            shown = "tab" if other == "\t" else repr(other)
            return (
                f"no cell holds its separator {sep!r}, but {share:.0%} hold {shown}: each cell is "
                f"read as one token; set the feature's sep to {shown} if that is the separator"
            )
    return None
