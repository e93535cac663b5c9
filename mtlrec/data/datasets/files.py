"""A user's own CSV/Parquet files described by a schema file: no code needed."""

from __future__ import annotations

from mtlrec.data.datasets.registry import DatasetSplits, register_dataset
from mtlrec.data.readers import read_frame
from mtlrec.errors import ConfigError
from mtlrec.schema import Schema


@register_dataset("files")
def files(
    max_rows: int | None = None, seed: int = 2024, train: str | None = None,
    valid: str | None = None, test: str | None = None, schema: str | None = None, sep: str = ",",
) -> DatasetSplits:  # fmt: skip
    """Your own CSV or Parquet files: dataset.train/valid/test paths and a dataset.schema YAML."""
    if not train or not valid or not schema:
        raise ConfigError("dataset 'files' needs dataset.train, dataset.valid and dataset.schema")
    spec = Schema.load(schema)
    cols = spec.required_columns()
    frames = {
        name: read_frame(path, columns=cols, sep=sep, max_rows=max_rows)
        for name, path in (("train", train), ("valid", valid), ("test", test))
        if path
    }
    return DatasetSplits(
        spec, frames["train"], frames["valid"], frames.get("test", frames["valid"].iloc[:0]),
        source=str(train),
    )  # fmt: skip
