"""User-side fairness measures of a trained recommender, as CLOVER evaluates them.

Wei and He, "Comprehensive Fair Meta-learned Recommender System", KDD 2022 (arXiv:2206.04789;
authors' code github.com/weitianxin/CLOVER, ``ML100K/maml.py``) report three measures besides
accuracy, one per kind of fairness, for a sensitive user attribute s (gender):

* individual fairness, **attacker AUC**: a fresh classifier (Linear-ReLU-Linear, Adam) is trained
  on the frozen user representations of the training users to predict s and scored (ROC AUC) on
  held-out users; 0.5 means the representation reveals nothing about s
  (:func:`attacker_auc`);
* counterfactual fairness, **CF**: the mean absolute change of a prediction when s is replaced
  by another value, all else equal, averaged per user and then over users
  (:func:`counterfactual_gap`);
* group fairness, **GF**: the absolute difference between the groups' mean per-user error
  (MAE of each user's predictions), i.e. whether one group is served worse
  (:func:`group_gap`; with more than two groups, the largest minus the smallest group mean).

The authors measure CF and GF on cold-start users after the per-user local update (support set
first, query set scored); :func:`cold_start_predictions` does that with
:func:`mtlrec.train.meta.adapt`. Everything here is a pure function of a model and encoded
tables: no CLI, no files. Columns are named by :class:`CategoricalColumn` (a categorical
feature's column in ``batch.cat``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.models.base import CategoricalColumn, categorical_column

__all__ = ["CategoricalColumn", "categorical_column"]  # the measures name columns with these


# --- per-user aggregation ------------------------------------------------------------------------
def per_user_mean(values: torch.Tensor, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(user ids [U] sorted, mean of ``values`` [N, ...] over each user's rows [U, ...])."""
    ids, inverse = torch.unique(users, return_inverse=True)
    flat = values.reshape(values.shape[0], -1).double()
    sums = flat.new_zeros(len(ids), flat.shape[1]).index_add_(0, inverse, flat)
    counts = torch.bincount(inverse, minlength=len(ids)).double().unsqueeze(1)
    return ids, (sums / counts).reshape(len(ids), *values.shape[1:]).to(values.dtype)


def group_gap(
    pred: torch.Tensor, labels: torch.Tensor, users: torch.Tensor, groups: torch.Tensor
) -> np.ndarray:
    """GF per task [T]: each user's mean absolute error, averaged per group; the largest group
    mean minus the smallest (|male - female| for two groups). Rows of unknown group (-1) are
    left out; NaN for a task when fewer than two groups have users."""
    keep = groups >= 0
    err = (pred[keep] - labels[keep]).abs()
    ids, user_err = per_user_mean(err, users[keep])
    _, user_group = per_user_mean(groups[keep].double().unsqueeze(1), users[keep])
    user_group = user_group.squeeze(1).round().long()
    means = [user_err[user_group == g].mean(0) for g in user_group.unique().tolist()]
    if len(means) < 2:
        return np.full(pred.shape[1], np.nan)
    stacked = torch.stack(means)
    return (stacked.max(0).values - stacked.min(0).values).numpy()


@torch.no_grad()
def counterfactual_gap(
    model: nn.Module,
    table: TensorTable,
    sensitive: CategoricalColumn,
    users: torch.Tensor | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """CF per task [T]: |f(x) - f(x with s := s')| averaged over every other value s' of the
    sensitive attribute, per row; then per user (``users`` [N], optional) and over users.
    Predictions are ``model.predict``'s (probabilities for binary tasks, values for regression).
    Rows whose own value is unknown are left out."""
    model.eval()
    gaps = []
    for batch in table.batches(batch_size):
        own = sensitive.groups(batch)
        base = model.predict(model(batch))[0]
        total = torch.zeros_like(base)
        for g in range(sensitive.num_groups):
            other = model.predict(model(sensitive.with_group(batch, g)))[0]
            total += torch.where((own != g).unsqueeze(1), (other - base).abs(), 0.0)
        gaps.append(total / max(sensitive.num_groups - 1, 1))
    gap = torch.cat(gaps)
    known = torch.cat([sensitive.groups(b) for b in table.batches(batch_size)]) >= 0
    gap = gap[known]
    if users is not None:
        gap = per_user_mean(gap, users[known])[1]
    return gap.double().mean(0).numpy()


# --- the attacker ---------------------------------------------------------------------------------
def attacker_auc(
    train_x: torch.Tensor,
    train_group: torch.Tensor,
    test_x: torch.Tensor,
    test_group: torch.Tensor,
    hidden: int = 32,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> float:
    """AUC of a post-hoc attacker: a fresh Linear-ReLU-Linear classifier trained (Adam,
    cross-entropy, ``epochs`` passes of ``batch_size``) on frozen representations ``train_x``
    [U, d] to predict ``train_group`` [U], scored on ``test_x`` / ``test_group``. Two groups: the
    ROC AUC of group 1's probability; more: the macro one-vs-rest AUC. Unknown groups (-1) are
    dropped. NaN when the test users hold a single group."""
    from sklearn.metrics import roc_auc_score

    keep, keep_test = train_group >= 0, test_group >= 0
    x, y = train_x[keep].float().detach(), train_group[keep].long()
    tx, ty = test_x[keep_test].float().detach(), test_group[keep_test].long()
    classes = int(max(int(y.max()), int(ty.max())) + 1) if len(y) and len(ty) else 0
    if classes < 2 or len(ty.unique()) < 2:
        return float("nan")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, classes))
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(clf(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        prob = torch.softmax(clf(tx), 1).numpy()
    labels = ty.numpy()
    if classes == 2:
        return float(roc_auc_score(labels, prob[:, 1]))
    present = np.unique(labels)
    scores = prob[:, present] / prob[:, present].sum(1, keepdims=True)
    return float(roc_auc_score(labels, scores, multi_class="ovr", labels=present))


@torch.no_grad()
def user_representations(
    model: nn.Module,
    table: TensorTable,
    users: torch.Tensor,
    sensitive: CategoricalColumn,
    batch_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(user keys [U], representation [U, d], group [U]): the model's ``extras["user_rep"]``
    averaged over each user's rows (``users`` [N]: a key per row; constant per user when the
    model reads user features only), and the user's sensitive group."""
    model.eval()
    reps, groups = [], []
    for batch in table.batches(batch_size):
        reps.append(model(batch).extras["user_rep"])
        groups.append(sensitive.groups(batch))
    uid, rep = per_user_mean(torch.cat(reps), users)
    _, grp = per_user_mean(torch.cat(groups).double().unsqueeze(1), users)
    return uid, rep, grp.squeeze(1).round().long()


# --- cold-start evaluation ------------------------------------------------------------------------
@dataclass
class ColdStart:
    """What :func:`cold_start_predictions` returns, over the query rows of the adapted users."""

    rows: torch.Tensor  # [Q] row index into the table
    pred: torch.Tensor  # [Q, T] predictions of the user's adapted model
    cf_gap: torch.Tensor  # [Q, T] counterfactual gap of the adapted model (see counterfactual_gap)
    users: torch.Tensor  # [Q] user key of each row
    groups: torch.Tensor  # [Q] sensitive group of each row
    user_rep: torch.Tensor  # [U, d] representation of each adapted user (after adaptation)
    user_group: torch.Tensor  # [U]


def cold_start_predictions(
    model: nn.Module,
    table: TensorTable,
    users: torch.Tensor,
    sensitive: CategoricalColumn,
    support: int,
    steps: int,
    lr: float,
    min_query: int = 1,
) -> ColdStart:
    """MeLU's cold-start protocol: for every user (key in ``users`` [N]) with more than
    ``support`` + ``min_query`` - 1 rows, adapt a copy of ``model`` on the user's first
    ``support`` rows (:func:`mtlrec.train.meta.adapt`: ``steps`` SGD steps of size ``lr`` on the
    parameters the model adapts per scenario) and score the remaining rows with it, along with
    the counterfactual gap of that adapted model. Rows keep table order, so a chronological
    table gives each user their earliest ratings as support. One adaptation per user."""
    from mtlrec.train.meta import adapt

    ids, inverse, counts = torch.unique(users, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    rows, preds, gaps, keys, grps, reps, rep_groups = [], [], [], [], [], [], []
    for u, (start, count) in enumerate(zip(starts, counts.tolist(), strict=True)):
        if count < support + min_query:
            continue
        mine = order[start : start + count]
        tuned = adapt(model, table.take(mine[:support]), steps, lr)
        query = table.take(mine[support:])
        with torch.no_grad():
            out = tuned(query)
            pred = tuned.predict(out)[0]
        gap = torch.as_tensor(counterfactual_gap(tuned, query, sensitive, batch_size=len(query)))
        own = sensitive.groups(query)
        rows.append(mine[support:])
        preds.append(pred)
        gaps.append(gap.to(pred.dtype).expand_as(pred))
        keys.append(torch.full((len(query),), int(ids[u])))
        grps.append(own)
        reps.append(out.extras["user_rep"].mean(0))
        rep_groups.append(own[0])
    if not rows:
        raise ValueError(f"cold_start_predictions: no user has more than {support} rows")
    return ColdStart(
        rows=torch.cat(rows),
        pred=torch.cat(preds),
        cf_gap=torch.cat(gaps),
        users=torch.cat(keys),
        groups=torch.cat(grps),
        user_rep=torch.stack(reps),
        user_group=torch.stack(rep_groups),
    )
