"""Hierarchical experts: HoME (meta-category level, then task level) with normalised experts.

Industrial MMoE/PLE stacks show three failures the HoME paper names: expert collapse (ReLU experts
with very different output scales, so gates fix on one), expert degradation (a shared expert taken
over by one task) and expert underfitting (sparse tasks ignore their own experts). HoME answers
with normalised Swish experts, a two-level hierarchy of shared experts, and input/residual gates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelConfig, ModelOutput, MTLModel
from mtlrec.models.registry import register
from mtlrec.nn.experts import Gate, expert_layers, mix
from mtlrec.nn.mlp import MLP


class NormExperts(nn.Module):
    """E parallel experts, each layer Linear -> BatchNorm -> Swish (HoME's expert normalisation).

    Batch normalisation per expert aligns the experts' output distributions, and Swish instead of
    ReLU avoids experts whose outputs are mostly zero; both keep gates from collapsing. Input
    ``[B, in]`` shared by all experts or ``[E, B, in]`` one per expert; output ``[B, E, out]``.
    """

    def __init__(
        self, num_experts: int, in_dim: int, hidden: Sequence[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.weights, self.biases = expert_layers(num_experts, in_dim, hidden)
        self.norms = nn.ModuleList(nn.BatchNorm1d(num_experts * width) for width in hidden)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.output_dim = hidden[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(0).expand(self.num_experts, -1, -1) if x.dim() == 2 else x
        for w, b, norm in zip(self.weights, self.biases, self.norms):
            h = torch.baddbmm(b, h, w)  # [E, B, W]
            e, batch, width = h.shape
            flat = h.transpose(0, 1).reshape(batch, e * width)
            if self.training and batch == 1:  # a last batch of one row: no batch statistics
                flat = F.batch_norm(
                    flat, norm.running_mean, norm.running_var, norm.weight, norm.bias, False
                )
            else:
                flat = norm(flat)
            h = flat
            h = F.silu(h)
            if self.dropout is not None:
                h = self.dropout(h)
            h = h.view(batch, e, width).transpose(0, 1)
        return h.transpose(0, 1)  # [B, E, out]


class FeatureGate(nn.Module):
    """Per-expert input gate x_e = x * 2 sigmoid(B_e A_e x), a rank-``rank`` map (HoME's feature gate).

    Each expert gets its own view of the shared input; the factor 2 makes the gate 1 on average at
    initialisation (sigmoid(0) = 1/2), so the experts start from the plain input.
    Output ``[E, B, in]`` for :class:`NormExperts`.
    """

    def __init__(self, num_experts: int, in_dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(num_experts, in_dim, rank) / math.sqrt(in_dim))
        self.up = nn.Parameter(torch.zeros(num_experts, rank, in_dim))
        self.num_experts = num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(0).expand(self.num_experts, -1, -1)
        return h * 2.0 * torch.sigmoid(torch.bmm(torch.bmm(h, self.down), self.up))


@dataclass
class HoMEConfig(ModelConfig):
    groups: tuple[int, ...] = ()
    shared_experts: int = 2
    category_experts: int = 2
    specific_experts: int = 2
    expert_hidden: tuple[int, ...] = (16,)
    tower_hidden: tuple[int, ...] = (8,)
    feature_gate_rank: int = 4


@register("home")
class HoME(MTLModel):
    """HoME: meta-category then task-level experts, normalised Swish experts, feature/self gates.

    Wang et al., "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at Kuaishou",
    arXiv 2408.05430, 2024. Tasks are grouped into meta-categories (``groups``: one integer per
    task in schema order; default: tasks chained by ``depends_on`` share their root's category,
    so a click -> purchase funnel is one category and unrelated tasks are separate ones).

    Level 1 (meta-category): global shared experts and ``category_experts`` per category, each
    expert reading its own feature-gated input (:class:`FeatureGate`). Category c's gate mixes
    [its category experts, the global ones] into h_c; a global gate mixes all level-1 experts
    into h_g. Level 2 (task, hierarchy mask): task t in category c has ``specific_experts`` of its
    own and a softmax gate over [its experts, category c's level-2 experts, the global level-2
    experts]; its own and category experts read h_c, global experts read h_g. Self-gate: a sigmoid
    gate over the task's own level-2 experts, sum_j sigmoid(w_j . h_c) f^t_j(h_c), is added to
    the softmax mixture so a sparse task's own experts always get gradient (expert underfitting).
    All experts are Linear -> BatchNorm -> Swish (:class:`NormExperts`).

    Ownership: task t's level-2 experts, gate, self-gate and tower are task t's; everything else
    (level 1, category and global level-2 experts) is shared. ``extras["gates"]`` is the level-2
    softmax gate, [B, T, specific + category + shared experts].

    Departures: the paper gives the mechanisms, not every wiring detail; ours are (i) the global
    level-2 experts read a gated mixture of all level-1 experts (PLE's shared gate), (ii) feature
    gates only on level 1's input, (iii) the self-gate form above (our reading of the paper's description).
    A training batch of a single row normalises with the running statistics.
    """

    Config = HoMEConfig

    def __init__(self, schema, layout, config: HoMEConfig) -> None:
        super().__init__(schema, layout, config)
        c = config
        if min(c.shared_experts, c.category_experts, c.specific_experts, c.feature_gate_rank) < 1:
            raise ConfigError(
                "model.shared_experts, category_experts, specific_experts, feature_gate_rank "
                "must be >= 1"
            )
        self.groups = self._groups(schema, c.groups)
        n_cat = max(self.groups) + 1
        self.embedding = self.make_embedding()
        dim = self.embedding.output_dim
        n1 = c.shared_experts + n_cat * c.category_experts
        self.feature_gate = FeatureGate(n1, dim, c.feature_gate_rank)
        self.level1 = NormExperts(n1, dim, c.expert_hidden, c.dropout)
        out = self.level1.output_dim
        self.category_gates = nn.ModuleList(
            Gate(dim, c.category_experts + c.shared_experts) for _ in range(n_cat)
        )
        self.global_gate = Gate(dim, n1)
        self.category2 = nn.ModuleList(
            NormExperts(c.category_experts, out, c.expert_hidden, c.dropout) for _ in range(n_cat)
        )
        self.global2 = NormExperts(c.shared_experts, out, c.expert_hidden, c.dropout)
        n2 = c.specific_experts + c.category_experts + c.shared_experts
        for _ in schema.tasks:
            self.task_modules.append(
                nn.ModuleDict(
                    {
                        "experts": NormExperts(c.specific_experts, out, c.expert_hidden, c.dropout),
                        "gate": Gate(out, n2),
                        "self_gate": nn.Linear(out, c.specific_experts),
                        "tower": MLP(out, c.tower_hidden, 1, c.dropout),
                    }
                )
            )

    @staticmethod
    def _groups(schema, groups: tuple[int, ...]) -> list[int]:
        """Category index per task: the option, renumbered densely, or the depends_on roots."""
        n = len(schema.tasks)
        if groups:
            if len(groups) != n:
                raise ConfigError(f"model.groups needs one entry per task ({n}), got {len(groups)}")
            raw = list(groups)
        else:
            up = schema.upstream_index()
            raw = []
            for t in range(n):
                while up[t] >= 0:
                    t = up[t]
                raw.append(t)
        order = {g: i for i, g in enumerate(dict.fromkeys(raw))}
        return [order[g] for g in raw]

    def forward(self, batch: TensorTable) -> ModelOutput:
        c = self.config
        x = self.embedding(batch)
        e1 = self.level1(self.feature_gate(x))  # [B, n1, D]: global first, then categories
        glob1 = e1[:, : c.shared_experts]
        h_g = mix(self.global_gate(x), e1)
        h_cat = []
        for k, gate in enumerate(self.category_gates):
            start = c.shared_experts + k * c.category_experts
            own = e1[:, start : start + c.category_experts]
            h_cat.append(mix(gate(x), torch.cat([own, glob1], 1)))
        glob2 = self.global2(h_g)
        cat2 = [experts(h) for experts, h in zip(self.category2, h_cat)]
        logits, gates = [], []
        for module, k in zip(self.task_modules, self.groups):
            h = h_cat[k]
            own = module["experts"](h)
            g = module["gate"](h)
            z = mix(g, torch.cat([own, cat2[k], glob2], 1))
            z = z + mix(torch.sigmoid(module["self_gate"](h)), own)
            logits.append(module["tower"](z))
            gates.append(g)
        return ModelOutput(logits=torch.cat(logits, 1), extras={"gates": torch.stack(gates, 1)})
