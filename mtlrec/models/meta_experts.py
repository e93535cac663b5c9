"""Meta-learned expert models: MetaHeac (hybrid experts and critics, trained over many tasks).

MetaHeac is built to be meta-trained: with a scenario feature every value of it is a small task
(a campaign, in the paper), and :mod:`mtlrec.train.meta` runs the episodes (``train.meta``) and
fine-tunes the trained model on a new scenario (:func:`mtlrec.train.meta.adapt`). Without one it
is an ordinary multi-task model whose tasks are the schema's tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models.base import (
    CategoricalColumn,
    ModelConfig,
    ModelOutput,
    MTLModel,
    categorical_column,
)
from mtlrec.models.registry import register
from mtlrec.nn.experts import Experts
from mtlrec.nn.mlp import MLP

INNER_PARAMS = ("all", "head")


@dataclass
class MetaHeacConfig(ModelConfig):
    num_experts: int = 8
    expert_hidden: tuple[int, ...] = (16,)
    num_critics: int = 4  # shared critics; every task adds one critic of its own
    critic_hidden: tuple[int, ...] = (8,)
    gate_hidden: int = 16
    scenario_feature: str = ""  # empty: no scenarios, the tasks are the schema's tasks
    max_scenarios: int = 64
    inner_params: str = "all"  # what meta-training's inner step adapts: "all" or "head"


class _TaskHead(nn.Module):
    """What one task owns: its task embedding e_t and its task-specific critic."""

    def __init__(self, dim: int, hidden_in: int, config: MetaHeacConfig) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(dim).normal_(0.0, 0.1))
        self.critic = MLP(hidden_in, config.critic_hidden, 1, dropout=config.dropout)


@register("metaheac")
class MetaHeac(MTLModel):
    """MetaHeac: shared experts and critics mixed by gates read from task (and scenario) embeddings.

    Zhu, Liu, Xie, Zhuang, Hao, Ge, Zhang, Lin and Cao, "Learning to Expand Audience via Meta
    Hybrid Experts and Critics for Recommendation and Advertising", KDD 2021 (arXiv:2105.14688;
    authors' code github.com/easezyc/MetaHeac, read here through its PaddleRec port
    github.com/simuler/MetaHeac). A task is a campaign; a general model is meta-trained over many
    existing tasks and fine-tuned on the small seed set of a new one.

    Task representation, per row x and task t (the port concatenates the mean of the user's
    field embeddings with the campaign's embedding):
    r_t(x) = [mean_f e_f(x) ; e_t] and, with a scenario feature, [mean_f e_f(x) ; e_t ; e_s(x)].
    Hybrid experts: E shared experts f_k over the full input; a gate from the task representation,
    a_t = softmax(W_2 ReLU(W_1 r_t + b_1) + b_2), mixes them into the task's user representation
    h_t = sum_k a_{t,k} f_k(x). Hybrid critics: C shared critics c_j and a task-specific critic
    c_t, each an MLP to one logit on h_t; a second gate b_t = softmax(V_2 ReLU(V_1 r_t)) over the
    C + 1 critics gives p_t = sum_j b_{t,j} sigmoid(c_j(h_t)) (binary tasks; the logit passed on
    is log p_t - log(1 - p_t), computed with log-sum-exp), y_t = sum_j b_{t,j} c_j(h_t) for
    regression. ``extras["gates"]`` [B, T, E] holds a_t, ``extras["critic_gates"]`` [B, T, C + 1]
    holds b_t (shared critics first, the task's own last).

    Two uses. (1) Ordinary multi-task model (no ``scenario_feature``): each schema task is a
    task with its own embedding e_t, gate values and critic, trained by the usual loop (the
    Census-Income zoo). (2) Multi-scenario: ``scenario_feature`` names a categorical (or
    bucketised numeric) feature; every value of its vocabulary, and the out-of-vocabulary bucket,
    is a scenario with its own embedding e_s (initialised at zero, so a scenario never trained
    starts from the neutral point); ``max_scenarios`` (64) guards against an id-like feature.
    With ``train.meta: true`` the trainer meta-trains over scenarios (:mod:`mtlrec.train.meta`:
    per episode, support/query split per scenario, inner SGD step on the parameters named by
    ``inner_params``, outer step on the query loss); :func:`mtlrec.train.meta.adapt` fine-tunes
    on the rows of a new scenario. ``inner_params: all`` adapts every parameter (as the port
    does); ``head`` adapts the scenario embeddings, task heads, gates and shared critics and
    leaves the input embeddings and experts to the outer loop (cheaper with large vocabularies).

    Ownership: task t owns e_t and its critic c_t; the input embeddings, experts, both gate
    networks, the shared critics and the scenario embeddings are shared.

    Departures: the paper's text was not available to us; the forms above follow its abstract
    and the port's code, where both gates read the task representation and the critics are
    mixed in probability space. The task-specific critic beside the shared ones and the MLP
    critics (``critic_hidden``; the port's critics are linear) are ours. In the paper a task's
    embedding comes from the campaign's features; here it is a learned embedding per task (and
    per scenario value). Meta-training is first-order MAML (see :mod:`mtlrec.train.meta`). The
    paper's data (Tencent look-alike) is not public; tasks here are the schema's tasks and
    scenarios are the values of one feature.
    """

    Config = MetaHeacConfig

    def __init__(self, schema, layout, config: MetaHeacConfig) -> None:
        super().__init__(schema, layout, config)
        if min(config.num_experts, config.gate_hidden) < 1 or config.num_critics < 0:
            raise ConfigError(
                "model.num_experts and model.gate_hidden must be >= 1, model.num_critics >= 0"
            )
        if config.inner_params not in INNER_PARAMS:
            raise ConfigError(
                f"model.inner_params: {config.inner_params!r} is not one of "
                f"{', '.join(INNER_PARAMS)}"
            )
        d = config.embed_dim
        self.embedding = self.make_embedding()
        self.experts = Experts(
            config.num_experts, self.embedding.output_dim, config.expert_hidden, config.dropout
        )
        self.scenario: CategoricalColumn | None = None
        self.num_scenarios = 0
        parts = 2
        if config.scenario_feature:
            self.scenario = categorical_column(
                schema, layout, config.scenario_feature, "model.scenario_feature", buckets=True
            )
            size = self.scenario.size
            if size > config.max_scenarios:
                raise ConfigError(
                    f"model.scenario_feature: {config.scenario_feature!r} has {size} values (with "
                    f"the out-of-vocabulary bucket), more than model.max_scenarios="
                    f"{config.max_scenarios}; choose a coarser feature or raise max_scenarios"
                )
            self.num_scenarios = size
            self.scenario_embedding = nn.Embedding(size, d)
            nn.init.zeros_(self.scenario_embedding.weight)
            parts = 3
        rep = parts * d
        hidden = self.experts.output_dim
        self.expert_gate = MLP(rep, (config.gate_hidden,), config.num_experts)
        self.critic_gate = MLP(rep, (config.gate_hidden,), config.num_critics + 1)
        self.critics = nn.ModuleList(
            MLP(hidden, config.critic_hidden, 1, dropout=config.dropout)
            for _ in range(config.num_critics)
        )
        for _ in schema.tasks:
            self.task_modules.append(_TaskHead(d, hidden, config))

    # --- scenarios (the hooks mtlrec.train.meta uses) ----------------------------------------------
    def scenario_ids(self, batch: TensorTable) -> torch.Tensor | None:
        """[B] scenario of every row (local index of the scenario feature, 0 = out of
        vocabulary), or None without a scenario feature."""
        return None if self.scenario is None else self.scenario.local(batch)

    def meta_parameter_names(self) -> list[str]:
        """Names of the parameters the inner (per-scenario) step adapts (``inner_params``)."""
        names = [n for n, p in self.named_parameters() if p.requires_grad]
        if self.config.inner_params == "all":
            return names
        return [n for n in names if not n.startswith(("embedding.", "experts."))]

    # --- forward -----------------------------------------------------------------------------------
    def forward(self, batch: TensorTable) -> ModelOutput:
        fields = self.embedding.fields(batch)  # [B, F, d]
        rows, tasks = fields.shape[0], self.num_tasks
        x = fields.flatten(1)
        if self.layout.num_numeric:
            x = torch.cat([x, batch.num], 1)
        user = fields.sum(1) / max(fields.shape[1], 1)  # mean field embedding [B, d]
        task_emb = torch.stack([head.embedding for head in self.task_modules])  # [T, d]
        parts = [
            user.unsqueeze(1).expand(rows, tasks, -1),
            task_emb.unsqueeze(0).expand(rows, -1, -1),
        ]
        extras: dict[str, torch.Tensor] = {}
        scenario = self.scenario_ids(batch)
        if scenario is not None:
            extras["scenario"] = scenario
            parts.append(self.scenario_embedding(scenario).unsqueeze(1).expand(rows, tasks, -1))
        rep = torch.cat(parts, -1)  # [B, T, R]

        gates = torch.softmax(self.expert_gate(rep), -1)  # [B, T, E]
        h = torch.bmm(gates, self.experts(x))  # [B, T, D]: h_t = sum_k a_{t,k} f_k(x)
        own = torch.cat([head.critic(h[:, t]) for t, head in enumerate(self.task_modules)], 1)
        critic_logits = [c(h) for c in self.critics] + [own.unsqueeze(-1)]
        z = torch.cat(critic_logits, -1)  # [B, T, C + 1]
        log_b = torch.log_softmax(self.critic_gate(rep), -1)  # [B, T, C + 1]
        # p = sum_j b_j sigmoid(z_j); logit(p) = log p - log(1 - p), both by log-sum-exp
        binary = torch.logsumexp(log_b + F.logsigmoid(z), -1) - torch.logsumexp(
            log_b + F.logsigmoid(-z), -1
        )
        regression = (log_b.exp() * z).sum(-1)
        logits = torch.where(self.is_binary, binary, regression)
        extras["gates"] = gates
        extras["critic_gates"] = log_b.exp()
        return ModelOutput(logits=logits, extras=extras)
