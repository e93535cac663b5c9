"""Where the trainer's batches come from: one small interface, two implementations.

The training loop asks a :class:`BatchSource` for one epoch of batches and does not care whether
they come from tensors in memory (:class:`InMemorySource`, around a
:class:`~mtlrec.data.table.TensorTable`) or from Parquet files streamed from disk
(:class:`mtlrec.data.stream.ParquetStream`).

Under data parallelism (``rank``/``world`` > 1) a source yields this rank's part of every global
batch, and every rank yields the same number of batches per epoch (a rank whose part of a step is
empty gets a 0-row table: the collectives of the step still run on every rank).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch

from mtlrec.data.table import TensorTable


@runtime_checkable
class BatchSource(Protocol):
    """A training split, as the trainer sees it."""

    def __len__(self) -> int:
        """Rows per epoch over all ranks (exact, or the best estimate the source has)."""
        ...

    def num_batches(self, batch_size: int) -> int:
        """Steps per epoch for the global ``batch_size`` (for progress; the loop counts steps)."""
        ...

    def epoch_batches(
        self, epoch: int, batch_size: int, generator: torch.Generator
    ) -> Iterator[TensorTable]:
        """This rank's part of each global batch of ``batch_size`` rows, in an order drawn from
        ``generator`` (the same generator state gives the same epoch, which makes mid-epoch
        resume exact)."""
        ...

    def placeholder(self) -> TensorTable:
        """One encoded row, run with zero weight when this rank's part of a step is empty."""
        ...


class InMemorySource:
    """A :class:`TensorTable` as a batch source.

    One process: exactly ``table.batches(batch_size, shuffle=True, generator=generator)``.
    With ``world`` ranks: the same permutation is drawn on every rank, and rank r takes the
    r-th contiguous part of every global batch (B / world rows; the last, shorter batch is split
    as evenly as it goes), so the ranks together see each global batch of the single process."""

    def __init__(self, table: TensorTable, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.table = table
        self.rank = rank
        self.world = world

    def __len__(self) -> int:
        return len(self.table)

    def num_batches(self, batch_size: int) -> int:
        return self.table.num_batches(batch_size)

    def epoch_batches(
        self, epoch: int, batch_size: int, generator: torch.Generator
    ) -> Iterator[TensorTable]:
        if self.world == 1:
            yield from self.table.batches(batch_size, shuffle=True, generator=generator)
            return
        from mtlrec.train.distributed import shard_bounds

        n = len(self.table)
        order = torch.randperm(n, generator=generator).to(self.table.labels.device)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            lo, hi = shard_bounds(len(index), self.rank, self.world)
            yield self.table.take(index[lo:hi])

    def placeholder(self) -> TensorTable:
        return self.table.head(1)


def as_source(train: TensorTable | BatchSource, rank: int = 0, world: int = 1) -> BatchSource:
    """A source for ``train``: a table is wrapped (sharded for ``rank``/``world``); a source is
    returned as it is (it was built for its rank)."""
    if isinstance(train, TensorTable):
        return InMemorySource(train, rank, world)
    if not hasattr(train, "num_batches"):
        raise TypeError(
            f"training data is a {type(train).__name__}; encode it first: "
            "Encoder(schema).fit(frame).transform(frame) gives the table to train on"
        )
    return train
