"""Sparse expert selection: DSelect-k gates over shared experts.

A softmax gate (MMoE) always gives every expert some weight; Top-k gates are sparse but not
continuous, which hurts gradient training. DSelect-k keeps the gate continuously differentiable
and still ends with exactly zero weight on all but (at most) k experts per task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelConfig, ModelOutput, MTLModel
from mtlrec.models.registry import register
from mtlrec.nn.experts import Experts, mix
from mtlrec.nn.mlp import MLP


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """DSelect-k's smooth-step (Hazimeh et al. 2021): 0 for t <= -gamma/2, 1 for
    t >= gamma/2, the cubic -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2 in between. Continuously
    differentiable, and exactly 0 or 1 outside the band, which is what makes the gate sparse."""
    cubic = -2.0 / gamma**3 * t.pow(3) + 1.5 / gamma * t + 0.5
    return torch.where(
        t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, 1.0, cubic)
    )


class DSelectKGate(nn.Module):
    """One task's DSelect-k gate over ``num_experts`` experts.

    ``k`` single-expert selectors, each a code z in R^m (m = ceil(log2 n)): selector weights
    r(z)_i = prod_j S(z_j)^{b_ij} (1 - S(z_j))^{1 - b_ij} with b_i the binary code of expert i
    (binary encoding), a distribution over the 2^m codes; the gate is q = sum_i softmax(alpha)_i r(z^(i))
    (DSelect-k). Static: z and alpha are parameters. Per-example: z^(i) = W_i x, alpha = A x.
    When n is not a power of two, the codes beyond n are dropped and r is renormalised over the
    n experts (ours; the authors' code keeps them and adds a penalty on their weight).
    Initialisation as in the authors' code (google-research ``dselect_k_moe``): codes, and the
    per-example code layer's weights and bias, uniform in +-gamma/100 (every selector starts
    near an even mix, so every expert gets gradient); selector weights alpha uniform in +-0.05.
    """

    def __init__(
        self, in_dim: int, num_experts: int, k: int, gamma: float, per_example: bool
    ) -> None:
        super().__init__()
        self.k, self.gamma, self.per_example = k, gamma, per_example
        self.num_experts = num_experts
        self.m = max(1, math.ceil(math.log2(num_experts)))
        codes = torch.tensor(
            [[(i >> j) & 1 for j in range(self.m)] for i in range(num_experts)], dtype=torch.float
        )
        self.register_buffer("codes", codes, persistent=False)  # [n, m]
        band = gamma / 100
        if per_example:
            self.z = nn.Linear(in_dim, k * self.m)
            self.alpha = nn.Linear(in_dim, k)
            nn.init.uniform_(self.z.weight, -band, band)
            nn.init.uniform_(self.z.bias, -band, band)
            nn.init.uniform_(self.alpha.weight, -0.05, 0.05)
            nn.init.uniform_(self.alpha.bias, -0.05, 0.05)
        else:
            self.z = nn.Parameter(torch.empty(k, self.m).uniform_(-band, band))
            self.alpha = nn.Parameter(torch.empty(k).uniform_(-0.05, 0.05))

    def selectors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r [B, k, n] single-expert selector distributions, w [B, k] selector weights)."""
        b = x.shape[0]
        if self.per_example:
            z = self.z(x).view(b, self.k, self.m)
            w = torch.softmax(self.alpha(x), -1)
        else:
            z = self.z.unsqueeze(0).expand(b, -1, -1)
            w = torch.softmax(self.alpha, -1).unsqueeze(0).expand(b, -1)
        s = smooth_step(z, self.gamma).unsqueeze(2)  # [B, k, 1, m]
        bits = self.codes.view(1, 1, self.num_experts, self.m)
        r = torch.where(bits > 0, s, 1.0 - s).prod(-1)  # [B, k, n]
        if self.num_experts != 2**self.m:
            r = r / r.sum(-1, keepdim=True).clamp_min(1e-12)
        return r, w

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate [B, n], entropy of the selectors [B]); the gate sums to 1 over experts."""
        r, w = self.selectors(x)
        gate = (w.unsqueeze(-1) * r).sum(1)
        entropy = -(r * r.clamp_min(1e-12).log()).sum(-1).sum(-1)
        return gate, entropy


@dataclass
class DSelectKConfig(ModelConfig):
    num_experts: int = 8
    k: int = 2
    gamma: float = 1.0
    entropy_weight: float = 0.01
    per_example: bool = True
    expert_hidden: tuple[int, ...] = (16,)
    tower_hidden: tuple[int, ...] = (8,)


@register("dselect-k")
class DSelectK(MTLModel):
    """DSelect-k: MMoE with continuously differentiable sparse gates selecting k experts per task.

    Hazimeh et al., "DSelect-k: Differentiable Selection in the Mixture of Experts with
    Applications to Multi-Task Learning", NeurIPS 2021. Shared ReLU experts; each task has a
    :class:`DSelectKGate` (static or per-example, option ``per_example``) and a tower,
    y_t = h_t(sum_i q_t(x)_i f_i(x)). ``aux_loss`` = ``entropy_weight`` x the sum over tasks and
    selectors of the entropy of each selector's distribution r(z), averaged over rows (the
    paper's entropy regulariser): it drives every selector to a single expert, so each task ends with non-zero weight
    on at most k experts (two selectors may pick the same one).

    Ownership: the gate and tower of task t are task t's; experts and embedding are shared.
    Departures: codes for a non-power-of-two number of experts are renormalised (see the gate);
    the entropy term is a mean over rows with ``entropy_weight`` 0.01 (the authors' code sums it
    over the batch, weight 1e-6 in its example).
    """

    Config = DSelectKConfig

    def __init__(self, schema, layout, config: DSelectKConfig) -> None:
        super().__init__(schema, layout, config)
        if config.num_experts < 1 or not 1 <= config.k <= config.num_experts:
            raise ConfigError("model.num_experts must be >= 1 and 1 <= model.k <= num_experts")
        if config.gamma <= 0 or config.entropy_weight < 0:
            raise ConfigError("model.gamma must be > 0 and model.entropy_weight >= 0")
        self.embedding = self.make_embedding()
        dim = self.embedding.output_dim
        self.experts = Experts(config.num_experts, dim, config.expert_hidden, config.dropout)
        for _ in schema.tasks:
            self.task_modules.append(
                nn.ModuleDict(
                    {
                        "gate": DSelectKGate(
                            dim, config.num_experts, config.k, config.gamma, config.per_example
                        ),
                        "tower": MLP(
                            self.experts.output_dim, config.tower_hidden, 1, config.dropout
                        ),
                    }
                )
            )

    @property
    def experts_per_task(self) -> int:
        """At most k experts per task by design (diagnostics do not call that a collapse)."""
        return self.config.k

    def forward(self, batch: TensorTable) -> ModelOutput:
        x = self.embedding(batch)
        expert_out = self.experts(x)
        logits, gates, entropy = [], [], x.new_zeros(())
        for module in self.task_modules:
            g, h = module["gate"](x)
            gates.append(g)
            entropy = entropy + h.mean()
            logits.append(module["tower"](mix(g, expert_out)))
        aux = self.config.entropy_weight * entropy if self.config.entropy_weight > 0 else None
        return ModelOutput(
            logits=torch.cat(logits, 1), aux_loss=aux, extras={"gates": torch.stack(gates, 1)}
        )
