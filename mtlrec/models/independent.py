"""The no-sharing baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.models.base import ModelConfig, ModelOutput, MTLModel
from mtlrec.models.registry import register
from mtlrec.nn.mlp import MLP


@dataclass
class SingleTaskConfig(ModelConfig):
    hidden: tuple[int, ...] = (64, 32)


@register("single-task")
class SingleTask(MTLModel):
    """One independent network per task (own embeddings and MLP): the no-transfer baseline.

    Every multi-task result should be read against this one: a multi-task model that does not
    beat it suffers negative transfer. Nothing is shared, so balancers see no shared parameters.
    """

    Config = SingleTaskConfig

    def __init__(self, schema, layout, config: SingleTaskConfig) -> None:
        super().__init__(schema, layout, config)
        for _ in schema.tasks:
            emb = self.make_embedding()
            net = MLP(emb.output_dim, config.hidden, 1, dropout=config.dropout)
            self.task_modules.append(nn.ModuleDict({"embedding": emb, "net": net}))

    def forward(self, batch: TensorTable) -> ModelOutput:
        logits = [m["net"](m["embedding"](batch)) for m in self.task_modules]
        return ModelOutput(logits=torch.cat(logits, 1))
