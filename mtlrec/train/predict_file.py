"""Batch scoring: a finished run's per-task predictions for every row of a CSV or Parquet file.

The offline counterpart of ``mtlrec serve``: the run's saved encoder and best weights (or an
export folder's TorchScript / ONNX graph: the artifact that ships is the one scored), no labels
needed (label columns in the file are ignored unless kept), values never seen in training go to
the out-of-vocabulary buckets. Output columns, in input row order:

- the ``keep`` columns, copied unchanged (ids to join the scores back on);
- ``pred_<task>`` per task: the probability for a binary task (for a task with ``depends_on``,
  conditional on its upstream task: pCVR), the predicted value for a regression task;
- ``pred_<task>_joint`` per task with ``depends_on``: the entire-space probability (pCTCVR);
- ``score`` with a fusion file (the ``serve:`` mapping of ``mtlrec serve``): the fused ranking
  score the service would return for the same candidate.

A Parquet file or folder is read and written a record batch at a time, so memory stays bounded
whatever the file size; a CSV file is read whole. The output appears only when complete (written
under a temporary name, then renamed): a failed run never leaves a truncated file behind.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mtlrec.config import TrainConfig, separator_option
from mtlrec.data.checks import unseen_in_file_warnings
from mtlrec.data.encoder import Encoder
from mtlrec.data.stream import READ_ROWS, exact_name, file_chunks, training_only_columns
from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError, make_dir
from mtlrec.models import MTLModel
from mtlrec.schema import Schema
from mtlrec.train.run import csv_separator, eval_batch_size, load_run
from mtlrec.train.trainer import predict

OUTPUT_SUFFIXES = (".parquet", ".pq", ".csv")
SCORE = "score"


@dataclass(frozen=True)
class PredictSummary:
    """What ``predict_file`` wrote: the output path, rows, columns and the seconds it took."""

    out: Path
    rows: int
    columns: list[str]
    seconds: float


def prediction_columns(schema: Schema) -> list[tuple[str, int, bool]]:
    """(output column, task index, joint?) for every prediction column, in output order."""
    out: list[tuple[str, int, bool]] = []
    for t, task in enumerate(schema.tasks):
        out.append((f"pred_{task.name}", t, False))
        if task.depends_on:
            out.append((f"pred_{task.name}_joint", t, True))
    return out


Score = Callable[[TensorTable], tuple[np.ndarray, np.ndarray]]  # encoded rows -> (cond, joint)


def predict_frame(
    model: MTLModel | Score,
    encoder: Encoder,
    frame: pd.DataFrame,
    *,
    batch_size: int = TrainConfig.eval_batch_size,
    where: str = "data",
    first_row: int = 0,
) -> pd.DataFrame:
    """The prediction columns for the rows of ``frame`` (its index is kept). ``model``: a model,
    or a function of an encoded batch such as an export's ``load_predictor(...).predict``."""
    table = encoder.transform(frame, where=where, labels=False, first_row=first_row)
    if isinstance(model, MTLModel):
        cond, joint = (t.numpy() for t in predict(model, table, batch_size))
    else:
        parts = [model(batch) for batch in table.batches(batch_size)]
        empty = np.zeros((0, len(encoder.schema.tasks)), np.float32)
        cond = np.concatenate([c for c, _ in parts]) if parts else empty
        joint = np.concatenate([j for _, j in parts]) if parts else empty
    return pd.DataFrame(
        {
            name: (joint if is_joint else cond)[:, t]
            for name, t, is_joint in prediction_columns(encoder.schema)
        },
        index=frame.index,
    )


def predict_file(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    keep: Sequence[str] = (),
    fusion: str | Path | None = None,
    batch_size: int | None = None,
    read_rows: int = READ_ROWS,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
    sep: str | None = None,
) -> PredictSummary:
    """Score every row of ``data`` with the run (or export folder) in ``run_dir`` and write
    ``out`` (.parquet, .pq or .csv). ``keep``: input columns to copy into the output;
    ``fusion``: a fusion YAML file, adds the fused ``score`` column; ``warn``: called with each
    warning about the data (mostly unseen values in a categorical column); ``sep``: a CSV's
    separator (default: the one the run's training files had)."""
    out = Path(out)
    if not out.name.lower().endswith(OUTPUT_SUFFIXES):
        raise ConfigError(f"{out}: the output must end in {', '.join(OUTPUT_SUFFIXES)}")
    source = Path(data).resolve()
    if out.resolve() == source or source in out.resolve().parents:
        raise ConfigError(f"--out {out}: it would overwrite the input {data}; write elsewhere")
    encoder, model, default_batch, trained_sep, training_only = _load(Path(run_dir))
    sep = separator_option(sep) or trained_sep
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    batch = int(batch_size or default_batch)
    keep = list(dict.fromkeys(keep))
    fuse = _fusion(fusion, encoder.schema) if fusion is not None else None
    names = [name for name, _, _ in prediction_columns(encoder.schema)]
    names += [SCORE] if fuse else []
    clash = sorted(set(keep) & set(names))
    if clash:
        raise ConfigError(f"--keep {', '.join(clash)}: the name of a prediction column")
    columns = list(dict.fromkeys(f.source for f in encoder.schema.features))
    csv_out = out.name.lower().endswith(".csv")
    list_seps = {f.source: f.sep for f in encoder.schema.features_of("sequence")}
    optional = training_only_columns(encoder.schema, training_only)  # read as missing if absent
    total, chunks = file_chunks(data, columns, read_rows, exact=keep, sep=sep, optional=optional)
    start = time.perf_counter()
    rows = 0
    writer = _AtomicWriter(out)
    try:
        with _ProgressBar(progress, total) as advance:
            for where, first_row, frame in chunks:
                if rows == 0 and warn is not None:
                    for line in unseen_in_file_warnings(encoder, frame, where, first_row):
                        warn(line)
                preds = predict_frame(
                    model, encoder, frame, batch_size=batch, where=where, first_row=first_row
                )
                if fuse is not None:
                    preds[SCORE] = fuse(preds)
                kept = pd.DataFrame({c: frame[exact_name(c)] for c in keep}, index=frame.index)
                if csv_out:
                    kept = _joined_lists(kept, list_seps)
                writer.write(pd.concat([kept, preds], axis=1).reset_index(drop=True))
                rows += len(frame)
                advance(len(frame))
        if rows == 0:  # still a valid, empty file with the right columns
            empty = {c: pd.Series(dtype=object) for c in keep}
            empty.update({c: pd.Series(dtype=np.float32) for c in names})
            writer.write(pd.DataFrame(empty))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return PredictSummary(out, rows, keep + names, time.perf_counter() - start)


def _joined_lists(kept: pd.DataFrame, seps: dict[str, str]) -> pd.DataFrame:
    """Kept list columns (a Parquet ``list<...>`` history) as text a CSV reader reads back: items
    joined by the sequence feature's ``sep`` (``|`` for a column no feature reads). pandas would
    otherwise write each row's numpy printout, ``[272 340 ...]``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for column in kept.columns:
        values = kept[column]
        first = values.first_valid_index()
        if first is None or not isinstance(values[first], list | tuple | np.ndarray):
            continue
        lists = pa.array(values.to_numpy(dtype=object), from_pandas=True)
        joined = pc.binary_join(lists.cast(pa.list_(pa.string())), seps.get(column, "|"))
        kept[column] = joined.to_pandas().to_numpy()
    return kept


def _fusion(path: str | Path, schema: Schema) -> Callable[[pd.DataFrame], np.ndarray]:
    """The fused score of a frame of prediction columns, as ``mtlrec serve`` computes it (the
    serving modules are imported only here: they are an optional part)."""
    from mtlrec.serve.config import load_serve_config
    from mtlrec.serve.fusion import Fusion

    config = load_serve_config(path, schema)
    fusion = Fusion(config, schema.task_names)
    joint = config.probabilities == "joint"
    columns = [
        f"pred_{t.name}_joint" if joint and t.depends_on else f"pred_{t.name}" for t in schema.tasks
    ]

    def fused(preds: pd.DataFrame) -> np.ndarray:
        score = fusion(preds[columns].to_numpy(dtype=np.float64))
        return np.where(np.isfinite(score), score, np.nan)  # the service's null (e.g. log(0))

    return fused


def _load(path: Path) -> tuple[Encoder, MTLModel | Score, int, str, tuple[str, ...]]:
    """A run directory's model, or an export folder's graph (its loader is imported only then:
    the serving code stays out of the core package otherwise), its evaluation batch, the CSV
    separator its training files had (an export: a comma) and its training-only features."""
    if (path / "metadata.json").exists():  # mtlrec.serve.predictor.METADATA
        from mtlrec.serve.predictor import load_predictor

        predictor = load_predictor(path)
        return (
            predictor.encoder,
            predictor.predict,
            TrainConfig.eval_batch_size,
            ",",
            predictor.training_only,
        )
    config, encoder, model = load_run(path)
    return (
        encoder,
        model,
        eval_batch_size(config),
        csv_separator(config),
        model.training_only_features(),
    )


class _AtomicWriter:
    """Appends frames to ``<out>.partial`` beside ``out``; ``commit`` renames it into place."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.partial = out.with_name(out.name + ".partial")
        self.parquet = not out.name.lower().endswith(".csv")
        self._parquet_writer = None
        self._started = False
        make_dir(out.parent, f"--out {out}: its folder")

    def write(self, frame: pd.DataFrame) -> None:
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self._parquet_writer is None:
                self._parquet_writer = pq.ParquetWriter(self.partial, table.schema)
            else:  # a column that is all-null in one chunk reads as type null: cast to the first
                table = table.cast(self._parquet_writer.schema)
            self._parquet_writer.write_table(table)
        else:
            frame.to_csv(
                self.partial,
                mode="a" if self._started else "w",
                index=False,
                header=not self._started,
            )
        self._started = True

    def commit(self) -> None:
        self._close()
        os.replace(self.partial, self.out)

    def abort(self) -> None:
        self._close()
        self.partial.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._parquet_writer is not None:
            self._parquet_writer.close()
            self._parquet_writer = None


class _ProgressBar:
    """A rich progress bar over rows on a terminal; a no-op otherwise."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total = total
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self._progress = Progress(
            "scoring",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._progress.start()
        task = self._progress.add_task("rows", total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
