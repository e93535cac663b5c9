"""Soft and selective sharing: GemNN, CFS-MTL, MRAN and cross-stitch networks.

These models keep per-task paths and let information cross between them through learned gates,
feature selectors, attention or linear combination units, rather than routing through experts:

* ``gemnn``: a gate between the embedding and each task's MLP; downstream tasks read their
  upstream task's hidden state (coarse-to-fine);
* ``cfs-mtl``: per-task feature selection regularised towards pseudo-intervention effects;
* ``mran``: feature-feature, task-feature and task-task attention;
* ``cross-stitch``: one column per task with learned linear mixing between layers.
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


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    """A weight with nn.Linear's default scale."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


def _scale_units(fields: torch.Tensor, num: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Flat input with every field embedding / numeric column times its scale.

    ``fields`` [B, F, E], ``num`` [B, N], ``scale`` [B, F + N] or [F + N]."""
    f = fields.shape[1]
    scale = scale if scale.dim() == 2 else scale.unsqueeze(0)
    parts = [(fields * scale[:, :f, None]).flatten(1)]
    if num.shape[1]:
        parts.append(num * scale[:, f:])
    return torch.cat(parts, 1)


# --- GemNN ----------------------------------------------------------------------------------------


@dataclass
class GemNNConfig(ModelConfig):
    hidden: tuple[int, ...] = (64, 32)
    gate: str = "bit"
    pass_upstream: bool = True


class _EmbeddingGate(nn.Module):
    """GemNN's gate between embeddings and MLP: e'_i = e_i ⊙ sigmoid(W_i e_i + b_i).

    ``bit``: a vector gate per field (W_i is E x E); ``field``: one scalar per field (E x 1).
    Numeric columns get a gate from a linear layer over the numeric block."""

    def __init__(self, num_fields: int, embed_dim: int, num_numeric: int, bitwise: bool) -> None:
        super().__init__()
        out = embed_dim if bitwise else 1
        self.weight = _uniform((num_fields, embed_dim, out), embed_dim)
        self.bias = nn.Parameter(torch.zeros(num_fields, out))
        self.numeric = nn.Linear(num_numeric, num_numeric) if num_numeric else None

    def forward(self, fields: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(torch.einsum("bfe,feo->bfo", fields, self.weight) + self.bias)
        parts = [(fields * gate).flatten(1)]
        if self.numeric is not None:
            parts.append(num * torch.sigmoid(self.numeric(num)))
        return torch.cat(parts, 1)


@register("gemnn")
class GemNN(MTLModel):
    """GemNN: gated embeddings per task; each task's MLP also reads its upstream task's state.

    Fei et al., "GemNN: Gating-enhanced Multi-task Neural Networks with Feature Interaction
    Learning for CTR Prediction", SIGIR 2021 (Baidu). Tasks run coarse to fine (the paper's
    user-ad ranking -> ad-material matching -> user-ad-material ranking). Gating between the
    embedding layer and the MLP: every task gates each field embedding, e'_i = e_i ⊙
    sigmoid(W_i e_i + b_i) (``gate: bit``, the paper's bit-wise gate; ``field`` for one scalar
    per field), then runs its own MLP. Parameter passing from upstream to downstream: all tasks
    share the embedding table, and a downstream task's MLP also reads the last hidden layer of
    its upstream task (``pass_upstream``). The upstream is the task's ``depends_on``, or else the
    previous task in schema order (so list tasks coarse to fine).

    Ownership: each task's gate and MLP are its own; the upstream hidden state is passed with
    stop-gradient, so a downstream loss never changes the upstream network (the paper trains the
    upstream task first and hands its parameters down; here they train jointly).
    Departures: joint instead of staged training; the paper's production features (query, ad,
    material) are whatever the schema provides.
    """

    Config = GemNNConfig

    def __init__(self, schema, layout, config: GemNNConfig) -> None:
        super().__init__(schema, layout, config)
        if config.gate not in ("bit", "field"):
            raise ConfigError(f"model.gate: {config.gate!r} is not 'bit' or 'field'")
        if not config.hidden:
            raise ConfigError("model.hidden: GemNN needs at least one hidden layer per task")
        self.embedding = self.make_embedding()
        upstream = schema.upstream_index()
        self.upstream_of = [
            (up if up >= 0 else t - 1) if config.pass_upstream else -1
            for t, up in enumerate(upstream)
        ]
        in_dim = self.embedding.output_dim
        for t in range(self.num_tasks):
            extra = config.hidden[-1] if self.upstream_of[t] >= 0 else 0
            self.task_modules.append(
                nn.ModuleDict(
                    {
                        "gate": _EmbeddingGate(
                            layout.num_fields,
                            config.embed_dim,
                            layout.num_numeric,
                            config.gate == "bit",
                        ),
                        "mlp": MLP(in_dim + extra, config.hidden, dropout=config.dropout),
                        "out": nn.Linear(config.hidden[-1], 1),
                    }
                )
            )

    def forward(self, batch: TensorTable) -> ModelOutput:
        fields = self.embedding.fields(batch)
        hidden: list[torch.Tensor] = []
        logits = []
        for t, module in enumerate(self.task_modules):
            x = module["gate"](fields, batch.num)
            up = self.upstream_of[t]
            if up >= 0:
                x = torch.cat([x, hidden[up].detach()], 1)
            h = module["mlp"](x)
            hidden.append(h)
            logits.append(module["out"](h))
        return ModelOutput(logits=torch.cat(logits, 1))


# --- CFS-MTL --------------------------------------------------------------------------------------


ITE_SMOOTHING = 1e-3  # added to every effect (probability units) before normalising


@dataclass
class CFSMTLConfig(ModelConfig):
    bottom_hidden: tuple[int, ...] = (64,)
    tower_hidden: tuple[int, ...] = (8,)
    causal_weight: float = 1.0
    intervene_fields: int = 8


@register("cfs-mtl")
class CFSMTL(MTLModel):
    """CFS-MTL: per-task feature selection pulled towards the features' pseudo-intervention effects.

    Chen et al., "CFS-MTL: A Causal Feature Selection Mechanism for Multi-task Learning via
    Pseudo-intervention", CIKM 2022 (Ant Group). Feature selection: task k weighs every field
    (embedded fields and numeric columns) with an importance vector from its own selector,
    a^k(x) = softmax(W_k x + b_k), and its input is x^k = [U a^k_1 e_1, ..., U a^k_U e_U] (U units,
    mean scale 1); a shared bottom MLP and a tower per task follow. Pseudo-intervention: the
    individual treatment effect of unit i on task k is estimated by intervening on it,
    ITE^k_i(x) = |f_k(x) - f_k(do(x_i = x'_i))|, where x' is another row of the batch (the
    observed distribution of the feature stands in for the intervention); the ITEs are computed
    without gradient. The regulariser pulls the importance towards the normalised ITEs,
    ``aux_loss`` = ``causal_weight`` x mean over rows and tasks of
    ||a^k / sum a^k - ITE^k / sum ITE^k||^2 over the intervened units, so a feature that is
    merely correlated with the label (small effect when intervened) loses weight.

    Ownership: selector and tower of task k are its own; embedding and bottom are shared.
    Departures: each training step intervenes on ``intervene_fields`` randomly drawn units (0: all)
    instead of every feature, to bound the cost to that many extra forward passes without
    gradient; ITEs are taken on predicted probabilities (values for regression tasks), with
    dropout off, and smoothed by adding 1e-3 before normalising (a task that has learned nothing
    yet has all-zero effects, whose normalisation would be noise); the selectors read the
    embeddings with stop-gradient, so the regulariser shapes the selectors, not the shared
    embedding; the distance is squared Euclidean; the backbone (a shared-bottom MLP) is ours.
    """

    Config = CFSMTLConfig

    def __init__(self, schema, layout, config: CFSMTLConfig) -> None:
        super().__init__(schema, layout, config)
        if config.intervene_fields < 0 or config.causal_weight < 0:
            raise ConfigError("model.intervene_fields and model.causal_weight must be >= 0")
        self.embedding = self.make_embedding()
        self.units = layout.num_fields + layout.num_numeric
        in_dim = self.embedding.output_dim
        self.bottom = MLP(in_dim, config.bottom_hidden, dropout=config.dropout)
        for _ in schema.tasks:
            self.task_modules.append(
                nn.ModuleDict(
                    {
                        "selector": nn.Linear(in_dim, self.units),
                        "tower": MLP(
                            self.bottom.output_dim, config.tower_hidden, 1, dropout=config.dropout
                        ),
                    }
                )
            )

    def _predict(
        self, fields: torch.Tensor, num: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, T], importance [B, T, U]) for given field embeddings and numerics."""
        flat = _scale_units(fields, num, fields.new_ones(self.units)).detach()
        logits, importance = [], []
        for module in self.task_modules:
            a = torch.softmax(module["selector"](flat), -1)
            h = self.bottom(_scale_units(fields, num, a * self.units))
            logits.append(module["tower"](h))
            importance.append(a)
        return torch.cat(logits, 1), torch.stack(importance, 1)

    def forward(self, batch: TensorTable) -> ModelOutput:
        fields, num = self.embedding.fields(batch), batch.num
        logits, importance = self._predict(fields, num)
        aux = None
        if self.training and torch.is_grad_enabled() and self.config.causal_weight > 0:
            aux = self.config.causal_weight * self._causal_penalty(fields, num, importance)
        return ModelOutput(logits=logits, aux_loss=aux, extras={"importance": importance})

    def _causal_penalty(
        self, fields: torch.Tensor, num: torch.Tensor, importance: torch.Tensor
    ) -> torch.Tensor:
        """Squared distance between normalised importance and normalised pseudo-intervention
        effects, over a random subset of units, mean over rows and tasks."""
        rows, k = fields.shape[0], self.config.intervene_fields
        units = torch.randperm(self.units, device=fields.device)
        if 0 < k < self.units:
            units = units[:k]
        other = torch.randperm(rows, device=fields.device)
        with torch.no_grad():
            # Slice 0 is the observed input, slice j + 1 the input with unit units[j] replaced;
            # all run in one pass with dropout off, so only the intervention differs.
            f0, n0 = fields.detach(), num.detach()
            f_do = f0.unsqueeze(0).repeat(len(units) + 1, 1, 1, 1)
            n_do = n0.unsqueeze(0).repeat(len(units) + 1, 1, 1)
            n_fields = f0.shape[1]
            for j, u in enumerate(units.tolist(), 1):
                if u < n_fields:
                    f_do[j, :, u] = f0[other, u]
                else:
                    n_do[j, :, u - n_fields] = n0[other, u - n_fields]
            was_training = self.training
            self.train(False)
            try:
                logits_do, _ = self._predict(f_do.flatten(0, 1), n_do.flatten(0, 1))
            finally:
                self.train(was_training)
            out = self._outputs(logits_do).view(len(units) + 1, rows, -1)
            effect = (out[1:] - out[:1]).abs()  # [K, B, T]
            # Additive smoothing: while a task has learned nothing, its effects are all ~0 and
            # the target stays ~uniform instead of normalised noise.
            ite = effect.permute(1, 2, 0) + ITE_SMOOTHING  # [B, T, K]
            target = ite / ite.sum(-1, keepdim=True)
        picked = importance[:, :, units]
        picked = picked / picked.sum(-1, keepdim=True).clamp_min(1e-12)
        return (picked - target).pow(2).sum(-1).mean()

    def _outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.where(self.is_binary, torch.sigmoid(logits), logits)


# --- MRAN -----------------------------------------------------------------------------------------


@dataclass
class MRANConfig(ModelConfig):
    heads: int = 2
    attention_layers: int = 1
    task_heads: int = 4
    tower_hidden: tuple[int, ...] = (16,)


@register("mran")
class MRAN(MTLModel):
    """MRAN: feature-feature, task-feature and task-task attention.

    Zhao et al., "Multiple Relational Attention Network for Multi-task Learning", KDD 2019. Every
    input is a field vector (embedded fields; a numeric column x_j becomes x_j w_j + b_j).
    Feature-feature interaction module: ``attention_layers`` of multi-head self-attention over
    the fields with a residual projection, H <- ReLU(MHA(H, H, H) + H W_res). Task-feature
    dependence module: task k attends over the fields with ``task_heads`` learned queries
    q^k_h and its own key/value maps, r^k = [sum_i softmax_i(q^k_h · H_i W^k_K / sqrt(E))
    H_i W^k_V]_h. Task-task relationship module: attention among the task representations of a
    row, z^k = r^k + sum_j softmax_j(r^k W_Q · r^j W_K / sqrt(D)) r^j W_V, so the relation matrix
    (``extras["task_attention"]``, [B, T, T]) decides per example how much each task borrows
    from the others. A tower per task reads z^k.

    Ownership: the task-task module mixes every task's representation into every other's, so
    everything below the towers (including the per-task attention queries) is shared; the
    towers are the tasks' own. Departures: the module order (feature-feature, task-feature,
    task-task) and the residual forms are our reading of the paper; no positional or
    review-text inputs.
    """

    Config = MRANConfig

    def __init__(self, schema, layout, config: MRANConfig) -> None:
        super().__init__(schema, layout, config)
        dim = config.embed_dim
        if config.heads < 1 or dim % config.heads:
            raise ConfigError("model.embed_dim must be divisible by model.heads (>= 1)")
        if config.task_heads < 1 or config.attention_layers < 0:
            raise ConfigError("model.task_heads must be >= 1 and attention_layers >= 0")
        self.embedding = self.make_embedding()
        n_num = layout.num_numeric
        self.num_weight = _uniform((n_num, dim), 1) if n_num else None
        self.num_bias = nn.Parameter(torch.zeros(n_num, dim)) if n_num else None
        if layout.num_fields + n_num == 0:
            raise ConfigError("model 'mran' needs at least one feature")
        self.self_attention = nn.ModuleList(
            nn.MultiheadAttention(dim, config.heads, dropout=config.dropout, batch_first=True)
            for _ in range(config.attention_layers)
        )
        self.residual = nn.ModuleList(
            nn.Linear(dim, dim, bias=False) for _ in range(config.attention_layers)
        )
        tasks = self.num_tasks
        self.task_queries = _uniform((tasks, config.task_heads, dim), dim)
        self.task_keys = _uniform((tasks, dim, dim), dim)
        self.task_values = _uniform((tasks, dim, dim), dim)
        rep = config.task_heads * dim
        self.relation_q = nn.Linear(rep, rep)
        self.relation_k = nn.Linear(rep, rep)
        self.relation_v = nn.Linear(rep, rep)
        for _ in schema.tasks:
            self.task_modules.append(MLP(rep, config.tower_hidden, 1, dropout=config.dropout))

    def field_vectors(self, batch: TensorTable) -> torch.Tensor:
        """[B, F + N, E]: embedded fields, then one vector per numeric column."""
        parts = [self.embedding.fields(batch)]
        if self.num_weight is not None:
            parts.append(batch.num.unsqueeze(-1) * self.num_weight + self.num_bias)
        return torch.cat(parts, 1)

    def forward(self, batch: TensorTable) -> ModelOutput:
        h = self.field_vectors(batch)  # [B, U, E]
        for attention, residual in zip(self.self_attention, self.residual):
            mixed, _ = attention(h, h, h, need_weights=False)
            h = torch.relu(mixed + residual(h))
        dim = h.shape[-1]
        keys = torch.einsum("bue,tef->btuf", h, self.task_keys)
        values = torch.einsum("bue,tef->btuf", h, self.task_values)
        scores = torch.einsum("btuf,thf->bthu", keys, self.task_queries) / math.sqrt(dim)
        feature_attention = torch.softmax(scores, -1)
        reps = torch.einsum("bthu,btuf->bthf", feature_attention, values).flatten(2)  # [B, T, D]
        q, k, v = self.relation_q(reps), self.relation_k(reps), self.relation_v(reps)
        relation = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(reps.shape[-1]), -1)
        z = reps + relation @ v
        logits = [tower(z[:, t]) for t, tower in enumerate(self.task_modules)]
        return ModelOutput(
            logits=torch.cat(logits, 1),
            extras={"task_attention": relation, "feature_attention": feature_attention},
        )


# --- cross-stitch ---------------------------------------------------------------------------------


@dataclass
class CrossStitchConfig(ModelConfig):
    hidden: tuple[int, ...] = (64, 32)
    tower_hidden: tuple[int, ...] = ()
    alpha_self: float = 0.9


@register("cross-stitch")
class CrossStitch(MTLModel):
    """Cross-stitch networks: one column per task, learned linear mixing after every layer.

    Misra et al., "Cross-stitch Networks for Multi-task Learning", CVPR 2016. Each task has its
    own column (an MLP over the shared embedding); after every hidden layer a cross-stitch unit
    mixes the columns' activations, x~^t = sum_s alpha_ts x^s (Eq. 1, one T x T matrix per
    layer), initialised near the identity as in the paper (alpha_S = ``alpha_self`` = 0.9 on the
    diagonal, the rest of each row split evenly, alpha_D = 0.1 for two tasks). The columns'
    last layer feeds each task's output layer (``tower_hidden`` adds hidden layers there). With
    alpha = identity the model is exactly T independent networks on a shared embedding.

    Ownership: any off-diagonal alpha lets a task's loss reach the other columns, so the columns
    and the alphas are shared; only the output layers are the tasks' own. Departures: the paper
    starts from single-task networks trained separately and gives alpha a larger learning rate;
    here everything trains jointly at the trainer's learning rate; the columns share the
    embedding table.
    """

    Config = CrossStitchConfig

    def __init__(self, schema, layout, config: CrossStitchConfig) -> None:
        super().__init__(schema, layout, config)
        if not config.hidden:
            raise ConfigError("model.hidden: cross-stitch needs at least one layer to stitch")
        if not 0.0 <= config.alpha_self <= 1.0:
            raise ConfigError("model.alpha_self must be in [0, 1]")
        self.embedding = self.make_embedding()
        tasks = self.num_tasks
        self.columns = nn.ModuleList()
        self.alphas = nn.ParameterList()
        dim = self.embedding.output_dim
        off = (1.0 - config.alpha_self) / (tasks - 1) if tasks > 1 else 0.0
        init = torch.full((tasks, tasks), off)
        init.fill_diagonal_(config.alpha_self if tasks > 1 else 1.0)
        for width in config.hidden:
            self.columns.append(Experts(tasks, dim, (width,), config.dropout))
            self.alphas.append(nn.Parameter(init.clone()))
            dim = width
        for _ in schema.tasks:
            self.task_modules.append(MLP(dim, config.tower_hidden, 1, dropout=config.dropout))

    def forward(self, batch: TensorTable) -> ModelOutput:
        h = self.embedding(batch)  # [B, D], every column's input
        for column, alpha in zip(self.columns, self.alphas):
            a = column(h)  # [B, T, width]
            h = torch.einsum("ts,bsd->tbd", alpha, a)  # [T, B, width]: next layer, per column
        logits = [tower(h[t]) for t, tower in enumerate(self.task_modules)]
        return ModelOutput(logits=torch.cat(logits, 1))
