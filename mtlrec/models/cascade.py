"""Cascaded tasks over the entire space: ESMM and AITM.

Both are written for funnels of any length: a task's ``depends_on`` in the schema names the step
before it (click -> cart -> purchase). Tasks without ``depends_on`` are ordinary parallel tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.models.base import PROB_EPS, ModelConfig, ModelOutput, MTLModel
from mtlrec.models.registry import register
from mtlrec.nn.mlp import MLP


@dataclass
class ESMMConfig(ModelConfig):
    tower_hidden: tuple[int, ...] = (64, 32)


@register("esmm")
class ESMM(MTLModel):
    """ESMM: pCTCVR = pCTR * pCVR, supervised over all impressions.

    Ma et al., "Entire Space Multi-Task Model: An Effective Approach for Estimating Post-Click
    Conversion Rate", SIGIR 2018. The CTR and CVR networks share the embedding table only and have
    their own MLPs (Sec. 2.3); the loss is BCE(pCTR, click) + BCE(pCTR*pCVR, click&conversion)
    over the entire space (Eq. 4), so pCVR is never fitted on clicked rows alone.
    Generalised to chains: a task's entire-space probability is its conditional probability times
    its upstream task's entire-space probability. A task with no ``depends_on`` is trained as in
    a shared-embedding model (ESMM has nothing to add there; the paper has no such task).
    """

    Config = ESMMConfig

    def __init__(self, schema, layout, config: ESMMConfig) -> None:
        super().__init__(schema, layout, config)
        self.require_binary_chain()
        self.embedding = self.make_embedding()
        for _ in schema.tasks:
            self.task_modules.append(
                MLP(self.embedding.output_dim, config.tower_hidden, 1, dropout=config.dropout)
            )

    def forward(self, batch: TensorTable) -> ModelOutput:
        x = self.embedding(batch)
        return ModelOutput(logits=torch.cat([tower(x) for tower in self.task_modules], 1))

    def task_losses(self, out: ModelOutput, batch: TensorTable) -> torch.Tensor:
        return self.chain_losses(out, batch)

    def task_parameters(self) -> list[list[nn.Parameter]]:
        """An upstream task's tower also feeds its downstream task's loss, so it is shared."""
        return self.leaf_task_parameters()


@dataclass
class AITMConfig(ModelConfig):
    embed_dim: int = 5
    tower_hidden: tuple[int, ...] = (128, 64, 32)
    attention_dim: int = 32
    calibration_weight: float = 0.6


class _AIT(nn.Module):
    """Attention over {transferred info p_{t-1}, tower output q_t} (AITM Eq. 4-6)."""

    def __init__(self, dim: int, attention_dim: int) -> None:
        super().__init__()
        self.value = nn.Linear(dim, attention_dim)  # h1
        self.query = nn.Linear(dim, attention_dim)  # h2
        self.key = nn.Linear(dim, attention_dim)  # h3
        self.scale = attention_dim**-0.5

    def forward(self, transferred: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        u = torch.stack([transferred, own], 1)  # [B, 2, d]
        score = (self.query(u) * self.key(u)).sum(-1) * self.scale  # [B, 2]
        weight = torch.softmax(score, 1).unsqueeze(-1)
        return (weight * self.value(u)).sum(1)


@register("aitm")
class AITM(MTLModel):
    """AITM: adaptive information transfer between the towers of consecutive conversion steps.

    Xi et al., "Modeling the Sequential Dependence among Audience Multi-step Conversions with
    Multi-task Learning in Targeted Display Advertising", KDD 2021. Shared embedding, a tower per
    task giving q_t; p_{t-1} = g(z_{t-1}) (one linear layer) carries what the previous task learned;
    z_t = AIT(p_{t-1}, q_t) attends over both (Eq. 4-6); y_t = sigmoid(MLP(z_t)) is the
    entire-space probability of step t. Loss = sum_t BCE(y_t) + alpha * mean(max(y_t - y_{t-1}, 0))
    (Eq. 8-10, alpha = 0.6). Defaults follow Sec. 4.1.4: embedding 5, towers [128, 64, 32],
    attention dim 32.
    Departures: information is transferred in schema order between all tasks, but the calibration
    penalty applies only where the schema declares ``depends_on`` (on parallel tasks such as
    Census, "step t is rarer than step t-1" does not hold). The paper's tower dropout is the
    ``dropout`` option (default 0). The transfer g is one linear layer and the attention's
    h1/h2/h3 projections have biases; the authors' torch code (adtalos/AITM-torch) uses
    Linear -> ReLU -> Dropout for g and bias-free projections.
    """

    Config = AITMConfig

    def __init__(self, schema, layout, config: AITMConfig) -> None:
        super().__init__(schema, layout, config)
        self.require_binary_chain()
        self.embedding = self.make_embedding()
        dim = config.tower_hidden[-1] if config.tower_hidden else self.embedding.output_dim
        for t in range(self.num_tasks):
            parts = {
                "tower": MLP(
                    self.embedding.output_dim, config.tower_hidden, dropout=config.dropout
                ),
                "head": nn.Linear(config.attention_dim if t else dim, 1),
            }
            if t:
                parts["ait"] = _AIT(dim, config.attention_dim)
            self.task_modules.append(nn.ModuleDict(parts))
        # g_{t-1}: transfers z_{t-1} of task t-1 into task t's space (shared: it serves both).
        self.transfer = nn.ModuleList(
            nn.Linear(config.attention_dim if t else dim, dim) for t in range(self.num_tasks - 1)
        )

    def forward(self, batch: TensorTable) -> ModelOutput:
        x = self.embedding(batch)
        z_prev = None
        raw = []
        for t, module in enumerate(self.task_modules):
            q = module["tower"](x)
            z = q if t == 0 else module["ait"](self.transfer[t - 1](z_prev), q)
            raw.append(module["head"](z))
            z_prev = z
        # The probability chain in fp32 (a no-op in fp32 training): under bf16 autocast the
        # ratio y_t / y_{t-1} starts near 1, which bf16 rounds to 1, and logit(1) = inf.
        raw_logits = torch.cat(raw, 1).float()
        y = torch.sigmoid(raw_logits)
        up = self.upstream.clamp_min(0)
        ratio = (y / y[:, up].clamp_min(PROB_EPS)).clamp(PROB_EPS, 1 - PROB_EPS)
        cond_logits = torch.where(self.upstream >= 0, torch.logit(ratio), raw_logits)
        dependent = (self.upstream >= 0).to(y.dtype)
        penalty = (torch.relu(y - y[:, up]) * dependent).sum(1).mean()
        return ModelOutput(
            logits=cond_logits,
            joint=y,
            aux_loss=self.config.calibration_weight * penalty if self.has_dependency else None,
        )

    def task_losses(self, out: ModelOutput, batch: TensorTable) -> torch.Tensor:
        return self.entire_space_losses(out.joint, out, batch)

    def task_parameters(self) -> list[list[nn.Parameter]]:
        """Only each head (and the last task's tower and attention) serve a single task; earlier
        towers also feed later tasks through the transfer, so they are shared."""
        last = self.num_tasks - 1
        return [
            list(m.parameters()) if t == last else list(m["head"].parameters())
            for t, m in enumerate(self.task_modules)
        ]
