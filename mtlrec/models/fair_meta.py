"""Fair meta-learned recommendation: CLOVER (MeLU trained against sensitive-attribute adversaries).

The model implements the scenario protocol of :mod:`mtlrec.train.meta` with the user as the
scenario, so ``train.meta: true`` gives MeLU's per-user local update and global update, and
:func:`mtlrec.train.meta.adapt` its cold-start adaptation. :mod:`mtlrec.train.fairness` holds
the paper's evaluation measures.
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
    checked_option_names,
)
from mtlrec.models.registry import register
from mtlrec.nn.mlp import MLP


@dataclass
class CloverConfig(ModelConfig):
    rep_dim: int = 32  # width of the user and of the item representation
    decision_hidden: tuple[int, ...] = (64, 64)  # MeLU's decision layers
    user_feature: str = "user"  # the scenario of meta-training ("": none, one row = one user)
    sensitive_feature: str = ""  # required: the protected categorical user attribute
    user_fields: str = ""  # "": every feature not in item_fields, the user id excepted
    item_fields: str = ""  # "": no item representation
    fair_weight: float = 1.0  # lambda: 0 = no adversary (plain MeLU)
    group_weight: float = 0.5  # gamma: weight of the group-fairness adversary (0: off)
    disc_hidden: int = 32  # hidden width of each discriminator
    disc_labels: bool = True  # D1 also reads the labels (the authors' out=5); false: u only (out=0)


def _linear(layer: nn.Linear, x: torch.Tensor, frozen: bool) -> torch.Tensor:
    """``layer(x)``, with the layer's weights detached when ``frozen`` (the recommender's
    confusion loss must not train the discriminator)."""
    if frozen:
        return F.linear(x, layer.weight.detach(), layer.bias.detach())
    return layer(x)


class _Discriminators(nn.Module):
    """D1 (individual / counterfactual) reads [u ; y]; D2 (group) reads [y_hat ; y] plus the
    item representation; each ends in one logit per sensitive group. ``frozen=True`` gives the
    same function with the weights detached."""

    def __init__(
        self, rep: int, item: int, tasks: int, hidden: int, groups: int, labels: bool
    ) -> None:
        super().__init__()
        self.labels = labels
        self.individual_in = nn.Linear(rep + (tasks if labels else 0), hidden)
        self.individual_out = nn.Linear(hidden, groups)
        self.group_in = nn.Linear(2 * tasks, hidden)
        self.group_item = nn.Linear(item, hidden) if item else None
        self.group_out = nn.Linear(hidden, groups)

    def individual(self, u: torch.Tensor, labels: torch.Tensor, frozen: bool = False):
        x = torch.cat([u, labels], 1) if self.labels else u
        return _linear(self.individual_out, F.relu(_linear(self.individual_in, x, frozen)), frozen)

    def group(
        self,
        pred: torch.Tensor,
        labels: torch.Tensor,
        item: torch.Tensor | None,
        frozen: bool = False,
    ) -> torch.Tensor:
        h = F.relu(_linear(self.group_in, torch.cat([pred, labels], 1), frozen))
        if self.group_item is not None and item is not None:
            h = h + F.relu(_linear(self.group_item, item, frozen))
        return _linear(self.group_out, h, frozen)


def per_user_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, users: torch.Tensor, uniform: bool = False
) -> torch.Tensor:
    """Mean over users of CE(mean of the user's row logits, the user's group): the authors'
    discriminator averages its logits over a user's items and predicts once per user. Rows with
    ``target`` < 0 (unknown group) are left out; a row whose user key is shared by rows of
    another group (the out-of-vocabulary user bucket) is scored against its own target.
    ``uniform``: the cross-entropy to the uniform distribution over the groups instead (the
    recommender's confusion loss), ``target`` only selecting the rows."""
    keep = target >= 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    logits, target, users = logits[keep], target[keep], users[keep]
    ids, inverse = torch.unique(users, return_inverse=True)
    sums = logits.new_zeros(len(ids), logits.shape[1]).index_add(0, inverse, logits)
    counts = torch.bincount(inverse, minlength=len(ids)).to(logits.dtype)
    mean = sums / counts.unsqueeze(1)
    if uniform:
        per_row = -F.log_softmax(mean[inverse], 1).mean(1)
    else:
        per_row = F.cross_entropy(mean[inverse], target, reduction="none")
    return (per_row / counts[inverse]).sum() / len(ids)


@register("clover")
class Clover(MTLModel):
    """CLOVER: a MeLU recommender trained to hide a sensitive user attribute from adversaries.

    Papers. Lee, Im, Jang, Cho and Chung, "MeLU: Meta-Learned User Preference Estimator for
    Cold-Start Recommendation", KDD 2019 (the recommender); Wei and He, "Comprehensive Fair
    Meta-learned Recommender System", KDD 2022 (arXiv:2206.04789; authors' code
    github.com/weitianxin/CLOVER, ``ML100K/MeLU.py``, ``ML100K/maml.py``, read for the forms and
    defaults below).

    Recommender (MeLU, with CLOVER's user/item layers). Field embeddings of the user's
    features (``user_fields``: age, gender, occupation, region on MovieLens) are concatenated
    with the user's numeric features into x_u, the item's (``item_fields``) into x_i;
    u = ReLU(W_u x_u + b_u) and v = ReLU(W_i x_i + b_i) (``rep_dim`` wide) are the user and item
    representations; the decision layers, an MLP (``decision_hidden``, ReLU) over [u ; v] and
    one linear output per task, give y_hat (a logit for a binary task, the value for a
    regression task). ``extras["user_rep"]`` is u (what the post-hoc attacker of
    :func:`mtlrec.train.fairness.attacker_auc` reads). As in MeLU and the authors' code the
    sensitive attribute is an ordinary user feature of x_u (their ``remove_gender`` ablation
    drops it: leave it out of ``user_fields`` for that); keeping it is what makes the
    counterfactual measure non-trivial.

    Fairness (multi-task adversarial learning). With s the user's group (the value of
    ``sensitive_feature``, K >= 2 groups) and y the row's labels, two discriminators predict s
    (logits averaged over a user's rows in the batch, one cross-entropy per user, averaged over
    users):
    * L1 = CE(D1([u ; y]), s): individual fairness (an attacker must not read s from u) and,
      with the labels as the "external information", counterfactual fairness (the authors'
      ``out=5``);
    * L2 = CE(D2([y_hat ; y], v), s), D2 = W_o (ReLU(W_a [y_hat ; y]) + ReLU(W_b v)): group
      fairness, predictions independent of s given the label (``out2=2`` with ``item_adv``;
      y_hat is the probability for a binary task).
    L_adv = L1 + gamma * L2. The authors' game is min_theta max_phi L_rec(theta) - lambda *
    L_adv(theta, phi): the discriminators phi descend L_adv, the recommender theta (embeddings,
    user/item layers, decision layers) ascends it. Here the recommender's side is the confusion
    form of that game (departure 1): it descends L_conf, the same two cross-entropies taken
    against the uniform distribution over the groups (D's output carries no information about
    s), through the discriminators with their weights frozen, while the discriminators descend
    L_adv on detached inputs. ``aux_loss`` = L_adv(detached) + lambda * L_conf(frozen D).
    ``fair_weight`` is lambda (default 1.0); ``group_weight`` gamma (0.5, the ratio adv2/adv =
    1/2 of the authors' command); ``fair_weight: 0`` skips the adversaries: plain MeLU, the
    baseline.

    Meta-learning (MeLU). ``user_feature`` (default ``user``) is the scenario: with
    ``train.meta: true`` each user of a batch is a task whose rows split into support and query;
    the local update adapts ``meta_parameter_names()`` = the user and item layers, the decision
    layers, the output heads and the discriminators (the authors' ``local_max_part`` and
    ``local_part``), the embedding table is global only; the global update takes the query loss
    at the adapted weights. The user id itself is not an input unless listed in ``user_fields``
    (MeLU reads attributes only; a cold-start user's id is out of vocabulary anyway).

    Departures. (1) The recommender minimises the confusion loss instead of maximising D's
    cross-entropy, and both sides step together in one backward (the authors alternate
    separate recommender and discriminator updates and clip gradients to [-10, 10]). Measured
    on MovieLens-100K (6 epochs, plain training, gender): maximising D's cross-entropy by
    gradient reversal in one step raised a fresh attacker's AUC on the user representation from
    0.89 to 1.0 (the representation flips sides under D rather than losing gender, a known
    failure of simultaneous min-max); the confusion form lowered it to 0.55-0.59 at lambda 0.3-3
    with the rating MSE within 0.01.
    (2) Meta-training is :mod:`mtlrec.train.meta`'s first-order MAML over the users of a batch
    (the authors use second-order gradients through 5 inner steps), and its inner step includes
    the adversarial term (the paper's local max/min update; the README's commands switch the
    recommender's part off with ``--disable_inner_max``). (3) Several tasks: one linear output
    per task on the shared decision layers (the paper: a single rating output, MSE or 5-class
    cross-entropy), and the discriminators read every task's label and prediction. (4) Rating
    labels enter D1/D2 as raw values (the authors' MSE variant), not one-hot. (5) On MovieLens
    the item side may include the movie id (the preset lists it); MeLU embeds item attributes
    only. (6) Scoring without adaptation (validation, test) uses the global weights; the
    cold-start protocol is :func:`mtlrec.train.fairness.cold_start_predictions`.

    Ownership: each task owns its output layer; everything else (discriminators included) is
    shared.
    """

    Config = CloverConfig

    def __init__(self, schema, layout, config: CloverConfig) -> None:
        super().__init__(schema, layout, config)
        if config.fair_weight < 0 or config.group_weight < 0:
            raise ConfigError(
                f"model.fair_weight and model.group_weight must be >= 0 (got "
                f"{config.fair_weight}, {config.group_weight})"
            )
        if config.rep_dim < 1 or config.disc_hidden < 1:
            raise ConfigError("model.rep_dim and model.disc_hidden must be >= 1")
        self.sensitive: CategoricalColumn = categorical_column(
            schema, layout, config.sensitive_feature, "model.sensitive_feature"
        )
        if self.sensitive.num_groups < 2:
            raise ConfigError(
                f"model.sensitive_feature: {config.sensitive_feature!r} has "
                f"{self.sensitive.num_groups} value(s) in training; an adversary needs two or more"
            )
        self.user: CategoricalColumn | None = None
        if config.user_feature:
            self.user = categorical_column(
                schema, layout, config.user_feature, "model.user_feature"
            )
        self.num_scenarios = self.user.size if self.user is not None else 0

        user_idx, user_num, item_idx, item_num = self._towers(schema, config)
        for name, idx in (
            ("user_idx", user_idx),
            ("user_num", user_num),
            ("item_idx", item_idx),
            ("item_num", item_num),
        ):
            self.register_buffer(name, torch.tensor(idx, dtype=torch.long), persistent=False)
        d, rep = config.embed_dim, config.rep_dim
        self.embedding = self.make_embedding()
        self.user_layer = nn.Linear(len(user_idx) * d + len(user_num), rep)
        self.has_item = bool(item_idx or item_num)
        self.item_layer = (
            nn.Linear(len(item_idx) * d + len(item_num), rep) if self.has_item else None
        )
        width = rep * (2 if self.has_item else 1)
        self.decision = MLP(width, config.decision_hidden, dropout=config.dropout)
        for _ in schema.tasks:
            self.task_modules.append(nn.Linear(self.decision.output_dim, 1))
        self.discriminators = _Discriminators(
            rep, rep if self.has_item else 0, self.num_tasks, config.disc_hidden,
            self.sensitive.num_groups, config.disc_labels,
        )  # fmt: skip

    def _towers(self, schema, config: CloverConfig):
        """(embedded-field indices, numeric-column indices) of the user and item towers."""
        known = [f.name for f in schema.features]
        item = checked_option_names(config.item_fields, "model.item_fields", known, "in the schema")
        explicit = checked_option_names(
            config.user_fields, "model.user_fields", known, "in the schema"
        )
        both = sorted(set(item) & set(explicit))
        if both:
            raise ConfigError(
                f"model.user_fields and model.item_fields both list {', '.join(map(repr, both))}"
            )
        user = explicit or [n for n in known if n not in item and n != config.user_feature]
        if not user:
            raise ConfigError("model.user_fields: the user representation reads no feature")
        embedded = [f.name for f in schema.embedded_fields()]
        numeric = [f.name for f in schema.features_of("numeric")]

        def pick(names: list[str]) -> tuple[list[int], list[int]]:
            chosen = set(names)
            return (
                [j for j, n in enumerate(embedded) if n in chosen],
                [j for j, n in enumerate(numeric) if n in chosen],
            )

        return (*pick(user), *pick(item))

    # --- scenarios (the hooks mtlrec.train.meta uses) ----------------------------------------------
    def scenario_ids(self, batch: TensorTable) -> torch.Tensor | None:
        """[B] user of every row (local index of ``user_feature``, 0 = out of vocabulary)."""
        return None if self.user is None else self.user.local(batch)

    def meta_parameter_names(self) -> list[str]:
        """The local update's parameters: everything but the embedding table."""
        return [
            n
            for n, p in self.named_parameters()
            if p.requires_grad and not n.startswith("embedding.")
        ]

    # --- forward -----------------------------------------------------------------------------------
    def representations(self, batch: TensorTable) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(u [B, rep], v [B, rep] or None): the user and item representations."""
        fields = self.embedding.fields(batch)  # [B, F, d]

        def tower(idx: torch.Tensor, num: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
            parts = [fields.index_select(1, idx).flatten(1)]
            if len(num):
                parts.append(batch.num.index_select(1, num))
            return F.relu(layer(torch.cat(parts, 1)))

        u = tower(self.user_idx, self.user_num, self.user_layer)
        v = tower(self.item_idx, self.item_num, self.item_layer) if self.has_item else None
        return u, v

    def forward(self, batch: TensorTable) -> ModelOutput:
        u, v = self.representations(batch)
        h = self.decision(u if v is None else torch.cat([u, v], 1))
        logits = torch.cat([head(h) for head in self.task_modules], 1)
        extras = {"user_rep": u}
        aux = None
        lam = self.config.fair_weight
        if self.training and lam > 0:
            aux = self.adversary_loss(batch, u, v, logits)
        return ModelOutput(logits=logits, aux_loss=aux, extras=extras)

    def adversary_loss(
        self, batch: TensorTable, u: torch.Tensor, v: torch.Tensor | None, logits: torch.Tensor
    ) -> torch.Tensor:
        """L_D + lambda * L_conf: the discriminators learn L_adv = L1 + gamma * L2 on detached
        inputs; the recommender learns to make the (frozen) discriminators' output uniform."""
        lam, gamma = self.config.fair_weight, self.config.group_weight
        target = self.sensitive.groups(batch)
        users = self.scenario_ids(batch)
        if users is None:
            users = torch.arange(len(target), device=target.device)
        labels, disc = batch.labels, self.discriminators
        learn = per_user_cross_entropy(disc.individual(u.detach(), labels), target, users)
        confuse = per_user_cross_entropy(
            disc.individual(u, labels, frozen=True), target, users, uniform=True
        )
        if gamma > 0:
            pred = torch.where(self.is_binary, torch.sigmoid(logits), logits)
            item = None if v is None else v.detach()
            group = disc.group(pred.detach(), labels, item)
            learn = learn + gamma * per_user_cross_entropy(group, target, users)
            group = disc.group(pred, labels, v, frozen=True)
            confuse = confuse + gamma * per_user_cross_entropy(group, target, users, uniform=True)
        return learn + lam * confuse
