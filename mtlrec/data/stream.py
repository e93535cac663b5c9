"""Stream a Parquet training split that is larger than memory: sharded, shuffled, encoded.

The unit of reading and of sharding is the Parquet row group (listed from the files' metadata
with ``pyarrow.dataset``, never by reading data). Each epoch:

1. the row groups are put in a fresh random order, drawn from the trainer's seeded generator
   (the same on every rank), and dealt to the ranks greedily so that each rank gets about the
   same number of rows (the least-loaded rank takes the next group), so ranks see different row
   groups from one epoch to the next;
2. each rank reads its row groups in record batches of ``read_rows`` rows, encodes them with the
   fitted :class:`~mtlrec.data.encoder.Encoder`, and pushes them through a shuffle buffer of
   ``buffer_rows`` rows: when the buffer is full it is permuted, the first half (rounded down to
   whole batches) goes out as batches and the rest stays to be mixed with the rows that follow;
3. every rank yields the same number of batches (the longest rank's count; the others end with
   empty tables, which the trainer runs with zero weight), because every step is a collective.

Memory stays bounded, whatever the file size: the buffer (``buffer_rows`` encoded rows plus one
record batch; a few times that for a moment while it is permuted), one record batch being
encoded, and the batch being trained on.
No DataLoader and no worker processes are involved: reading and encoding run in the training
process, between steps.

The encoder is fitted in one streaming pass too (:func:`fit_encoder_stream`): vocabulary counts
and numeric moments are exact; quantile bucket edges come from a uniform reservoir sample of
bounded size (exact when a column has no more finite values than the reservoir holds).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mtlrec.data.encoder import (
    ENCODER_VERSION,
    Encoder,
    _as_text,
    _numeric,
    _tokens,
    bucket_edges,
    merge_counts,
    needs_counts,
    vocabulary_state,
)
from mtlrec.data.readers import file_columns, is_parquet, parquet_columns, read_frame
from mtlrec.data.table import TensorTable
from mtlrec.errors import DataError, first_line
from mtlrec.schema import Schema

#: Raw rows read and encoded at a time (one record batch).
READ_ROWS = 16384
#: Values kept per numeric column to estimate quantile bucket edges in a streaming fit.
RESERVOIR = 100_000


def data_size_mb(path: str | Path) -> float:
    """Size on disk of a file, or of every file under a folder, in MiB."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20
    return p.stat().st_size / 2**20 if p.exists() else 0.0


@dataclass(frozen=True)
class _Piece:
    """One row group: the fragment to read and how many of its rows to use."""

    fragment: Any  # pyarrow.dataset.ParquetFileFragment restricted to one row group
    rows: int
    where: str  # "file (row group N)", for errors about the row group itself
    file: str  # for errors about a row: its number is counted from the file's first row
    first_row: int  # the row group's first row in its file


class _Files:
    """The row groups of a Parquet file or folder, and how to read them as pandas frames that
    look exactly like :func:`mtlrec.data.readers.read_frame`'s."""

    def __init__(
        self,
        path: str | Path,
        columns: list[str],
        max_rows: int | None,
        read_rows: int,
        exact: Sequence[str] = (),
    ) -> None:
        import pyarrow.dataset as ds

        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: file not found")
        self.exact = list(dict.fromkeys(exact))
        self.columns = list(dict.fromkeys([*columns, *self.exact]))
        self.read_rows = int(read_rows)
        try:
            dataset = ds.dataset(str(self.path), format="parquet")
            parquet_columns(self.path, dataset.schema.names, self.columns)
            pieces: list[_Piece] = []
            nullable_ints: set[str] = set()
            budget = math.inf if max_rows is None else int(max_rows)
            for fragment in dataset.get_fragments():
                nullable_ints |= _ints_with_nulls(fragment, self.columns)
                file_row = 0
                for group in fragment.split_by_row_group():
                    info = group.row_groups[0]
                    take = int(min(info.num_rows, budget))
                    if take > 0:
                        where = f"{fragment.path} (row group {info.id})"
                        pieces.append(_Piece(group, take, where, fragment.path, file_row))
                    budget -= take
                    file_row += info.num_rows
            self.schema = dataset.schema
        except DataError:
            raise
        except Exception as exc:  # pyarrow's errors for unreadable or corrupt files
            if type(exc).__module__.startswith("pyarrow"):
                raise DataError(f"{self.path}: cannot read Parquet ({first_line(exc)})") from exc
            raise
        self.pieces = pieces
        # read_frame reads a whole file, where pandas turns an integer column with any null
        # into float64; a record batch without nulls would stay int64 and encode "1" where the
        # whole file says "1.0". Such columns are cast to float64 in every batch, without a range
        # check, as pandas converts them (ids above 2**53 round). ``exact`` columns (ids copied
        # into an output) are also given uncast, under exact_name(column).
        self.float_columns = nullable_ints

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.pieces)

    def frames(self, piece: _Piece) -> Iterator[tuple[int, pd.DataFrame]]:
        """The piece's rows as pandas frames of at most ``read_rows`` rows, each with the number
        of its first row in the file (for error messages)."""
        import pyarrow as pa

        left = piece.rows
        first_row = piece.first_row
        try:
            batches = piece.fragment.to_batches(
                columns=self.columns, batch_size=self.read_rows, use_threads=False
            )
            for batch in batches:
                if left <= 0:
                    break
                raw = table = pa.Table.from_batches([batch]).slice(0, left)
                left -= table.num_rows
                for name in self.float_columns:
                    i = table.schema.get_field_index(name)
                    column = table.column(i).cast(pa.float64(), safe=False)
                    table = table.set_column(i, name, column)
                frame = table.to_pandas()
                frame.columns = [str(c).strip() for c in frame.columns]
                for name in self.exact:
                    frame[exact_name(name)] = _exact_pandas(raw.column(name))
                yield first_row, frame
                first_row += len(frame)
        except Exception as exc:
            if type(exc).__module__.startswith("pyarrow"):
                raise DataError(f"{piece.where}: cannot read Parquet ({first_line(exc)})") from exc
            raise


def parquet_chunks(
    path: str | Path, columns: list[str], read_rows: int = READ_ROWS, exact: Sequence[str] = ()
) -> tuple[int, Iterator[tuple[str, int, pd.DataFrame]]]:
    """The rows of a Parquet file or folder in file order, ``read_rows`` at a time, read like
    :func:`mtlrec.data.readers.read_frame` reads them: (row count, iterator of (file, number of
    the chunk's first row in that file, frame)). Only the metadata is read before iterating.

    Each ``exact`` column is also in the frame as ``exact_name(column)``, with its values as
    stored: an integer column with nulls stays integer (pandas' nullable type) instead of
    becoming float64, so ids copied into an output come back unchanged."""
    files = _Files(path, columns, None, read_rows, exact)

    def chunks() -> Iterator[tuple[str, int, pd.DataFrame]]:
        for piece in files.pieces:
            for first_row, frame in files.frames(piece):
                yield piece.file, first_row, frame

    return files.rows, chunks()


def file_chunks(
    path: str | Path,
    columns: list[str],
    read_rows: int = READ_ROWS,
    exact: Sequence[str] = (),
    sep: str = ",",
    optional: Sequence[str] = (),
) -> tuple[int, Iterator[tuple[str, int, pd.DataFrame]]]:
    """Like :func:`parquet_chunks` for any input of ``read_frame``: a Parquet file or folder is
    streamed, a CSV file (separated by ``sep``) is read whole as one chunk (its cells are text:
    exact already). An ``optional`` column the file lacks is in every chunk as missing values
    (empty text), as an absent field of a scoring request is."""
    present = set(file_columns(path, sep)) if optional else set()
    absent = [c for c in optional if c not in present]
    columns = [c for c in columns if c not in absent]
    if is_parquet(path):
        rows, chunks = parquet_chunks(path, columns, read_rows, exact)
    else:
        frame = read_frame(path, columns=list(dict.fromkeys([*columns, *exact])), sep=sep)
        for name in dict.fromkeys(exact):
            frame[exact_name(name)] = frame[name]
        rows, chunks = len(frame), iter([(str(path), 0, frame)])
    if not absent:
        return rows, chunks
    return rows, (
        (where, first, frame.assign(**dict.fromkeys(absent, ""))) for where, first, frame in chunks
    )


def training_only_columns(schema: Schema, training_only: Sequence[str]) -> list[str]:
    """Source columns that only training-only features read (DMT's bias features): scoring may
    go without them."""
    if not training_only:
        return []
    readers: dict[str, set[str]] = {}
    for f in schema.features:
        readers.setdefault(f.source, set()).add(f.name)
    return [c for c, names in readers.items() if names <= set(training_only)]


def exact_name(column: str) -> str:
    """Where a chunk holds the uncast copy of an ``exact`` column (a name no file column has)."""
    return f"\x00exact:{column}"


def _exact_pandas(column: Any) -> pd.Series:
    """An Arrow column as pandas, integers kept integer when they hold nulls."""
    import pyarrow as pa

    nullable = {
        pa.int8(): pd.Int8Dtype(),
        pa.int16(): pd.Int16Dtype(),
        pa.int32(): pd.Int32Dtype(),
        pa.int64(): pd.Int64Dtype(),
        pa.uint8(): pd.UInt8Dtype(),
        pa.uint16(): pd.UInt16Dtype(),
        pa.uint32(): pd.UInt32Dtype(),
        pa.uint64(): pd.UInt64Dtype(),
    }
    return column.to_pandas(types_mapper=nullable.get)


def _ints_with_nulls(fragment: Any, columns: list[str]) -> set[str]:
    import pyarrow.types as pat

    out: set[str] = set()
    meta = fragment.metadata
    arrow = fragment.physical_schema
    for name in columns:
        if name not in arrow.names or not pat.is_integer(arrow.field(name).type):
            continue
        j = meta.schema.names.index(name) if name in meta.schema.names else -1
        if j < 0:
            continue
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(j).statistics
            if stats is not None and stats.has_null_count and stats.null_count > 0:
                out.add(name)
                break
    return out


class ParquetStream:
    """Encoded, shuffled batches from Parquet files too large for memory; a
    :class:`~mtlrec.data.source.BatchSource`.

    ``rank``/``world``: this process's share (row groups are dealt to ranks each epoch).
    ``buffer_rows``: rows of the shuffle buffer (raised to two local batches if smaller).
    ``read_rows``: rows read and encoded at a time. ``max_rows``: use only the first rows.
    """

    def __init__(
        self,
        path: str | Path,
        encoder: Encoder,
        *,
        rank: int = 0,
        world: int = 1,
        buffer_rows: int = 65536,
        read_rows: int = READ_ROWS,
        max_rows: int | None = None,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        schema = encoder.schema
        columns = [f.source for f in schema.features] + [t.source for t in schema.tasks]
        self.files = _Files(path, columns, max_rows, read_rows)
        self.encoder = encoder
        self.rank, self.world = rank, world
        self.buffer_rows = int(buffer_rows)
        layout = encoder.layout()
        self._widths = (
            layout.num_categorical,
            sum(layout.sequence_lengths),
            layout.num_numeric,
            len(schema.tasks),
        )
        self._placeholder: TensorTable | None = None
        #: Most encoded rows held at once by the last epoch's buffer (for tests and logs).
        self.max_buffered_rows = 0

    def __len__(self) -> int:
        return self.files.rows

    def num_batches(self, batch_size: int) -> int:
        """Steps of an average epoch (ranks' row counts vary a little with the dealing)."""
        return -(-len(self) // batch_size)

    # --- one epoch ---------------------------------------------------------------------------------
    def assignment(self, seed: int) -> list[list[int]]:
        """Row-group indices per rank for the epoch with this seed, in reading order."""
        order = np.random.default_rng(seed).permutation(len(self.files.pieces))
        loads = [0] * self.world
        shards: list[list[int]] = [[] for _ in range(self.world)]
        for i in order.tolist():
            r = int(np.argmin(loads))
            shards[r].append(i)
            loads[r] += self.files.pieces[i].rows
        return shards

    def epoch_batches(
        self, epoch: int, batch_size: int, generator: torch.Generator
    ) -> Iterator[TensorTable]:
        """This rank's batches of ``batch_size / world`` rows; every rank yields as many."""
        from mtlrec.train.distributed import local_batch_size

        local = local_batch_size(batch_size, self.world)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        shards = self.assignment(seed)
        rows = [sum(self.files.pieces[i].rows for i in s) for s in shards]
        steps = max(-(-r // local) for r in rows)
        rng = np.random.default_rng([seed, self.rank])
        emitted = 0
        for batch in self._shuffled(shards[self.rank], local, rng):
            emitted += 1
            yield batch
        for _ in range(steps - emitted):
            yield self._empty()

    def _encoded(self, pieces: list[int]) -> Iterator[list[np.ndarray]]:
        for i in pieces:
            piece = self.files.pieces[i]
            for first_row, frame in self.files.frames(piece):
                table = self.encoder.transform(frame, where=piece.file, first_row=first_row)
                yield [t.numpy() for t in (table.cat, table.seq, table.num, table.labels)]

    def _shuffled(
        self, pieces: list[int], local: int, rng: np.random.Generator
    ) -> Iterator[TensorTable]:
        capacity = max(self.buffer_rows, 2 * local)
        pending: list[list[np.ndarray]] = []
        held = 0
        self.max_buffered_rows = 0
        for arrays in self._encoded(pieces):
            pending.append(arrays)
            held += len(arrays[0])
            self.max_buffered_rows = max(self.max_buffered_rows, held)
            if held < capacity:
                continue
            mixed = _permuted(pending, rng)
            out = ((held - capacity // 2) // local) * local
            yield from _slices(mixed, 0, out, local)
            pending = [[a[out:] for a in mixed]]
            held -= out
        if held:
            mixed = _permuted(pending, rng)
            yield from _slices(mixed, 0, held, local)

    def _empty(self) -> TensorTable:
        cat, seq, num, labels = self._widths
        return TensorTable(
            cat=torch.zeros(0, cat, dtype=torch.long),
            seq=torch.zeros(0, seq, dtype=torch.long),
            num=torch.zeros(0, num),
            labels=torch.zeros(0, labels),
        )

    def placeholder(self) -> TensorTable:
        """The first row of the data, encoded."""
        if self._placeholder is None:
            if not self.files.pieces:
                raise DataError(f"{self.files.path}: no rows")
            piece = self.files.pieces[0]
            first_row, frame = next(self.files.frames(piece))
            self._placeholder = self.encoder.transform(
                frame.head(1), where=piece.file, first_row=first_row
            )
        return self._placeholder


def _permuted(pending: list[list[np.ndarray]], rng: np.random.Generator) -> list[np.ndarray]:
    merged = [np.concatenate(parts) for parts in zip(*pending)]
    order = rng.permutation(len(merged[0]))
    return [a[order] for a in merged]


def _slices(arrays: list[np.ndarray], start: int, stop: int, size: int) -> Iterator[TensorTable]:
    for lo in range(start, stop, size):
        hi = min(lo + size, stop)
        yield TensorTable(*(torch.from_numpy(a[lo:hi]) for a in arrays))


# --- fitting the encoder in one pass ---------------------------------------------------------------
class _Moments:
    """Count, mean and sum of squared deviations, merged chunk by chunk (Chan et al.)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        n_b = values.size
        mean_b = float(values.mean())
        m2_b = float(((values - mean_b) ** 2).sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n


class _Reservoir:
    """A uniform sample without replacement of at most ``size`` values: each value gets a random
    key and the ``size`` smallest keys are kept (all values while there are no more)."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size, self.rng = size, rng
        self.keys = np.zeros(0)
        self.values = np.zeros(0)

    def add(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        keys = np.concatenate([self.keys, self.rng.random(values.size)])
        vals = np.concatenate([self.values, values])
        if keys.size > self.size:
            keep = np.argpartition(keys, self.size - 1)[: self.size]
            keys, vals = keys[keep], vals[keep]
        self.keys, self.values = keys, vals


def fit_encoder_stream(
    schema: Schema,
    path: str | Path,
    *,
    max_rows: int | None = None,
    read_rows: int = READ_ROWS,
    reservoir: int = RESERVOIR,
    seed: int = 0,
) -> Encoder:
    """An encoder fitted on a Parquet file or folder in one pass, in bounded memory (apart from
    the vocabularies themselves). Vocabularies and numeric mean/std equal :meth:`Encoder.fit` on
    the whole file loaded at once (up to float rounding for the moments); quantile bucket edges
    are those of a reservoir sample of ``reservoir`` values per column (equal when a column has
    at most that many finite values)."""
    files = _Files(path, schema.required_columns(), max_rows, read_rows)
    rng = np.random.default_rng(seed)
    counts: dict[str, list[pd.Series]] = {}
    moments: dict[str, _Moments] = {}
    samples: dict[str, _Reservoir] = {}
    for feat in schema.features:
        if feat.type == "numeric":
            moments[feat.name] = _Moments()
            if feat.buckets:
                samples[feat.name] = _Reservoir(reservoir, rng)
        elif needs_counts(schema, feat):
            counts[feat.name] = []
    rows = 0
    for piece in files.pieces:
        for first_row, frame in files.frames(piece):
            rows += len(frame)
            for feat in schema.features:
                column = frame[feat.source]
                if feat.name in moments:
                    values = _numeric(column, piece.file, feat, first_row)
                    finite = values[np.isfinite(values)]
                    moments[feat.name].add(finite)
                    if feat.name in samples:
                        samples[feat.name].add(finite)
                elif feat.name in counts:
                    tokens = (
                        _tokens(column, feat, where=piece.file)
                        if feat.type == "sequence"
                        else _as_text(column)
                    )
                    parts = counts[feat.name]
                    parts.append(tokens.value_counts(sort=False))
                    if len(parts) >= 16:  # keep the pending partial counts few
                        counts[feat.name] = [merge_counts(parts)]
    if rows == 0:
        raise DataError(f"{path}: no rows to fit the encoder on")
    state: dict[str, dict[str, Any]] = {}
    for feat in schema.features:
        if feat.name in moments:
            m = moments[feat.name]
            std = math.sqrt(m.m2 / m.n) if m.n else 1.0
            state[feat.name] = {
                "mean": m.mean if m.n else 0.0,
                "std": std if std > 1e-12 else 1.0,
            }
            if feat.buckets:
                state[feat.name]["edges"] = bucket_edges(samples[feat.name].values, feat.buckets)
    state.update(
        vocabulary_state(schema, {name: merge_counts(parts) for name, parts in counts.items()})
    )
    return Encoder.from_dict(
        {"version": ENCODER_VERSION, "schema": schema.to_dict(), "state": state}
    )
