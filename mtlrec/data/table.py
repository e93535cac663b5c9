"""Encoded data as columnar tensors; a batch is a slice of the same structure.

The training loop never touches rows one by one: an epoch permutes the whole table once (one
gather per column) and then hands out contiguous slices, which are views and cost nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class TensorTable:
    """Columns of one split.

    ``cat``: [N, F] int64 indices into the fused embedding table (field offsets already added).
    ``seq``: [N, L] int64, all sequence fields side by side, 0 = padding.
    ``num``: [N, D] float32, standardised numeric features.
    ``labels``: [N, T] float32, one column per task in schema order.
    """

    cat: torch.Tensor
    seq: torch.Tensor
    num: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def _map(self, fn) -> TensorTable:
        return TensorTable(fn(self.cat), fn(self.seq), fn(self.num), fn(self.labels))

    def slice(self, start: int, stop: int) -> TensorTable:
        return self._map(lambda t: t[start:stop])

    def take(self, index: torch.Tensor) -> TensorTable:
        return self._map(lambda t: t.index_select(0, index))

    def to(self, device: torch.device | str) -> TensorTable:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def head(self, n: int) -> TensorTable:
        return self.slice(0, min(n, len(self)))

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[TensorTable]:
        """Yield batches; with ``shuffle`` the order comes from ``generator`` (repeatable)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if shuffle:  # drawn on the CPU generator, applied where the table lives
            order = torch.randperm(len(self), generator=generator).to(self.labels.device)
            source = self.take(order)
        else:
            source = self
        n = len(source)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield source.slice(start, min(start + batch_size, n))

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    @staticmethod
    def concat(tables: list[TensorTable]) -> TensorTable:
        return TensorTable(
            *(
                torch.cat([getattr(t, name) for t in tables], 0)
                for name in ("cat", "seq", "num", "labels")
            )
        )
