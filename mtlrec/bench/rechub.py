"""Hand mtlrec-encoded tables to torch-rechub, so both libraries train on identical arrays.

Why: a quality comparison with a peer library is only fair when both see the same split and the
same encoded values. torch-rechub wants one integer column per categorical field (0..size-1)
and one float column per dense feature; mtlrec holds categorical values as global indices into
one fused table. ``rechub_features`` / ``rechub_columns`` translate between the two. torch-rechub
is imported lazily: it is a benchmark-only peer, never a dependency of the library.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def rechub_features(layout: Any, embed_dim: int) -> list[Any]:
    """torch-rechub ``SparseFeature`` per categorical field and ``DenseFeature`` per numeric column
    of an encoder ``layout`` (field sizes include the out-of-vocabulary bucket 0). Sequence
    features have no torch-rechub counterpart here and are left out."""
    from torch_rechub.basic.features import DenseFeature, SparseFeature

    features: list[Any] = [
        SparseFeature(f"c{i}", vocab_size=size, embed_dim=embed_dim)
        for i, size in enumerate(layout.field_sizes[: layout.num_categorical])
    ]
    features += [DenseFeature(f"n{i}") for i in range(layout.num_numeric)]
    return features


def rechub_columns(layout: Any, table: Any) -> dict[str, np.ndarray]:
    """The columns of an encoded ``table`` keyed as ``rechub_features`` names them: each field's
    own 0..size-1 index (global index minus the field's offset) and each standardised numeric."""
    local = table.cat.numpy() - np.asarray(layout.field_offsets[: layout.num_categorical])
    columns = {f"c{i}": local[:, i] for i in range(layout.num_categorical)}
    numeric = table.num.numpy()
    columns.update({f"n{i}": numeric[:, i] for i in range(layout.num_numeric)})
    return columns


def encoded_census(splits: tuple[str, ...] = ("train", "valid")) -> tuple[Any, dict[str, Any]]:
    """(encoder, {split: encoded table}) of Census-Income, the encoder fitted on the training
    split without numeric buckets (torch-rechub has no such input). Only the named splits are
    encoded, so a check that must not read the test split never does."""
    from mtlrec.data.datasets import load_dataset
    from mtlrec.data.encoder import Encoder

    data = load_dataset("census-income")
    encoder = Encoder(data.schema).fit(data.train)
    return encoder, {name: encoder.transform(getattr(data, name)) for name in splits}
