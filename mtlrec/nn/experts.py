"""Experts evaluated together and softmax gates over them.

``Experts`` holds the weights of E identical MLPs stacked on a leading axis and runs all of them
with one batched matmul per layer (``torch.baddbmm``) instead of a Python loop over experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class Experts(nn.Module):
    """E parallel MLPs with ReLU: ``[B, in] -> [B, E, out]`` (or ``[E, B, in]`` per-expert input)."""

    def __init__(
        self, num_experts: int, in_dim: int, hidden: Sequence[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("experts need at least one hidden layer")
        self.num_experts = num_experts
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        dim = in_dim
        for width in hidden:
            w = torch.empty(num_experts, dim, width)
            bound = 1.0 / math.sqrt(dim)
            nn.init.uniform_(w, -bound, bound)  # same scale as nn.Linear's default
            self.weights.append(nn.Parameter(w))
            self.biases.append(
                nn.Parameter(torch.empty(num_experts, 1, width).uniform_(-bound, bound))
            )
            dim = width
        self.output_dim = dim
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, in] shared by all experts, or [E, B, in] one input per expert."""
        h = x.unsqueeze(0).expand(self.num_experts, -1, -1) if x.dim() == 2 else x
        for w, b in zip(self.weights, self.biases):
            h = torch.relu(torch.baddbmm(b, h, w))
            if self.dropout is not None:
                h = self.dropout(h)
        return h.transpose(0, 1)  # [B, E, out]


class Gate(nn.Module):
    """Softmax gate: ``[B, in] -> [B, E]`` weights over experts (MMoE Eq. 5)."""

    def __init__(self, in_dim: int, num_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x), dim=-1)


def mix(gate: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum: ``[B, E] x [B, E, D] -> [B, D]``."""
    return torch.bmm(gate.unsqueeze(1), experts).squeeze(1)
