"""Hierarchical sharing over several task dimensions: MFH's nested tree of switchers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelConfig, ModelOutput, MTLModel
from mtlrec.models.registry import register
from mtlrec.nn.experts import Experts
from mtlrec.nn.mlp import MLP
from mtlrec.schema import Schema


@dataclass
class MFHConfig(ModelConfig):
    group_feature: str = ""
    max_groups: int = 64
    root_experts: int = 4
    root_hidden: tuple[int, ...] = (32,)
    group_experts: int = 2
    group_hidden: int = 16
    tower_hidden: tuple[int, ...] = (8,)


def group_column(schema: Schema, name: str) -> tuple[int, str]:
    """(column of ``batch.cat``, feature name) of the grouping feature.

    ``batch.cat`` holds the categorical fields, then the bucketised numeric ones, in
    ``schema.embedded_fields()`` order; sequence fields are not in it and cannot group rows. An
    empty ``name`` picks the first categorical feature."""
    embedded = schema.embedded_fields()
    usable = [f for f in embedded if f.type != "sequence"]
    if not usable:
        raise ConfigError(
            "model 'mfh' needs a categorical (or bucketised numeric) feature to group users by"
        )
    if not name:
        return embedded.index(usable[0]), usable[0].name
    for j, feat in enumerate(embedded):
        if feat.name == name:
            if feat.type == "sequence":
                raise ConfigError(f"model.group_feature: {name!r} is a sequence feature")
            return j, name
    known = ", ".join(f.name for f in usable)
    raise ConfigError(
        f"model.group_feature: {name!r} is not a categorical (or bucketised numeric) feature; "
        f"choose one of: {known}"
    )


@register("mfh")
class MFH(MTLModel):
    """MFH: a nested tree of switchers, user group first, then behaviour (task).

    Liu et al., "Multi-Faceted Hierarchical Multi-Task Learning for a Large Number of Tasks with
    Multi-dimensional Relations", CIKM 2022 (Tencent). The tasks are the cartesian product of two
    dimensions, here user group x behaviour; MFH shares along the tree instead of over the flat
    product. A switcher is a mixture of experts with one softmax gate per child. The root switcher
    (shared experts over the input) has one gate per user group and produces the group's
    representation u_g = sum_e g^root_{g,e}(x) f_e(x). Nested under it, group g's switcher (its
    own ``group_experts`` experts over u_g) has one gate per behaviour, v_{g,k} = sum_e
    g_{g,k,e}(u_g) f_{g,e}(u_g); task k's tower reads v_{g,k}. A row is routed to the branch of its
    own group only, so a group's switcher learns from that group's rows (and the cold groups
    still share the root with everyone).

    Groups: ``group_feature`` names a categorical (or bucketised numeric) feature of the schema,
    empty = the first categorical one; every value of its vocabulary is its own group and the
    out-of-vocabulary bucket (row 0 of the feature's block) is one more (hashed features: one group
    per bucket). The group id of a row is its encoded local index, ``batch.cat[:, col] -
    field_offsets[col]``, with ``col`` the feature's position in ``schema.embedded_fields()``.
    ``max_groups`` guards against grouping by an id-like feature (one switcher per value).
    Census-Income has no new/old-user split; its preset groups by ``sex``.

    Ownership: a group's switcher gates for behaviour k belong to task k; the root, the groups'
    experts and the embedding are shared. Departures: two dimensions (group, behaviour) in a fixed
    order; behaviours keep one tower across groups (the paper's leaves are per group and
    behaviour); expert sizes are ours.
    """

    Config = MFHConfig

    def __init__(self, schema, layout, config: MFHConfig) -> None:
        super().__init__(schema, layout, config)
        if min(config.root_experts, config.group_experts, config.group_hidden) < 1:
            raise ConfigError("model.root_experts, group_experts, group_hidden must be >= 1")
        if not config.root_hidden:
            raise ConfigError("model.root_hidden must have at least one layer")
        column, name = group_column(schema, config.group_feature)
        self.group_feature = name
        self.group_col = column
        self.num_groups = layout.field_sizes[column]
        if self.num_groups > config.max_groups:
            raise ConfigError(
                f"model.group_feature: {name!r} has {self.num_groups} values (with the "
                f"out-of-vocabulary bucket), more than model.max_groups={config.max_groups}; "
                "group by a coarser feature or raise max_groups"
            )
        self.group_offset = layout.field_offsets[column]
        self.embedding = self.make_embedding()
        in_dim = self.embedding.output_dim
        groups, n_root, n_grp = self.num_groups, config.root_experts, config.group_experts
        self.root = Experts(n_root, in_dim, config.root_hidden, config.dropout)
        self.root_gate = nn.Linear(in_dim, groups * n_root)
        mid, out = self.root.output_dim, config.group_hidden
        bound = 1.0 / math.sqrt(mid)
        self.group_weight = nn.Parameter(
            torch.empty(groups, n_grp, mid, out).uniform_(-bound, bound)
        )
        self.group_bias = nn.Parameter(torch.empty(groups, n_grp, 1, out).uniform_(-bound, bound))
        for _ in schema.tasks:
            self.task_modules.append(
                nn.ModuleDict(
                    {
                        "gate_weight": nn.ParameterList(
                            [nn.Parameter(torch.empty(groups, mid, n_grp).uniform_(-bound, bound))]
                        ),
                        "gate_bias": nn.ParameterList([nn.Parameter(torch.zeros(groups, n_grp))]),
                        "tower": MLP(out, config.tower_hidden, 1, dropout=config.dropout),
                    }
                )
            )
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def groups(self, batch: TensorTable) -> torch.Tensor:
        """[B] group id of every row: the local index of the group feature (0 = OOV)."""
        return (batch.cat[:, self.group_col] - self.group_offset).clamp(0, self.num_groups - 1)

    def forward(self, batch: TensorTable) -> ModelOutput:
        x = self.embedding(batch)
        group = self.groups(batch)
        rows = x.shape[0]
        experts = self.root(x)  # [B, E0, D]
        gate_logits = self.root_gate(x).view(rows, self.num_groups, -1)
        index = group.view(rows, 1, 1).expand(rows, 1, gate_logits.shape[-1])
        root_gate = torch.softmax(gate_logits.gather(1, index).squeeze(1), -1)  # [B, E0]
        u = torch.bmm(root_gate.unsqueeze(1), experts).squeeze(1)  # [B, D]
        # Group switcher: each row picks its group's expert and gate weights (a gather, so the
        # forward has no data-dependent control flow and traces for export).
        weight = self.group_weight.index_select(0, group)  # [B, E1, D, H]
        bias = self.group_bias.index_select(0, group).squeeze(2)  # [B, E1, H]
        fg = torch.relu(torch.einsum("bd,bedh->beh", u, weight) + bias)
        if self.dropout is not None:
            fg = self.dropout(fg)
        logits, gates = [], []
        for module in self.task_modules:
            w = module["gate_weight"][0].index_select(0, group)  # [B, D, E1]
            b = module["gate_bias"][0].index_select(0, group)  # [B, E1]
            gate = torch.softmax(torch.einsum("bd,bde->be", u, w) + b, -1)
            gates.append(gate)
            logits.append(module["tower"](torch.bmm(gate.unsqueeze(1), fg).squeeze(1)))
        logits = torch.cat(logits, 1)
        return ModelOutput(
            logits=logits, extras={"group": group, "group_gates": torch.stack(gates, 1)}
        )
