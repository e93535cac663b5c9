"""Distillation between tasks and models: DMTL (multi-task teacher -> two-tower student).

A ranking-stage multi-task model sees user and item features together and predicts click and
post-click engagement well, but candidate generation needs a two-tower model whose item side can
be indexed. DMTL trains both at once: the two-tower student learns the teacher's entire-space
score instead of the sparse hard label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelConfig, ModelOutput, MTLModel
from mtlrec.models.kernel_experts import item_field_index
from mtlrec.models.registry import register
from mtlrec.nn.experts import Experts, Gate, mix
from mtlrec.nn.mlp import MLP


class TwoTower(nn.Module):
    """User tower over the user fields (and numeric features), item tower over the item fields,
    logit = u . v + b. Its own embedding table, so it can be exported alone."""

    def __init__(self, model: MTLModel, item_fields: str, hidden: tuple[int, ...]) -> None:
        super().__init__()
        if not hidden:
            raise ConfigError("model.student_hidden must be non-empty")
        names = [f.name for f in model.schema.embedded_fields()]
        item = item_field_index(names, item_fields)
        user = [i for i in range(len(names)) if i not in item]
        if not user:
            raise ConfigError("model.item_fields: the user side needs at least one embedded field")
        self.register_buffer("item_index", torch.tensor(item), persistent=False)
        self.register_buffer("user_index", torch.tensor(user), persistent=False)
        d = model.config.embed_dim
        self.num_numeric = model.layout.num_numeric
        self.embedding = model.make_embedding()
        p = model.config.dropout
        self.user = MLP(len(user) * d + self.num_numeric, hidden[:-1], hidden[-1], p)
        self.item = MLP(len(item) * d, hidden[:-1], hidden[-1], p)
        self.bias = nn.Parameter(torch.zeros(1))

    def towers(self, batch: TensorTable) -> tuple[torch.Tensor, torch.Tensor]:
        """(user vectors [B, D], item vectors [B, D]), e.g. for an index."""
        fields = self.embedding.fields(batch)
        user = fields[:, self.user_index].flatten(1)
        if self.num_numeric:
            user = torch.cat([user, batch.num], 1)
        return self.user(user), self.item(fields[:, self.item_index].flatten(1))

    def forward(self, batch: TensorTable) -> torch.Tensor:
        u, v = self.towers(batch)
        return (u * v).sum(-1) + self.bias


@dataclass
class DMTLConfig(ModelConfig):
    num_experts: int = 4
    expert_hidden: tuple[int, ...] = (16,)
    tower_hidden: tuple[int, ...] = (8,)
    item_fields: str = ""
    student_hidden: tuple[int, ...] = (32, 16)
    target_task: str = ""
    distill: bool = True
    distill_weight: float = 1.0


@register("dmtl")
class DMTL(MTLModel):
    """DMTL: an MMoE teacher for click and (click-conditioned) engagement, distilled into a
    two-tower student for candidate generation.

    Ma et al., "Distillation based Multi-task Learning: A Candidate Generation Model for
    Improving Reading Duration", SIGIR 2021 (short paper). Teacher: MMoE (shared experts, a
    gate and tower per task); a task with ``depends_on`` predicts P(task | upstream), and the
    entire-space score is the chain product (pCTR x P(long read | click), as ESMM), supervised
    on the usual per-task losses. Student (:class:`TwoTower`, its own embeddings; field split by
    ``item_fields`` as in ``mvke``: default the fields named like "item"/"tag") predicts the
    teacher's entire-space score of ``target_task`` (default: the last task):
    ``aux_loss`` = ``distill_weight`` x BCE(student logit, teacher joint probability, detached),
    MSE for a regression target. With ``distill: false`` the student learns the hard
    entire-space label instead (the undistilled baseline).

    ``logits`` are the teacher's (what evaluation reports); ``extras["student"]`` [B] is the
    student's score (probability for a binary target), the candidate-generation output.

    Ownership: each teacher task's gate and tower are its own; experts, embeddings and the
    student are shared (no task loss reaches the student; it learns from ``aux_loss`` only).
    ``extras["gates"]`` is the teacher's [B, T, E].

    Departures: the paper's teacher and student sizes and its duration bucketing are not used;
    reading duration is any binary (or regression) task that ``depends_on`` the click task.
    """

    Config = DMTLConfig

    def __init__(self, schema, layout, config: DMTLConfig) -> None:
        super().__init__(schema, layout, config)
        if config.num_experts < 1 or config.distill_weight < 0:
            raise ConfigError("model.num_experts must be >= 1 and model.distill_weight >= 0")
        names = [t.name for t in schema.tasks]
        target = config.target_task or names[-1]
        if target not in names:
            raise ConfigError(f"model.target_task: {target!r} is not a task ({', '.join(names)})")
        self.target = names.index(target)
        self.embedding = self.make_embedding()
        dim = self.embedding.output_dim
        self.experts = Experts(config.num_experts, dim, config.expert_hidden, config.dropout)
        for _ in schema.tasks:
            self.task_modules.append(
                nn.ModuleDict(
                    {
                        "gate": Gate(dim, config.num_experts),
                        "tower": MLP(
                            self.experts.output_dim, config.tower_hidden, 1, config.dropout
                        ),
                    }
                )
            )
        self.student = TwoTower(self, config.item_fields, config.student_hidden)

    def forward(self, batch: TensorTable) -> ModelOutput:
        x = self.embedding(batch)
        expert_out = self.experts(x)
        gates = [m["gate"](x) for m in self.task_modules]
        logits = torch.cat(
            [m["tower"](mix(g, expert_out)) for m, g in zip(self.task_modules, gates)], 1
        )
        out = ModelOutput(logits=logits, extras={"gates": torch.stack(gates, 1)})
        student = self.student(batch)
        binary = bool(self.is_binary[self.target])
        out.extras["student"] = torch.sigmoid(student) if binary else student
        has_label = batch.labels.dim() == 2 and batch.labels.shape[1] > self.target
        if self.config.distill_weight > 0 and (self.config.distill or has_label):
            if self.config.distill:
                target = self.predict(ModelOutput(logits=logits.detach()))[1][:, self.target]
            else:
                target = batch.labels[:, self.target]
            loss = (
                F.binary_cross_entropy_with_logits(student, target)
                if binary
                else (student - target).pow(2).mean()
            )
            out.aux_loss = self.config.distill_weight * loss
        return out
