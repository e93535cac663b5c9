"""Virtual-kernel experts between a user tower and a tag/item tower: MVKE.

User-profile models predict a user's preference for many tags with a two-tower network; one
user vector for every tag cannot express that a user's interest in "cars" and in "cooking" rests
on different features. MVKE keeps several user representations (one per virtual kernel) and lets
the tag choose among them, while staying a two-tower model (user side and tag side meet only in
the final inner product and the tag-conditioned gate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelConfig, ModelOutput, MTLModel, checked_option_names
from mtlrec.models.registry import register
from mtlrec.nn.experts import Experts, mix
from mtlrec.nn.mlp import MLP

_TAG_WORDS = ("item", "tag")


def item_field_index(names: list[str], option: str) -> list[int]:
    """Indices (into ``names``, the embedded fields in table order) of the tag/item side of a
    two-tower split: the comma-separated ``option``, or by default every field whose name
    contains "item" or "tag", or the last field when none does."""
    if option.strip():
        wanted = checked_option_names(option, "model.item_fields", names, "an embedded feature")
        return [names.index(n) for n in wanted]
    item = [i for i, n in enumerate(names) if any(w in n.lower() for w in _TAG_WORDS)]
    return item or [len(names) - 1]


@dataclass
class MVKEConfig(ModelConfig):
    item_fields: str = ""
    num_kernels: int = 4
    expert_hidden: tuple[int, ...] = (32, 16)
    tag_hidden: tuple[int, ...] = (32, 16)


@register("mvke")
class MVKE(MTLModel):
    """MVKE: virtual-kernel experts on the user side, gated by the tag/item representation.

    Xu et al., "Mixture of Virtual-Kernel Experts for Multi-Objective User Profile Modeling",
    KDD 2022. Fields are split into a tag/item side and a user side (option ``item_fields``:
    comma-separated feature names; default: every embedded feature whose name contains "item"
    or "tag", or the last embedded field when none does; numeric features always go to the user
    side). K virtual kernels v_k in R^d are shared by all tasks. Virtual-kernel expert k attends
    over the user fields with its kernel as the query, a_kf = softmax_f(v_k . W e_f / sqrt(d)),
    and an expert MLP maps [sum_f a_kf e_f, numeric] to u_k. Task t's tag tower maps the
    tag/item fields to e^t; its virtual-kernel gate weighs the experts by the tag's affinity to
    each kernel, w^t_k = softmax_k(e^t . P v_k) (P projects kernels into the tower space), and
    the prediction is the inner product of the gated user vector with the tag vector,
    logit_t = (sum_k w^t_k u_k) . e^t + b_t.

    Ownership: task t's tag tower, bias and kernel projection are task t's; the embedding,
    kernels, attention and experts are shared. ``extras["gates"]`` is [B, T, K].

    Departures: the paper assigns each task an overlapping subset of the kernels; here every task
    gates over all K kernels (the softmax gate can learn the subset). The field split heuristic
    and sizes are ours.
    """

    Config = MVKEConfig

    def __init__(self, schema, layout, config: MVKEConfig) -> None:
        super().__init__(schema, layout, config)
        if config.num_kernels < 1 or not config.expert_hidden or not config.tag_hidden:
            raise ConfigError("model.num_kernels must be >= 1, expert/tag hidden non-empty")
        if config.expert_hidden[-1] != config.tag_hidden[-1]:
            raise ConfigError("model.expert_hidden and model.tag_hidden must end in the same width")
        names = [f.name for f in schema.embedded_fields()]
        item = item_field_index(names, config.item_fields)
        user = [i for i in range(len(names)) if i not in item]
        if not user:
            raise ConfigError("model.item_fields: the user side needs at least one embedded field")
        self.register_buffer("item_index", torch.tensor(item), persistent=False)
        self.register_buffer("user_index", torch.tensor(user), persistent=False)
        d = config.embed_dim
        self.embedding = self.make_embedding()
        self.kernels = nn.Parameter(torch.randn(config.num_kernels, d) / math.sqrt(d))
        self.key = nn.Linear(d, d, bias=False)
        self.experts = Experts(
            config.num_kernels, d + layout.num_numeric, config.expert_hidden, config.dropout
        )
        out = config.expert_hidden[-1]
        for _ in schema.tasks:
            self.task_modules.append(
                nn.ModuleDict(
                    {
                        "tag_tower": MLP(
                            len(item) * d, config.tag_hidden[:-1], out, config.dropout
                        ),
                        "kernel_proj": nn.Linear(d, out, bias=False),
                        "bias": nn.Linear(1, 1, bias=False),
                    }
                )
            )

    def forward(self, batch: TensorTable) -> ModelOutput:
        fields = self.embedding.fields(batch)  # [B, F, d]
        user = fields[:, self.user_index]
        item = fields[:, self.item_index].flatten(1)
        d = fields.shape[-1]
        scores = torch.einsum("kd,bfd->bkf", self.kernels, self.key(user)) / math.sqrt(d)
        pooled = torch.einsum("bkf,bfd->kbd", torch.softmax(scores, -1), user)  # [K, B, d]
        if self.layout.num_numeric:
            num = batch.num.unsqueeze(0).expand(pooled.shape[0], -1, -1)
            pooled = torch.cat([pooled, num], -1)
        user_vecs = self.experts(pooled)  # [B, K, D]
        logits, gates = [], []
        ones = fields.new_ones(fields.shape[0], 1)
        for module in self.task_modules:
            tag = module["tag_tower"](item)  # [B, D]
            g = torch.softmax(tag @ module["kernel_proj"](self.kernels).T, -1)  # [B, K]
            u = mix(g, user_vecs)
            logits.append((u * tag).sum(-1, keepdim=True) + module["bias"](ones))
            gates.append(g)
        return ModelOutput(logits=torch.cat(logits, 1), extras={"gates": torch.stack(gates, 1)})
