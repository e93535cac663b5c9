"""Shared and task-specific embeddings: STEM-Net.

Expert models share one embedding table, so every task's gradient lands on the same user/item
vectors; STEM gives each task its own table next to a shared one and lets a task read the other
tasks' representations forward while only its own (and the shared) ones learn from its loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelConfig, ModelOutput, MTLModel
from mtlrec.models.registry import register
from mtlrec.nn.experts import Experts, mix
from mtlrec.nn.mlp import MLP


@dataclass
class STEMConfig(ModelConfig):
    specific_experts: int = 1
    shared_experts: int = 1
    expert_hidden: tuple[int, ...] = (16,)
    gate_hidden: tuple[int, ...] = (128, 64)  # the authors' default gate MLP
    tower_hidden: tuple[int, ...] = (8,)


@register("stem")
class STEM(MTLModel):
    """STEM-Net: a shared and a per-task embedding table, All-Forward-Task-specific-Backward gates.

    Su et al., "STEM: Unleashing the Power of Embeddings for Multi-task Recommendation", AAAI 2024
    (arXiv 2308.13537). T + 1 embedding tables: task t's experts read task t's embeddings E_t,
    the shared experts read the shared embeddings E_s. Task t's gate, an MLP (``gate_hidden``)
    with a softmax, reads E_t + E_s and mixes every expert,
    [sg(f_1(E_1)), .., f_t(E_t), .., sg(f_T(E_T)), f_s(E_s)], where sg is stop-gradient on the
    other tasks' experts: all representations flow forward, but task t's loss reaches only its
    own and the shared embeddings and experts (AFTB). A tower per task reads the mixture. The
    gate's input and MLP follow the authors' code (github.com/LiangcaiSu/STEM, ``STEM_Layer``);
    an earlier version here gated on all tables concatenated with stop-gradients.

    Ownership: task t's table, experts, gate and tower are task t's (the stop-gradients keep every
    other loss off them); the shared table and shared experts are shared.
    ``extras["gates"]`` is [B, T, T * specific_experts + shared_experts], columns in table order
    (task 1's experts, ..., task T's experts, then the shared ones).

    Departures: numeric features enter every table's input unchanged (the paper's datasets are
    all categorical); the paper's experts are MLPs of its own sizes, ours are ``expert_hidden``;
    one STEM layer (the authors' extra shared gate only feeds a stacked second layer).
    """

    Config = STEMConfig

    def __init__(self, schema, layout, config: STEMConfig) -> None:
        super().__init__(schema, layout, config)
        if min(config.specific_experts, config.shared_experts) < 1:
            raise ConfigError("model.specific_experts and model.shared_experts must be >= 1")
        self.shared_embedding = self.make_embedding()
        dim = self.shared_embedding.output_dim
        self.shared = Experts(config.shared_experts, dim, config.expert_hidden, config.dropout)
        n_all = self.num_tasks * config.specific_experts + config.shared_experts
        for _ in schema.tasks:
            self.task_modules.append(
                nn.ModuleDict(
                    {
                        "embedding": self.make_embedding(),
                        "experts": Experts(
                            config.specific_experts, dim, config.expert_hidden, config.dropout
                        ),
                        "gate": MLP(dim, config.gate_hidden, n_all, config.dropout),
                        "tower": MLP(
                            self.shared.output_dim, config.tower_hidden, 1, config.dropout
                        ),
                    }
                )
            )

    def forward(self, batch: TensorTable) -> ModelOutput:
        xs = self.shared_embedding(batch)
        shared_out = self.shared(xs)
        xt = [m["embedding"](batch) for m in self.task_modules]
        outs = [m["experts"](x) for m, x in zip(self.task_modules, xt)]
        logits, gates = [], []
        for t, module in enumerate(self.task_modules):
            g = torch.softmax(module["gate"](xt[t] + xs), -1)
            experts = [o if j == t else o.detach() for j, o in enumerate(outs)]
            logits.append(module["tower"](mix(g, torch.cat(experts + [shared_out], 1))))
            gates.append(g)
        return ModelOutput(logits=torch.cat(logits, 1), extras={"gates": torch.stack(gates, 1)})
