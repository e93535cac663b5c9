"""One embedding table for every categorical and sequence field.

Indices arrive with field offsets already added (the encoder does it once per split), so a batch
costs a single embedding lookup for all categorical fields. Sequence fields share the table and are
mean-pooled over their non-padding positions (row 0 is padding and stays zero).
"""

from __future__ import annotations

import torch
from torch import nn

from mtlrec.data.encoder import InputLayout
from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError


class InputEmbedding(nn.Module):
    """Batch -> dense input ``[B, num_fields * embed_dim + num_numeric]``.

    ``fields(batch)`` returns the per-field view ``[B, num_fields, embed_dim]`` (numeric features
    are kept apart) for models that attend over fields.
    """

    def __init__(self, layout: InputLayout, embed_dim: int, sparse: bool = False) -> None:
        super().__init__()
        self.layout = layout
        self.embed_dim = embed_dim
        try:
            self.table = nn.Embedding(layout.vocab_size, embed_dim, padding_idx=0, sparse=sparse)
        except RuntimeError as exc:  # "can't allocate memory": hash_buckets with a zero too many
            gigabytes = layout.vocab_size * embed_dim * 4 / 1e9
            raise ConfigError(
                f"the embedding table of {layout.vocab_size:,} rows x {embed_dim} "
                f"({gigabytes:,.1f} GB) cannot be allocated; lower the features' hash_buckets "
                "or model.embed_dim"
            ) from exc
        nn.init.normal_(self.table.weight, std=0.01)
        with torch.no_grad():
            self.table.weight[0].zero_()
        self.seq_lengths = list(layout.sequence_lengths)

    @property
    def output_dim(self) -> int:
        return self.layout.num_fields * self.embed_dim + self.layout.num_numeric

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """Rows of the table for an index tensor of any shape: ``[..., embed_dim]``.

        Dense tables use ``index_select``, whose backward is one ``index_add_``: profiled 2-4x
        faster on CPU than ``nn.Embedding``'s ``embedding_dense_backward`` (sort + segment sum)
        for 40 fields x 1024 rows (benchmarks/speed/RESULTS.md). Row 0 still never moves: every
        use of it (sequence padding) is masked to zero, so its gradient is zero. Sparse tables
        keep ``nn.Embedding`` for its sparse gradient."""
        if self.table.sparse:
            return self.table(index)
        flat = self.table.weight.index_select(0, index.reshape(-1))
        return flat.view(*index.shape, self.embed_dim)

    def fields(self, batch: TensorTable) -> torch.Tensor:
        parts = [self.lookup(batch.cat)] if self.layout.num_categorical else []
        if self.seq_lengths:
            seq_emb = self.lookup(batch.seq)  # [B, L, E]
            mask = (batch.seq != 0).unsqueeze(-1).to(seq_emb.dtype)
            start = 0
            for length in self.seq_lengths:
                e = seq_emb[:, start : start + length]
                m = mask[:, start : start + length]
                pooled = (e * m).sum(1) / m.sum(1).clamp_min(1.0)
                parts.append(pooled.unsqueeze(1))
                start += length
        if not parts:
            return batch.num.new_zeros(batch.num.shape[0], 0, self.embed_dim)
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def forward(self, batch: TensorTable) -> torch.Tensor:
        emb = self.fields(batch).flatten(1)
        if self.layout.num_numeric:
            return torch.cat([emb, batch.num], 1)
        return emb
