"""A user's own CSV/Parquet files described by a schema file: no code needed.

Either three files (``train``, ``valid``, optional ``test``), or one ``train`` file cut into
training, validation and test rows by ``valid_fraction`` / ``test_fraction``: at random (with
``split_seed``, independent of ``train.seed`` so that every seed of a sweep sees the same
split), or by time with ``split_by: <column>`` (the latest rows become the test rows, the ones
before them the validation rows), which is what a ranking model meets in production: it is
trained on the past and scores the future, so a random split would let it peek.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mtlrec.data.datasets.registry import DatasetSplits, register_dataset
from mtlrec.data.readers import read_frame
from mtlrec.errors import ConfigError, DataError
from mtlrec.schema import Schema


@register_dataset("files")
def files(
    max_rows: int | None = None, seed: int = 2024, train: str | None = None,
    valid: str | None = None, test: str | None = None, schema: str | None = None, sep: str = ",",
    valid_fraction: float = 0.0, test_fraction: float = 0.0, split_by: str | None = None,
    split_seed: int = 0,
) -> DatasetSplits:  # fmt: skip
    """Your own CSV or Parquet files: dataset.train/valid/test paths and a dataset.schema YAML."""
    if not train or not schema:
        raise ConfigError("dataset 'files' needs dataset.train and dataset.schema")
    spec = Schema.load(schema)
    cols = spec.required_columns()
    if valid_fraction or test_fraction or split_by:
        if valid or test:
            raise ConfigError(
                "dataset.valid_fraction / test_fraction / split_by cut dataset.train into splits; "
                "give either them or dataset.valid / dataset.test files, not both"
            )
        extra = [split_by] if split_by and split_by not in cols else []
        frame = read_frame(train, columns=cols + extra, sep=sep, max_rows=max_rows)
        parts = split_rows(frame, valid_fraction, test_fraction, split_by, split_seed, str(train))
        return DatasetSplits(spec, *parts, source=str(train))
    if not valid:
        raise ConfigError(
            "dataset 'files' needs dataset.valid (a file), or dataset.valid_fraction to cut the "
            "validation rows from dataset.train"
        )
    frames = {
        name: read_frame(path, columns=cols, sep=sep, max_rows=max_rows)
        for name, path in (("train", train), ("valid", valid), ("test", test))
        if path
    }
    return DatasetSplits(
        spec, frames["train"], frames["valid"], frames.get("test", frames["valid"].iloc[:0]),
        source=str(train),
    )  # fmt: skip


def split_rows(
    frame: pd.DataFrame,
    valid_fraction: float,
    test_fraction: float,
    split_by: str | None,
    split_seed: int,
    where: str,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, valid, test) rows of ``frame``: by time when ``split_by`` names a column (train
    earliest, test latest; ties keep file order), else at random with ``split_seed`` (each part in
    file order). Sizes are rounded; validation gets at least one row."""
    for key, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, int | float) or not 0 <= value < 1 or math.isnan(value):
            raise ConfigError(f"dataset.{key} must be in [0, 1) (got {value!r})")
    if not valid_fraction:
        raise ConfigError(
            "dataset.valid_fraction must be > 0: early stopping needs validation rows"
        )
    n = len(frame)
    n_test = round(n * test_fraction)
    n_valid = max(1, round(n * valid_fraction))
    n_train = n - n_valid - n_test
    if n_train < 1:
        raise DataError(
            f"{where}: {n} rows leave none for training with valid_fraction {valid_fraction} and "
            f"test_fraction {test_fraction}"
        )
    if split_by:
        order = np.argsort(_time_keys(frame[split_by], where, split_by), kind="stable")
    else:
        order = np.random.default_rng(split_seed).permutation(n)
    bounds = (order[:n_train], order[n_train : n_train + n_valid], order[n_train + n_valid :])
    if not split_by:  # at random: keep each part in file order
        bounds = tuple(np.sort(b) for b in bounds)
    return tuple(frame.iloc[b].reset_index(drop=True) for b in bounds)  # type: ignore[return-value]


def _time_keys(column: pd.Series, where: str, name: str) -> np.ndarray:
    """Sort keys of a time column: numbers (e.g. Unix seconds) or ISO 8601 dates."""
    numbers = pd.to_numeric(column, errors="coerce")
    if numbers.notna().all():
        return numbers.to_numpy(dtype=np.float64)
    times = pd.to_datetime(column, errors="coerce", format="ISO8601", utc=True)
    if times.notna().all():
        return times.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    bad = int(np.flatnonzero(numbers.isna().to_numpy() & times.isna().to_numpy())[0])
    raise DataError(
        f"{where}: column {name!r} row {bad}: {column.iloc[bad]!r} is neither a number nor an "
        "ISO 8601 date, which dataset.split_by needs to order the rows by time"
    )
