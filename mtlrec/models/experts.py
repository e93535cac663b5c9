"""Expert sharing: mixtures of experts with gates (OMoE, MMoE, CGC, PLE).

All experts of a group run in one batched matmul per layer (:class:`mtlrec.nn.Experts`). Gate
weights are returned in ``extras["gates"]`` ([B, T, E] for the last level) for diagnostics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelConfig, ModelOutput, MTLModel
from mtlrec.models.registry import register
from mtlrec.nn.experts import Experts, Gate, experts_and_gates, mix
from mtlrec.nn.mlp import MLP


@dataclass
class MoEConfig(ModelConfig):
    num_experts: int = 8
    expert_hidden: tuple[int, ...] = (16,)
    tower_hidden: tuple[int, ...] = (8,)


class _MixtureBase(MTLModel):
    Config = MoEConfig

    def __init__(self, schema, layout, config: MoEConfig, gates: int) -> None:
        super().__init__(schema, layout, config)
        if config.num_experts < 1:
            raise ConfigError("model.num_experts must be >= 1")
        self.embedding = self.make_embedding()
        in_dim = self.embedding.output_dim
        self.experts = Experts(config.num_experts, in_dim, config.expert_hidden, config.dropout)
        self.gates = nn.ModuleList(Gate(in_dim, config.num_experts) for _ in range(gates))
        for _ in schema.tasks:
            self.task_modules.append(
                MLP(self.experts.output_dim, config.tower_hidden, 1, dropout=config.dropout)
            )

    def forward(self, batch: TensorTable) -> ModelOutput:
        x = self.embedding(batch)
        # [B, E, D] and [B, G, E], G = tasks (MMoE) or 1 (OMoE)
        expert_out, gates = experts_and_gates(self.experts, self.gates, x)
        if gates.shape[1] == 1:
            gates = gates.expand(-1, self.num_tasks, -1)
        mixed = mix(gates, expert_out)  # [B, T, D]
        logits = [tower(mixed[:, t]) for t, tower in enumerate(self.task_modules)]
        return ModelOutput(logits=torch.cat(logits, 1), extras={"gates": gates})


@register("omoe")
class OMoE(_MixtureBase):
    """OMoE: one softmax gate over shared experts, used by every task.

    One-gate Mixture-of-Experts baseline of Ma et al., "Modeling Task Relationships in Multi-task
    Learning with Multi-gate Mixture-of-Experts", KDD 2018 (Sec. 4.2, Eq. 4-5 with one gate).
    """

    def __init__(self, schema, layout, config: MoEConfig) -> None:
        super().__init__(schema, layout, config, gates=1)


@register("mmoe")
class MMoE(_MixtureBase):
    """MMoE: shared experts, one softmax gate per task.

    Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
    Mixture-of-Experts", KDD 2018. y_k = h^k(f^k(x)), f^k(x) = sum_i g^k(x)_i f_i(x),
    g^k(x) = softmax(W_gk x) (Eq. 5-6). Experts are ReLU MLPs, as in the paper's experiments.
    """

    def __init__(self, schema, layout, config: MoEConfig) -> None:
        super().__init__(schema, layout, config, gates=len(schema.tasks))


@dataclass
class PLEConfig(ModelConfig):
    num_levels: int = 2
    specific_experts: int = 2
    shared_experts: int = 2
    expert_hidden: tuple[int, ...] = (16,)
    tower_hidden: tuple[int, ...] = (8,)


class _ExtractionLevel(nn.Module):
    """Experts and gates of one extraction level (PLE Fig. 4)."""

    def __init__(self, in_dim: int, tasks: int, cfg: PLEConfig, shared_gate: bool) -> None:
        super().__init__()
        self.task_experts = nn.ModuleList(
            Experts(cfg.specific_experts, in_dim, cfg.expert_hidden, cfg.dropout)
            for _ in range(tasks)
        )
        self.shared_experts = Experts(cfg.shared_experts, in_dim, cfg.expert_hidden, cfg.dropout)
        self.task_gates = nn.ModuleList(
            Gate(in_dim, cfg.specific_experts + cfg.shared_experts) for _ in range(tasks)
        )
        self.shared_gate = (
            Gate(in_dim, tasks * cfg.specific_experts + cfg.shared_experts) if shared_gate else None
        )
        self.output_dim = self.shared_experts.output_dim


class _ProgressiveBase(MTLModel):
    """CGC is PLE with one level; both share this code.

    The last level's task experts, task gates and towers only ever serve their own task, so they
    are the task's parameters; lower levels feed the shared gate and are therefore shared.
    """

    Config = PLEConfig

    def __init__(self, schema, layout, config: PLEConfig) -> None:
        super().__init__(schema, layout, config)
        if min(config.specific_experts, config.shared_experts, config.num_levels) < 1:
            raise ConfigError("model.num_levels, specific_experts, shared_experts must be >= 1")
        self.embedding = self.make_embedding()
        dim = self.embedding.output_dim
        tasks = len(schema.tasks)
        self.lower = nn.ModuleList()
        for _ in range(config.num_levels - 1):
            level = _ExtractionLevel(dim, tasks, config, shared_gate=True)
            self.lower.append(level)
            dim = level.output_dim
        self.top_shared = Experts(config.shared_experts, dim, config.expert_hidden, config.dropout)
        for _ in range(tasks):
            self.task_modules.append(
                nn.ModuleDict(
                    {
                        "experts": Experts(
                            config.specific_experts, dim, config.expert_hidden, config.dropout
                        ),
                        "gate": Gate(dim, config.specific_experts + config.shared_experts),
                        "tower": MLP(
                            self.top_shared.output_dim,
                            config.tower_hidden,
                            1,
                            dropout=config.dropout,
                        ),
                    }
                )
            )

    def forward(self, batch: TensorTable) -> ModelOutput:
        x = self.embedding(batch)
        task_in = [x] * self.num_tasks
        shared_in = x
        for level in self.lower:
            shared_out = level.shared_experts(shared_in)  # [B, Es, D]
            task_out = [e(h) for e, h in zip(level.task_experts, task_in)]  # [B, Ek, D] each
            task_in = [
                mix(g(h), torch.cat([own, shared_out], 1))
                for g, h, own in zip(level.task_gates, task_in, task_out)
            ]
            shared_in = mix(level.shared_gate(shared_in), torch.cat(task_out + [shared_out], 1))
        shared_out = self.top_shared(shared_in)
        logits, gates = [], []
        for module, h in zip(self.task_modules, task_in):
            g = module["gate"](h)
            gates.append(g)
            logits.append(module["tower"](mix(g, torch.cat([module["experts"](h), shared_out], 1))))
        return ModelOutput(logits=torch.cat(logits, 1), extras={"gates": torch.stack(gates, 1)})


@dataclass
class CGCConfig(PLEConfig):
    num_levels: int = 1


@register("cgc")
class CGC(_ProgressiveBase):
    """CGC: task-specific plus shared experts, a gate per task over its own and the shared ones.

    Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model
    for Personalized Recommendations", RecSys 2020, Sec. 4.2 (Customized Gate Control, Eq. 1-3).
    Gate weights in ``extras["gates"]`` list task experts first, then shared experts.
    """

    Config = CGCConfig

    def __init__(self, schema, layout, config: CGCConfig) -> None:
        if config.num_levels != 1:
            raise ConfigError("model.num_levels: CGC has exactly one level; use model 'ple'")
        super().__init__(schema, layout, config)


@register("ple")
class PLE(_ProgressiveBase):
    """PLE: stacked extraction levels; a shared gate routes all experts upward between levels.

    Tang et al., "Progressive Layered Extraction (PLE)", RecSys 2020, Sec. 4.3 (Eq. 4-5): level j
    gates take level j-1's task (or shared) output as selector; the last level is a CGC.
    """
