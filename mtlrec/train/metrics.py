"""Per-task metrics, each on the rows where the task is observed.

Binary tasks: AUC and log loss on observed rows (a conversion task after click: clicked rows, with
the conditional prediction); tasks with an upstream step also get ``joint_auc``/``joint_logloss``
over all rows with the entire-space prediction (CTCVR). Regression tasks: MSE.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mtlrec.schema import Schema

LOGLOSS_EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present (undefined, not 0.5)."""
    if labels.size == 0 or labels.min() == labels.max():
        return math.nan
    from sklearn.metrics import roc_auc_score  # here: importing scikit-learn takes ~0.7 s

    return float(roc_auc_score(labels, scores))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    if labels.size == 0:
        return math.nan
    p = np.clip(probs.astype(np.float64), LOGLOSS_EPS, 1 - LOGLOSS_EPS)
    return float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())


def task_metrics(
    schema: Schema, labels: torch.Tensor, cond: torch.Tensor, joint: torch.Tensor
) -> dict[str, dict[str, float]]:
    """``labels``, ``cond``, ``joint``: [N, T] for one split."""
    y = labels.detach().cpu().double().numpy()
    c = cond.detach().cpu().double().numpy()
    j = joint.detach().cpu().double().numpy()
    upstream = schema.upstream_index()
    out: dict[str, dict[str, float]] = {}
    for t, task in enumerate(schema.tasks):
        observed = _observed(y, upstream[t])
        yt, ct = y[observed, t], c[observed, t]
        if task.type == "binary":
            m = {"auc": auc(yt, ct), "logloss": logloss(yt, ct)}
            if upstream[t] >= 0:
                m["joint_auc"] = auc(y[:, t], j[:, t])
                m["joint_logloss"] = logloss(y[:, t], j[:, t])
        else:
            m = {"mse": float(((ct - yt) ** 2).mean()) if yt.size else math.nan}
        m["rows"] = int(observed.sum())
        out[task.name] = m
    return out


def _observed(y: np.ndarray, upstream: int) -> np.ndarray:
    """Rows where a task's label is observed: all, or those whose upstream task is positive."""
    return y[:, upstream] == 1 if upstream >= 0 else np.ones(len(y), dtype=bool)


def undefined_auc_warnings(schema: Schema, labels: torch.Tensor, where: str) -> list[str]:
    """One line per binary task whose AUC cannot be computed on this split (one class among its
    observed rows): early stopping then silently leaves that task out, which the user should
    know before a long run, not from a column of nulls after it."""
    y = labels.detach().cpu().numpy()
    upstream = schema.upstream_index()
    lines = []
    for t, task in enumerate(schema.tasks):
        if task.type != "binary":
            continue
        yt = y[_observed(y, upstream[t]), t]
        if yt.size and yt.min() != yt.max():
            continue
        seen = (
            f"all {int(yt[0])} on its {yt.size:,} observed rows" if yt.size else "no observed rows"
        )
        lines.append(
            f"warning: {where}: task {task.name!r} has {seen}; its AUC is undefined there and "
            "early stopping on AUC leaves it out"
        )
    return lines


def monitor_value(metrics: dict[str, dict[str, float]], monitor: str) -> float:
    """One number to maximise for early stopping: mean AUC over binary tasks (``auc``) or minus
    the mean of log loss / MSE (``loss``). Undefined (NaN) task metrics are skipped."""
    values = []
    for m in metrics.values():
        if monitor == "auc":
            v = m.get("auc")
        else:
            v = -m.get("logloss", m.get("mse", math.nan))
        if v is not None and not math.isnan(v):
            values.append(v)
    if not values and monitor == "auc":  # regression-only schema
        return monitor_value(metrics, "loss")
    return float(np.mean(values)) if values else -math.inf
