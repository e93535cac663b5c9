"""Experts evaluated together and softmax gates over them.

``Experts`` holds the weights of E identical MLPs stacked on a leading axis and runs all of them
with one matmul per layer instead of a Python loop over experts: a single GEMM for the first
layer when every expert reads the same input, ``torch.baddbmm`` for the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from mtlrec.errors import ConfigError


def expert_layers(
    num_experts: int, in_dim: int, hidden: Sequence[int]
) -> tuple[nn.ParameterList, nn.ParameterList]:
    """Batched weights [E, in, width] and biases [E, 1, width] of E parallel MLPs, layer by layer,
    drawn like nn.Linear's default (uniform, bound 1 / sqrt(fan_in)); at least one layer."""
    if not hidden:
        raise ConfigError(
            "experts need at least one hidden layer: a model.*_hidden list of experts is empty"
        )
    weights, biases = nn.ParameterList(), nn.ParameterList()
    dim = in_dim
    for width in hidden:
        bound = 1.0 / math.sqrt(dim)
        weights.append(nn.Parameter(torch.empty(num_experts, dim, width).uniform_(-bound, bound)))
        biases.append(nn.Parameter(torch.empty(num_experts, 1, width).uniform_(-bound, bound)))
        dim = width
    return weights, biases


class Experts(nn.Module):
    """E parallel MLPs with ReLU: ``[B, in] -> [B, E, out]`` (or ``[E, B, in]`` per-expert input)."""

    def __init__(
        self, num_experts: int, in_dim: int, hidden: Sequence[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.weights, self.biases = expert_layers(num_experts, in_dim, hidden)
        self.output_dim = hidden[-1]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, in] shared by all experts, or [E, B, in] one input per expert."""
        if x.dim() == 2:
            # A shared input makes the first layer one [B, in] x [in, E * width] GEMM, whose
            # forward and backward profiled ~1.6x faster on CPU than baddbmm over the expanded
            # input for Census-sized experts (and a few percent faster for large ones).
            weight, bias = self.first_layer()
            return self.after_first_layer(torch.addmm(bias, x, weight))
        return self._per_expert_layers(x, start=0)

    def first_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer of all experts as one ``[in, E * width]`` weight and its bias."""
        w, b = self.weights[0], self.biases[0]
        experts, dim, width = w.shape
        return w.permute(1, 0, 2).reshape(dim, experts * width), b.reshape(-1)

    def after_first_layer(self, pre: torch.Tensor) -> torch.Tensor:
        """``[B, E * width]`` pre-activations of the first layer -> ``[B, E, out]``."""
        h = self._activate(pre.view(pre.shape[0], self.num_experts, -1))
        if len(self.weights) == 1:
            return h
        return self._per_expert_layers(h.transpose(0, 1), start=1)

    def _per_expert_layers(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """Layers ``start..`` on ``[E, B, in]``, one ``baddbmm`` each -> ``[B, E, out]``."""
        for w, b in zip(list(self.weights)[start:], list(self.biases)[start:]):
            h = self._activate(torch.baddbmm(b, h, w))
        return h.transpose(0, 1)

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        h = torch.relu(h)
        return self.dropout(h) if self.dropout is not None else h


class Gate(nn.Module):
    """Softmax gate: ``[B, in] -> [B, E]`` weights over experts (MMoE Eq. 5)."""

    def __init__(self, in_dim: int, num_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x), dim=-1)


def experts_and_gates(
    experts: Experts, gates: Sequence[Gate], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, E, out], [B, G, E])``: experts and G softmax gates that all read the same ``x``.

    The experts' first layer and every gate run as one GEMM over their concatenated weights,
    then split: the same products as ``experts(x)`` and each ``gate(x)``, one GEMM fewer forward
    and two fewer backward (benchmarks/speed/RESULTS.md). Parameters stay one ``Gate`` per task,
    so checkpoints and the shared/task-specific split do not change."""
    weight, bias = experts.first_layer()
    width = weight.shape[1]
    weight = torch.cat([weight, *(g.linear.weight.t() for g in gates)], 1)
    bias = torch.cat([bias, *(g.linear.bias for g in gates)])
    pre, logits = torch.addmm(bias, x, weight).split([width, weight.shape[1] - width], 1)
    logits = logits.reshape(x.shape[0], len(gates), -1)
    return experts.after_first_layer(pre), torch.softmax(logits, dim=-1)


# torch's CPU bmm multiplies matrices with rows * cols * contraction below this in a scalar loop,
# 3-4x slower than a product twice the size (the Census-sized MMoE's mix: 2 x 8 x 16 = 256).
_BMM_SCALAR_LOOP_BELOW = 400


def mix(gate: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum over E: ``[B, E] x [B, E, D] -> [B, D]``, or for G gates at once
    ``[B, G, E] x [B, E, D] -> [B, G, D]``.

    One gate: a broadcast multiply and sum. Several gates over the same experts: one ``bmm``,
    whose forward + backward profiled 6 % (large MMoE) to 20 % (Census-sized MMoE) faster on CPU
    for the whole expert block than a multiply and sum per gate (benchmarks/speed/RESULTS.md).
    Below torch's scalar-loop size on CPU, a broadcast multiply and sum instead: the
    Census-sized MMoE (2 x 8 x 16) then trains 8 % faster single-threaded."""
    if gate.dim() == 3:
        tasks, num_experts = gate.shape[1:]
        if experts.is_cpu and tasks * num_experts * experts.shape[-1] < _BMM_SCALAR_LOOP_BELOW:
            return (gate.unsqueeze(-1) * experts.unsqueeze(1)).sum(2)
        return torch.bmm(gate, experts)
    return (gate.unsqueeze(-1) * experts).sum(1)
