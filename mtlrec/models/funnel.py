"""Funnel models that use the structure of the conversion path: ESM², APEM and DBMTL.

ESM² splits the post-click path into a deterministic action (cart, wish list) and the rest; APEM
extracts per-step feature patterns for multi-step conversions; DBMTL conditions each task's tower
on its upstream task's hidden state. All three read the funnel from the schema's ``depends_on``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models.base import PROB_EPS, ModelConfig, ModelOutput, MTLModel
from mtlrec.models.registry import register
from mtlrec.nn.mlp import MLP


def _logit(p: torch.Tensor) -> torch.Tensor:
    """logit(p) in fp32: under bf16 autocast a probability above 1 - 2^-9 rounds to 1 before
    the clamp could keep it below, and logit(1) = inf (a no-op in fp32 training)."""
    return torch.logit(p.float().clamp(PROB_EPS, 1 - PROB_EPS))


# --- ESM² ---------------------------------------------------------------------------------------


@dataclass
class ESM2Config(ModelConfig):
    tower_hidden: tuple[int, ...] = (64, 32)
    daction_task: str = ""


@register("esm2")
class ESM2(MTLModel):
    """ESM²: click -> D-action / O-action -> purchase, supervised over all impressions.

    Wen et al., "Entire Space Multi-Task Modeling via Post-Click Behavior Decomposition for
    Conversion Rate Prediction", SIGIR 2020. A shared embedding (SEM) feeds four towers (DPM):
    y1 = P(click), y2 = P(D-action | click), y3 = P(buy | D-action), y4 = P(buy | O-action, i.e. no
    D-action). The sequential composition module (SCM) gives pCTR = y1, pCTAVR = y1 y2,
    pCVR = y2 y3 + (1 - y2) y4 and pCTCVR = y1 pCVR; the loss is BCE(pCTR), BCE(pCTAVR) and
    BCE(pCTCVR) against click, click & D-action and click & purchase over the entire space.
    Schema: exactly three tasks; the last one (the purchase) ``depends_on`` a root task (the click);
    the D-action task depends on the click too. ``daction_task`` names it; empty (default) picks
    the first task, in schema order, that depends on the click and is not the purchase. Reported
    per task: conditional = (pCTR, y2, pCVR), joint = (pCTR, pCTAVR, pCTCVR).
    Departures: the three losses are weighted by the balancer (schema weights, 1 by default) where
    the paper has its own weights w_ctr, w_ctavr, w_ctcvr; towers are MLPs on the embedding.
    """

    Config = ESM2Config

    def __init__(self, schema, layout, config: ESM2Config) -> None:
        super().__init__(schema, layout, config)
        self.require_binary_chain()
        names = schema.task_names
        if len(names) != 3:
            raise ConfigError(
                f"model 'esm2' needs exactly three tasks (click, D-action, purchase); the schema "
                f"has {len(names)}: {', '.join(names)} (use esmm for a click -> purchase pair)"
            )
        final = schema.tasks[-1]
        if final.depends_on is None or schema.task(final.depends_on).depends_on is not None:
            raise ConfigError(
                f"model 'esm2': the last task {final.name!r} must depend on a task without "
                "depends_on (the click)"
            )
        click = final.depends_on
        if config.daction_task:
            daction = schema.task(config.daction_task).name
        else:
            candidates = [t.name for t in schema.tasks[:-1] if t.depends_on == click]
            if not candidates:
                raise ConfigError(f"model 'esm2': no task depends on {click!r} besides the last")
            daction = candidates[0]
        if schema.task(daction).depends_on != click or daction == final.name:
            raise ConfigError(
                f"model.daction_task: {daction!r} must depend on {click!r} and not be the last task"
            )
        self.idx_click = names.index(click)
        self.idx_daction = names.index(daction)
        self.idx_buy = len(names) - 1
        self.embedding = self.make_embedding()
        dim = self.embedding.output_dim

        def tower() -> MLP:
            return MLP(dim, config.tower_hidden, 1, dropout=config.dropout)

        towers: list[nn.Module] = [nn.Identity()] * 3
        towers[self.idx_click] = tower()
        towers[self.idx_daction] = tower()
        towers[self.idx_buy] = nn.ModuleDict({"after_daction": tower(), "after_oaction": tower()})
        self.task_modules.extend(towers)

    def paths(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The four tower probabilities y1..y4 [B] for an embedded batch."""
        buy = self.task_modules[self.idx_buy]
        return {
            "y1": torch.sigmoid(self.task_modules[self.idx_click](x)).squeeze(1),
            "y2": torch.sigmoid(self.task_modules[self.idx_daction](x)).squeeze(1),
            "y3": torch.sigmoid(buy["after_daction"](x)).squeeze(1),
            "y4": torch.sigmoid(buy["after_oaction"](x)).squeeze(1),
        }

    def forward(self, batch: TensorTable) -> ModelOutput:
        y = self.paths(self.embedding(batch))
        cvr = y["y2"] * y["y3"] + (1 - y["y2"]) * y["y4"]
        cond = [None] * 3
        joint = [None] * 3
        cond[self.idx_click], joint[self.idx_click] = y["y1"], y["y1"]
        cond[self.idx_daction], joint[self.idx_daction] = y["y2"], y["y1"] * y["y2"]
        cond[self.idx_buy], joint[self.idx_buy] = cvr, y["y1"] * cvr
        return ModelOutput(
            logits=_logit(torch.stack(cond, 1)),
            joint=torch.stack(joint, 1),
            extras={"p_buy_after_daction": y["y3"], "p_buy_after_oaction": y["y4"]},
        )

    def task_losses(self, out: ModelOutput, batch: TensorTable) -> torch.Tensor:
        return self.entire_space_losses(out.joint, out, batch)

    def task_parameters(self) -> list[list[nn.Parameter]]:
        """y1 feeds all three losses and y2 both CTAVR and CTCVR: shared. y3, y4: purchase only."""
        return [
            list(m.parameters()) if t == self.idx_buy else []
            for t, m in enumerate(self.task_modules)
        ]


# --- APEM ---------------------------------------------------------------------------------------


@dataclass
class APEMConfig(ModelConfig):
    shared_patterns: int = 4
    step_patterns: int = 2
    num_heads: int = 2
    se_reduction: int = 2
    tower_hidden: tuple[int, ...] = (64, 32)


class _SqueezeExcite(nn.Module):
    """Field re-weighting (Hu et al., CVPR 2018, applied to fields as in FiBiNET): squeeze each
    field to its mean, excite through a bottleneck, scale the field by the sigmoid weight."""

    def __init__(self, fields: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, fields // max(1, reduction))
        self.net = nn.Sequential(nn.Linear(fields, hidden), nn.ReLU(), nn.Linear(hidden, fields))

    def forward(self, e: torch.Tensor) -> torch.Tensor:  # [B, F, d]
        return e * torch.sigmoid(self.net(e.mean(-1))).unsqueeze(-1)


class _InducedSetAttention(nn.Module):
    """MAB(I, X) of the Set Transformer (Lee et al., ICML 2019): learned query points attend over
    the set of fields; H = LN(I + MHA(I, X, X)), out = LN(H + FFN(H)). Each query is processed
    independently, so a query's output depends only on that query and the fields."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, queries: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        h = self.norm1(queries + self.attn(queries, fields, fields, need_weights=False)[0])
        return self.norm2(h + self.ffn(h))


@register("apem")
class APEM(MTLModel):
    """APEM: per-step pattern extraction by set attention over fields, a pattern selector per task.

    Tao, Ha, Guo, Ma, Cheng, Lin (MYbank, Ant Group), "Adaptive Pattern Extraction Multi-Task
    Learning for Multi-Step Conversion Estimations", arXiv preprint 2301.02494, January 2023 (no
    peer-reviewed venue found; the abstract of a later revision describes a different framework,
    TAFE, so this follows the APEM version). The paper's two blocks, from its abstract: a
    "DeepAuto Group Transformer" that enhances feature expressivity with a modified set attention
    and a squeeze-and-excitation operation, and a "Pattern Selector" with adaptive task-indicator
    vectors. Implemented as: field embeddings [B, F, d] (numeric features projected to one extra
    field) -> squeeze-and-excitation over fields -> induced set attention in which groups of
    learned query points extract patterns: ``shared_patterns`` used by every step and
    ``step_patterns`` owned by each step -> per task, an indicator q_t = v_t + W_t mean(fields)
    scores the shared patterns and the task's own (softmax(P q_t / sqrt(d))) and pools them -> the
    task tower reads [pooled pattern, re-weighted fields]. Steps are chained as in ESMM: the tower
    gives P(step t | step t-1), entire-space probabilities are products along ``depends_on``, and
    each task is supervised over all impressions.
    Departures: the equations were not available to us (only the abstract), so the set-attention
    form (Set Transformer MAB with inducing points), where SE is applied (on fields, before
    attention), the selector's form (dot-product attention with an input-adaptive indicator), the
    residual field input to the towers and the entire-space chained loss are our choices.
    """

    Config = APEMConfig

    def __init__(self, schema, layout, config: APEMConfig) -> None:
        super().__init__(schema, layout, config)
        self.require_binary_chain()
        d = config.embed_dim
        if d % config.num_heads:
            raise ConfigError("model.embed_dim must be divisible by model.num_heads")
        if config.shared_patterns < 0 or config.step_patterns < 0:
            raise ConfigError("model.shared_patterns and model.step_patterns must be >= 0")
        if config.shared_patterns + config.step_patterns < 1:
            raise ConfigError("model: every task needs at least one pattern")
        self.embedding = self.make_embedding()
        self.num_proj = nn.Linear(layout.num_numeric, d) if layout.num_numeric else None
        fields = layout.num_fields + (1 if layout.num_numeric else 0)
        if fields < 1:
            raise ConfigError("model 'apem' needs at least one feature")
        self.se = _SqueezeExcite(fields, config.se_reduction)
        self.attention = _InducedSetAttention(d, config.num_heads)
        self.shared_points = nn.Parameter(torch.randn(config.shared_patterns, d) * 0.1)
        tower_in = d + fields * d
        for _ in schema.tasks:
            module = nn.Module()
            module.points = nn.Parameter(torch.randn(config.step_patterns, d) * 0.1)
            module.indicator = nn.Parameter(torch.randn(d) * 0.1)
            module.adapt = nn.Linear(d, d, bias=False)
            module.tower = MLP(tower_in, config.tower_hidden, 1, dropout=config.dropout)
            self.task_modules.append(module)

    def fields(self, batch: TensorTable) -> torch.Tensor:
        e = self.embedding.fields(batch)
        if self.num_proj is not None:
            e = torch.cat([e, self.num_proj(batch.num).unsqueeze(1)], 1)
        return self.se(e)

    def forward(self, batch: TensorTable) -> ModelOutput:
        e = self.fields(batch)  # [B, F, d]
        b, _, d = e.shape
        k_s, k_t = self.config.shared_patterns, self.config.step_patterns
        points = torch.cat([self.shared_points] + [m.points for m in self.task_modules], 0)
        patterns = self.attention(points.unsqueeze(0).expand(b, -1, -1), e)  # [B, K, d]
        summary = e.mean(1)
        flat = e.flatten(1)
        logits, selections = [], []
        for t, m in enumerate(self.task_modules):
            start = k_s + t * k_t
            own = torch.cat([patterns[:, :k_s], patterns[:, start : start + k_t]], 1)
            q = m.indicator + m.adapt(summary)  # [B, d]
            weight = torch.softmax((own * q.unsqueeze(1)).sum(-1) / d**0.5, 1)
            pooled = (weight.unsqueeze(-1) * own).sum(1)
            logits.append(m.tower(torch.cat([pooled, flat], 1)))
            selections.append(weight)
        return ModelOutput(
            logits=torch.cat(logits, 1), extras={"selection": torch.stack(selections, 1)}
        )

    def task_losses(self, out: ModelOutput, batch: TensorTable) -> torch.Tensor:
        return self.chain_losses(out, batch)

    def task_parameters(self) -> list[list[nn.Parameter]]:
        """As in ESMM: an upstream step's parameters also reach its downstream task's loss."""
        return self.leaf_task_parameters()


# --- DBMTL --------------------------------------------------------------------------------------


@dataclass
class DBMTLConfig(ModelConfig):
    bottom_hidden: tuple[int, ...] = (64,)
    tower_hidden: tuple[int, ...] = (32,)
    link_dim: int = 16


@register("dbmtl")
class DBMTL(MTLModel):
    """DBMTL (the model): each task's tower also reads its upstream task's hidden state.

    Wang, Ji, Liu, Zhao (Alibaba), "Deep Bayesian Multi-Target Learning for Recommender Systems",
    arXiv:1902.09154, 2019. The targets form a Bayesian network, P(t1, t2 | x) = P(t1 | x)
    P(t2 | t1, x), whose directed links are parameterised by hidden layers: a shared bottom gives
    H(x); the tower of a task with a parent reads [H, g(h_parent)] where h_parent is the parent
    tower's last hidden layer and g a dense layer (``link_dim``); a root task's tower reads H.
    The loss is the negative log-likelihood of that factorisation, which is the base class's
    per-task loss: BCE on every row for a root task, BCE on rows where the parent is positive for
    a ``depends_on`` task (the conditional factor).
    (Not the ``dbmtl`` *balancer*, Lin et al.'s dual-balancing method; models and balancers are
    separate registries.)
    Departures: the paper selects the network structure by model selection; here the structure is
    the schema's ``depends_on`` graph (one parent per task). Regression tasks are allowed, as in
    the paper (stay time).
    """

    Config = DBMTLConfig

    def __init__(self, schema, layout, config: DBMTLConfig) -> None:
        super().__init__(schema, layout, config)
        if not config.tower_hidden:
            raise ConfigError("model.tower_hidden: DBMTL needs a hidden layer to link towers")
        self.embedding = self.make_embedding()
        self.bottom = MLP(self.embedding.output_dim, config.bottom_hidden, dropout=config.dropout)
        hidden = config.tower_hidden[-1]
        for up in self.upstream.tolist():
            parts = {}
            in_dim = self.bottom.output_dim
            if up >= 0:
                parts["link"] = nn.Sequential(nn.Linear(hidden, config.link_dim), nn.ReLU())
                in_dim += config.link_dim
            parts["hidden"] = MLP(in_dim, config.tower_hidden, dropout=config.dropout)
            parts["head"] = nn.Linear(hidden, 1)
            self.task_modules.append(nn.ModuleDict(parts))

    def forward(self, batch: TensorTable) -> ModelOutput:
        h = self.bottom(self.embedding(batch))
        states: list[torch.Tensor] = []
        logits = []
        for m, up in zip(self.task_modules, self.upstream.tolist()):
            inp = h if up < 0 else torch.cat([h, m["link"](states[up])], 1)
            states.append(m["hidden"](inp))
            logits.append(m["head"](states[-1]))
        return ModelOutput(logits=torch.cat(logits, 1))

    def task_parameters(self) -> list[list[nn.Parameter]]:
        """A parent's hidden layers feed its children's towers, so only its head is its own."""
        upstream_of_someone = set(self.upstream.tolist())
        return [
            list(m["head"].parameters()) if t in upstream_of_someone else list(m.parameters())
            for t, m in enumerate(self.task_modules)
        ]
