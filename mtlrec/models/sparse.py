"""Sparse sharing: each task learns which inputs and which shared parameters it uses (MSSM, CSRec).

Both models start from one over-parameterised shared network and let every task carve out its own
sparse part of it with learned binary masks:

* ``mssm`` masks whole input fields per task and routes each task through a learned subset of
  shared cells (hard-concrete coding variables with an L0 penalty, so the masks end exactly at 0
  or 1);
* ``csrec`` masks individual weights of a shared MLP per task (straight-through binary masks with
  an L1 penalty on the mask scores) and settles weights that several tasks claim with a
  contrastive mask and alternating updates.
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
from mtlrec.nn.experts import Experts
from mtlrec.nn.mlp import MLP

# --- hard-concrete coding variables ---------------------------------------------------------------


class HardConcrete(nn.Module):
    """Gates z in [0, 1] with exact zeros and ones, trainable with an L0 penalty.

    Louizos, Welling and Kingma, "Learning Sparse Neural Networks through L0 Regularization",
    ICLR 2018 (Eq. 10-13), the relaxation SNR (Ma et al., AAAI 2019) and MSSM use for their coding
    variables: in training s = sigmoid((log u - log(1 - u) + log_alpha) / beta), u ~ U(0, 1),
    stretched to (gamma, zeta) and clipped to [0, 1]; at evaluation the noise is dropped. The
    expected number of non-zero gates is sum sigmoid(log_alpha - beta log(-gamma / zeta)).
    With gamma = -0.1, zeta = 1.1 a gate is exactly 0 (1) at evaluation once log_alpha < -2.4
    (> 2.4): the masks the model ends with are binary.
    """

    GAMMA = -0.1
    ZETA = 1.1

    def __init__(self, shape: tuple[int, ...], init: float, beta: float) -> None:
        super().__init__()
        self.beta = beta
        self.log_alpha = nn.Parameter(torch.full(shape, float(init)))

    def forward(self) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.ZETA - self.GAMMA) + self.GAMMA).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """The gates used at evaluation (no noise), detached."""
        with torch.no_grad():
            s = torch.sigmoid(self.log_alpha)
            return (s * (self.ZETA - self.GAMMA) + self.GAMMA).clamp(0.0, 1.0)

    def expected_l0(self) -> torch.Tensor:
        """Probability that each gate is non-zero (Louizos et al. Eq. 12), same shape."""
        shift = self.beta * math.log(-self.GAMMA / self.ZETA)
        return torch.sigmoid(self.log_alpha - shift)


# --- MSSM -----------------------------------------------------------------------------------------


@dataclass
class MSSMConfig(ModelConfig):
    num_cells: int = 4
    cell_hidden: tuple[int, ...] = (32, 32)
    tower_hidden: tuple[int, ...] = (8,)
    l0_weight: float = 1.0
    l0_warmup: int = 200
    gate_init: float = 3.0
    temperature: float = 2.0 / 3.0


@register("mssm")
class MSSM(MTLModel):
    """MSSM: per-task sparse field selection, then per-task sparse routing through shared cells.

    Ding et al., "MSSM: A Multiple-level Sparse Sharing Model for Efficient Multi-Task Learning",
    SIGIR 2021 (Ant Group). Field-level sparse connection (FSCM): task k reads field i scaled by a
    coding variable z^k_i, x^k = [z^k_1 e_1, ..., z^k_F e_F] (numeric features are fields too,
    one gate each). Cell-level sparse sharing (CSSM): ``len(cell_hidden)`` levels of
    ``num_cells`` shared cells (one ReLU layer each); at level l task k's input goes through every
    cell and the outputs are combined with the task's coding variables over cells,
    h^{k,l} = sum_c z^{k,l}_c cell^l_c(h^{k,l-1}) (SNR's sum routing, Ma et al. AAAI 2019, which
    MSSM builds on); a tower per task reads h^{k,L}. All coding variables are hard-concrete gates
    (:class:`HardConcrete`) and ``aux_loss`` = ``l0_weight`` x the mean expected L0 norm of all
    gates, so the field and cell masks end exactly binary and sparse.

    Ownership: field gates, cell coding variables and the tower of task k are task k's; the
    embedding and the cells are shared. ``field_masks()`` / ``cell_masks()`` give the evaluation
    masks; ``extras`` carries them too.

    The penalty is switched on after ``l0_warmup`` training steps (counted in the buffer
    ``step``, saved with the model). Why: with Adam even a tiny but consistent penalty gradient
    moves a gate at the full learning rate while the task's own gradient on it is still ~0, so a
    task whose signal sits in slowly learned embeddings would lose all its gates (and, once a gate
    is exactly 0, its gradient) before it has learned anything. Gates start open (``gate_init`` =
    3: deterministic gate 1, most training samples 1).

    Departures: the short paper does not publish the gate parameterisation, the penalty weight,
    a schedule or the cell sizes; the hard-concrete/L0 form follows SNR, ``gate_init``,
    ``l0_weight`` and ``l0_warmup`` are ours. One noise sample per gate per batch (not per row).
    """

    Config = MSSMConfig

    def __init__(self, schema, layout, config: MSSMConfig) -> None:
        super().__init__(schema, layout, config)
        if config.num_cells < 1 or not config.cell_hidden:
            raise ConfigError("model.num_cells must be >= 1 and model.cell_hidden non-empty")
        if config.temperature <= 0 or config.l0_weight < 0 or config.l0_warmup < 0:
            raise ConfigError("model.temperature must be > 0, l0_weight and l0_warmup >= 0")
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.embedding = self.make_embedding()
        self.num_fields = layout.num_fields
        self.num_inputs = layout.num_fields + layout.num_numeric  # gated units
        self.levels = nn.ModuleList()
        dim = self.embedding.output_dim
        for width in config.cell_hidden:
            self.levels.append(Experts(config.num_cells, dim, (width,), config.dropout))
            dim = width
        n_levels = len(config.cell_hidden)
        for _ in schema.tasks:
            self.task_modules.append(
                nn.ModuleDict(
                    {
                        "fields": HardConcrete(
                            (self.num_inputs,), config.gate_init, config.temperature
                        ),
                        "cells": HardConcrete(
                            (n_levels, config.num_cells), config.gate_init, config.temperature
                        ),
                        "tower": MLP(dim, config.tower_hidden, 1, dropout=config.dropout),
                    }
                )
            )

    def _select(self, fields: torch.Tensor, num: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """One task's input: each embedded field and numeric column times its gate."""
        parts = [(fields * z[: self.num_fields, None]).flatten(1)]
        if num.shape[1]:
            parts.append(num * z[self.num_fields :])
        return torch.cat(parts, 1)

    def forward(self, batch: TensorTable) -> ModelOutput:
        fields = self.embedding.fields(batch)  # [B, F, E]
        num = batch.num
        logits, field_z, cell_z, penalty = [], [], [], []
        for module in self.task_modules:
            zf, zc = module["fields"](), module["cells"]()
            h = self._select(fields, num, zf)
            for level, z in zip(self.levels, zc):
                h = torch.einsum("bcd,c->bd", level(h), z)
            logits.append(module["tower"](h))
            field_z.append(zf)
            cell_z.append(zc)
            penalty += [module["fields"].expected_l0(), module["cells"].expected_l0().flatten()]
        on = 1.0 if int(self.step) >= self.config.l0_warmup else 0.0
        if self.training and torch.is_grad_enabled():
            self.step += 1
        aux = self.config.l0_weight * on * torch.cat(penalty).mean()
        return ModelOutput(
            logits=torch.cat(logits, 1),
            aux_loss=aux,
            extras={"field_masks": torch.stack(field_z), "cell_masks": torch.stack(cell_z)},
        )

    def field_masks(self) -> torch.Tensor:
        """[T, F + N] evaluation field gates (embedded fields in table order, then numerics)."""
        return torch.stack([m["fields"].deterministic() for m in self.task_modules])

    def cell_masks(self) -> torch.Tensor:
        """[T, levels, cells] evaluation coding variables."""
        return torch.stack([m["cells"].deterministic() for m in self.task_modules])


# --- CSRec ----------------------------------------------------------------------------------------


@dataclass
class CSRecConfig(ModelConfig):
    hidden: tuple[int, ...] = (64, 32)
    tower_hidden: tuple[int, ...] = (8,)
    mask_init: float = 0.1
    mask_l1: float = 0.01
    alternate: bool = True


def _binary(scores: torch.Tensor) -> torch.Tensor:
    """Straight-through binary mask: 1[s > 0] forward, sigmoid'(s) backward."""
    soft = torch.sigmoid(scores)
    return (scores > 0).to(scores.dtype) + soft - soft.detach()


@register("csrec")
class CSRec(MTLModel):
    """CSRec: per-task binary weight masks over a shared MLP, a contrastive mask for weights
    several tasks use, and alternating updates of those weights.

    Bai et al., "A Contrastive Sharing Model for Multi-Task Recommendation", WWW 2022. Shared
    network W (an MLP over the embedding); task k uses the subnet W ⊙ M_k with a learned binary
    mask M_k = 1[S_k > 0] over every weight (mask scores S_k trained with the straight-through
    estimator; ``aux_loss`` = ``mask_l1`` x mean sigmoid(S_k) prunes what no task needs, so the
    masks are binary by construction and become sparse in training). A weight kept by more than
    one task is a conflict parameter; the contrastive mask says how much each such task depends
    on it, C_k = sigmoid(S_k) M_k / sum_j sigmoid(S_j) M_j, and task k's gradient on it is scaled
    by C_k (the weight is optimised mostly by the task it matters more to). Weights only one
    task keeps get that task's full gradient.

    Alternating training (``alternate``, on by default): the conflict weights are updated by one
    task per step, in turn. The model keeps a step counter in the buffer ``step`` (saved in the
    state dict, so a resumed run continues the rotation) and advances it on every training-mode
    forward with autograd on; at step n only task n mod T's gradient reaches the conflict
    weights (times its C_k); every task still trains its exclusive weights, mask and tower, and
    the biases and the embedding, at every step. The switch is done inside the forward with a
    gradient-scaling identity, W' = sg(W) + g ⊙ (W - sg(W)) (value W, gradient times g), so the
    trainer and every balancer see ordinary per-task losses.

    Ownership: mask scores and towers are the task's own (the contrastive weights read the other
    tasks' scores detached); W, biases and the embedding are shared.

    Departures: the paper derives its masks from sparse-sharing pruning; here they are
    straight-through masks with an L1 penalty (``mask_init`` > 0: dense at the start); the
    contrastive mask is our reading of "the contribution of the parameter to a specific task"
    as the normalised mask score; the alternation is per step and over the conflict weights
    only, so that every step still has every task's loss for the balancers.
    """

    Config = CSRecConfig

    def __init__(self, schema, layout, config: CSRecConfig) -> None:
        super().__init__(schema, layout, config)
        if not config.hidden:
            raise ConfigError("model.hidden: CSRec needs at least one shared layer to mask")
        if config.mask_l1 < 0:
            raise ConfigError("model.mask_l1 must be >= 0")
        self.embedding = self.make_embedding()
        self.layers = nn.ModuleList()
        dim = self.embedding.output_dim
        for width in config.hidden:
            self.layers.append(nn.Linear(dim, width))
            dim = width
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        for _ in schema.tasks:
            scores = nn.ParameterList(
                nn.Parameter(torch.full_like(layer.weight, config.mask_init))
                for layer in self.layers
            )
            self.task_modules.append(
                nn.ModuleDict(
                    {"scores": scores, "tower": MLP(dim, config.tower_hidden, 1, config.dropout)}
                )
            )

    def masks(self) -> list[torch.Tensor]:
        """Per layer, the [T, out, in] binary masks (detached)."""
        with torch.no_grad():
            return [
                torch.stack([(m["scores"][i] > 0).float() for m in self.task_modules])
                for i in range(len(self.layers))
            ]

    def _gradient_scales(self, layer: int, active: int | None) -> torch.Tensor:
        """[T, out, in]: how much of each task's gradient reaches each weight (detached)."""
        with torch.no_grad():
            scores = torch.stack([m["scores"][layer] for m in self.task_modules])
            on = (scores > 0).to(scores.dtype)
            weight = torch.sigmoid(scores) * on
            contrast = weight / weight.sum(0, keepdim=True).clamp_min(1e-12)
            conflict = on.sum(0, keepdim=True) > 1
            if active is not None:
                turn = torch.zeros_like(scores)
                turn[active] = 1.0
                contrast = contrast * turn
            return torch.where(conflict, contrast, torch.ones_like(contrast))

    def forward(self, batch: TensorTable) -> ModelOutput:
        x = self.embedding(batch)
        training = self.training and torch.is_grad_enabled()
        active = None
        if training and self.config.alternate:
            active = int(self.step) % self.num_tasks
        if training:
            self.step += 1
        scales = (
            [self._gradient_scales(i, active) for i in range(len(self.layers))]
            if training
            else None
        )
        logits, penalty = [], []
        for t, module in enumerate(self.task_modules):
            h = x
            for i, layer in enumerate(self.layers):
                w = layer.weight
                if scales is not None:
                    frozen = w.detach()
                    w = frozen + scales[i][t] * (w - frozen)
                h = torch.relu(
                    nn.functional.linear(h, w * _binary(module["scores"][i]), layer.bias)
                )
                if self.dropout is not None:
                    h = self.dropout(h)
            logits.append(module["tower"](h))
            penalty += [torch.sigmoid(s).flatten() for s in module["scores"]]
        aux = self.config.mask_l1 * torch.cat(penalty).mean()
        return ModelOutput(logits=torch.cat(logits, 1), aux_loss=aux)
