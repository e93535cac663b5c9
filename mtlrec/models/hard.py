"""Hard parameter sharing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtlrec.data.table import TensorTable
from mtlrec.models.base import ModelConfig, ModelOutput, MTLModel
from mtlrec.models.registry import register
from mtlrec.nn.mlp import MLP


@dataclass
class SharedBottomConfig(ModelConfig):
    bottom_hidden: tuple[int, ...] = (64,)
    tower_hidden: tuple[int, ...] = (8,)


@register("shared-bottom")
class SharedBottom(MTLModel):
    """Shared-Bottom: one shared MLP under one tower per task (hard sharing).

    Caruana, "Multitask Learning", Machine Learning 28, 1997; the baseline of the MMoE paper
    (Ma et al., KDD 2018, Sec. 4.1).
    """

    Config = SharedBottomConfig

    def __init__(self, schema, layout, config: SharedBottomConfig) -> None:
        super().__init__(schema, layout, config)
        self.embedding = self.make_embedding()
        self.bottom = MLP(self.embedding.output_dim, config.bottom_hidden, dropout=config.dropout)
        for _ in schema.tasks:
            self.task_modules.append(
                MLP(self.bottom.output_dim, config.tower_hidden, 1, dropout=config.dropout)
            )

    def forward(self, batch: TensorTable) -> ModelOutput:
        h = self.bottom(self.embedding(batch))
        return ModelOutput(logits=torch.cat([tower(h) for tower in self.task_modules], 1))
