"""Prototype features for multi-task learning: PFE.

Gates and experts of MMoE-style models all read the same raw input. PFE first summarises the
shared representation by a set of prototype centres (cluster centres of the rows seen so far)
and hands each row's prototype feature, a soft mixture of the centres near it, to the gates and
the task-specific experts, so that every task sees which "kind" of row it is looking at.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelConfig, ModelOutput, MTLModel
from mtlrec.models.registry import register
from mtlrec.nn.experts import Experts, Gate, mix
from mtlrec.nn.mlp import MLP


class PrototypeBank(nn.Module):
    """K prototype centres (buffers) updated by mini-batch k-means with an exponential average.

    ``forward(h)`` returns the prototype feature p(h) = sum_k softmax_k(-||h - c_k||^2 / tau) c_k
    (differentiable in h; the centres are constants for autograd). In training, after computing
    p, each centre moves toward the mean of the rows (detached) assigned to it:
    c_k <- momentum c_k + (1 - momentum) mean{h_i : argmin_j ||h_i - c_j|| = k}; a centre no row
    chose stays where it is. The first training batch initialises the centres by farthest-point
    seeding (k-means++ without the randomness), so no centre starts in an empty region.
    """

    def __init__(self, num: int, dim: int, momentum: float, temperature: float) -> None:
        super().__init__()
        self.num, self.momentum, self.temperature = num, momentum, temperature
        self.register_buffer("centres", torch.zeros(num, dim))
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def _seed(self, h: torch.Tensor) -> None:
        chosen = [0]
        dist = (h - h[0]).pow(2).sum(-1)
        for _ in range(1, min(self.num, h.shape[0])):
            nxt = int(dist.argmax())
            chosen.append(nxt)
            dist = torch.minimum(dist, (h - h[nxt]).pow(2).sum(-1))
        while len(chosen) < self.num:  # fewer rows than centres: repeat rows
            chosen.append(chosen[len(chosen) % max(1, h.shape[0])])
        self.centres.copy_(h[chosen])
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(self, h: torch.Tensor) -> None:
        """One k-means-like step of the centres toward the rows ``h`` [B, D]."""
        h = h.detach().to(self.centres.dtype)  # bf16 rows under autocast; the centres stay fp32
        if not bool(self.initialised):
            self._seed(h)
            return
        assign = torch.cdist(h, self.centres).argmin(1)
        counts = torch.bincount(assign, minlength=self.num).to(h.dtype)
        sums = torch.zeros_like(self.centres).index_add_(0, assign, h)
        seen = counts > 0
        means = sums[seen] / counts[seen].unsqueeze(1)
        self.centres[seen] = self.momentum * self.centres[seen] + (1 - self.momentum) * means

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.update(h)
        d2 = (h.unsqueeze(1) - self.centres.unsqueeze(0)).pow(2).sum(-1)  # [B, K]
        weights = torch.softmax(-d2 / self.temperature, -1)
        return weights @ self.centres


@dataclass
class PFEConfig(ModelConfig):
    num_prototypes: int = 8
    momentum: float = 0.9
    temperature: float = 1.0
    shared_experts: int = 4
    specific_experts: int = 1
    expert_hidden: tuple[int, ...] = (16,)
    tower_hidden: tuple[int, ...] = (8,)


@register("pfe")
class PFE(MTLModel):
    """PFE: prototype centres of the shared representation feed the gates and task experts.

    Xin et al., "Prototype Feature Extraction for Multi-task Learning", WWW 2022. Shared experts
    f_1..f_S read the input x; their mean h = (1/S) sum_i f_i(x) is the shared representation the
    prototype centres live in (:class:`PrototypeBank`, centres stored as buffers and updated every
    training batch). Each row's prototype feature p = p(h) joins the input of task t's experts
    g^t_j([x, p]) and of its softmax gate over [task experts, shared experts]; a tower per task
    reads the mixture (CGC layout with prototype-augmented gate and task-expert inputs).

    Ownership: task t's experts, gate and tower are task t's; shared experts and the embedding are
    shared (the prototype feature is a function of the shared experts).
    ``extras["gates"]`` is [B, T, specific + shared experts], task experts first;
    ``extras["prototypes"]`` the centres [K, D].

    Departures: the paper's exact update rule for the centres and the feature form were not
    available to us; the centres here follow mini-batch k-means with an EMA (``momentum``), and
    the prototype feature is a soft (``temperature``) assignment-weighted mixture of centres.
    """

    Config = PFEConfig

    def __init__(self, schema, layout, config: PFEConfig) -> None:
        super().__init__(schema, layout, config)
        c = config
        if min(c.num_prototypes, c.shared_experts, c.specific_experts) < 1:
            raise ConfigError("model.num_prototypes, shared_experts, specific_experts must be >= 1")
        if not 0 <= c.momentum < 1 or c.temperature <= 0:
            raise ConfigError("model.momentum must be in [0, 1) and model.temperature > 0")
        self.embedding = self.make_embedding()
        dim = self.embedding.output_dim
        self.shared = Experts(c.shared_experts, dim, c.expert_hidden, c.dropout)
        out = self.shared.output_dim
        self.prototypes = PrototypeBank(c.num_prototypes, out, c.momentum, c.temperature)
        for _ in schema.tasks:
            self.task_modules.append(
                nn.ModuleDict(
                    {
                        "experts": Experts(
                            c.specific_experts, dim + out, c.expert_hidden, c.dropout
                        ),
                        "gate": Gate(dim + out, c.specific_experts + c.shared_experts),
                        "tower": MLP(out, c.tower_hidden, 1, c.dropout),
                    }
                )
            )

    def forward(self, batch: TensorTable) -> ModelOutput:
        x = self.embedding(batch)
        shared_out = self.shared(x)  # [B, S, D]
        p = self.prototypes(shared_out.mean(1))
        xp = torch.cat([x, p], 1)
        logits, gates = [], []
        for module in self.task_modules:
            g = module["gate"](xp)
            z = mix(g, torch.cat([module["experts"](xp), shared_out], 1))
            logits.append(module["tower"](z))
            gates.append(g)
        return ModelOutput(
            logits=torch.cat(logits, 1),
            extras={"gates": torch.stack(gates, 1), "prototypes": self.prototypes.centres},
        )
