"""Gradient-conflict and gate diagnostics, recorded during training (``train.diagnose``).

Why: a multi-task model underperforms its single-task baseline (negative transfer) when its tasks
pull the shared parameters in opposite directions, or when an expert model's gates collapse onto
one expert. Both are visible during training, not in the final metrics, so the trainer can hand
each step's losses to a :class:`GradientMonitor`.

Per recorded step (every ``train.diagnose_every`` steps) the monitor takes each task's gradient
on the shared parameters (:func:`mtlrec.balance.grads.task_gradients`, one extra
``autograd.grad`` per task with the graph retained, so ``.grad`` is untouched and the balancer
still back-propagates through the same graph afterwards) and keeps:

* each task's gradient norm,
* the cosine between every pair of task gradients (``None`` where a gradient is zero).

Per epoch it aggregates the mean norms, the mean cosine and the fraction of recorded steps in
conflict (cosine < 0) per pair, and, for expert models (``extras["gates"]``), the gate weights
averaged over the validation rows ([T, E]), each task's effective number of experts and a
collapse flag when one expert takes more than :data:`COLLAPSE_SHARE` of a task's gate mass.

The trainer only calls the monitor when one is set; with ``train.diagnose`` off nothing here runs.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlrec.balance.grads import task_gradients, trainable
from mtlrec.config import TrainConfig
from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models.base import MTLModel
from mtlrec.train.checkpoint import save_json

DIAGNOSTICS_FILE = "diagnostics.json"
COLLAPSE_SHARE = 0.9  # a gate giving more than this to one expert has collapsed onto it
MAX_POINTS = 2000  # per-step series longer than this are averaged into this many buckets


def pair_key(a: str, b: str) -> str:
    """The key of a task pair in ``diagnostics.json`` (``"click/purchase"``)."""
    return f"{a}/{b}"


class GradientMonitor:
    """Records per-task gradient norms and pairwise cosines on the shared parameters.

    ``on_step`` is called by the trainer after the step's losses are computed and before the
    balancer's backward; ``on_epoch`` after validation. ``to_dict``/``save`` produce the
    ``diagnostics.json`` layout that ``mtlrec report`` reads.
    """

    def __init__(
        self, task_names: Sequence[str], every: int = 1, max_points: int = MAX_POINTS
    ) -> None:
        if every < 1:
            raise ConfigError("train.diagnose_every must be >= 1")
        self.tasks = list(task_names)
        self.pairs = list(itertools.combinations(range(len(self.tasks)), 2))
        self.every = every
        self.max_points = max(1, max_points)
        self.calls = 0  # training steps seen, recorded or not
        self.shared_dim: int | None = None  # None until the first step looked at the model
        self.step: list[int] = []
        self.epoch: list[int] = []
        self.norms: list[list[float]] = []
        self.cosines: list[list[float]] = []  # NaN where undefined (a zero gradient)
        self.epochs: list[dict[str, Any]] = []
        self._epoch_start = 0
        self._has_gates: bool | None = None

    @classmethod
    def from_config(cls, model: MTLModel, config: TrainConfig) -> GradientMonitor | None:
        """A monitor for ``model`` when ``train.diagnose`` is on, else ``None`` (zero cost)."""
        if not config.diagnose:
            return None
        return cls(model.schema.task_names, every=config.diagnose_every)

    # --- recording -------------------------------------------------------------------------------
    def on_step(self, model: MTLModel, losses: torch.Tensor) -> None:
        """Record this step's per-task gradients (every ``every``-th call); ``losses`` [T] must
        still be attached to the graph, which is kept for the balancer."""
        step = self.calls
        self.calls += 1
        if step % self.every:
            return
        if self.shared_dim is None:
            self.shared_dim = sum(p.numel() for p in trainable(model.shared_parameters()))
        if self.shared_dim == 0:  # nothing shared (single-task): no conflict to measure
            return
        gram = task_gradients(model, losses).gram()  # [T, T] float64
        norms = gram.diagonal().clamp_min(0).sqrt()
        denom = torch.outer(norms, norms)
        cos = torch.where(denom > 0, gram / denom, torch.full_like(gram, math.nan))
        cos = cos.clamp(-1.0, 1.0)  # float rounding can leave 1 + 1e-16
        self.step.append(step)
        self.epoch.append(len(self.epochs) + 1)
        self.norms.append(norms.tolist())
        self.cosines.append([float(cos[i, j]) for i, j in self.pairs])

    def on_epoch(
        self, epoch: int, model: MTLModel, valid: TensorTable, batch_size: int
    ) -> dict[str, Any]:
        """Aggregate the steps recorded since the last call, add gate statistics of an expert
        model on ``valid``; returns the epoch's summary (also kept in ``self.epochs``)."""
        recorded = len(self.step) - self._epoch_start
        norms = np.array(self.norms[self._epoch_start :], dtype=np.float64).reshape(
            recorded, len(self.tasks)
        )
        cos = np.array(self.cosines[self._epoch_start :], dtype=np.float64).reshape(
            recorded,
            len(self.pairs),  # a one-task schema has no pairs: [recorded, 0]
        )
        self._epoch_start = len(self.step)
        summary: dict[str, Any] = {
            "epoch": epoch,
            "steps_seen": self.calls,
            "steps_recorded": int(norms.shape[0]),
            "grad_norm": {t: _mean(norms[:, i]) for i, t in enumerate(self.tasks)},
            "cosine": {},
            "conflict_fraction": {},
        }
        for k, (i, j) in enumerate(self.pairs):
            key = pair_key(self.tasks[i], self.tasks[j])
            col = cos[:, k][~np.isnan(cos[:, k])]
            summary["cosine"][key] = _mean(col)
            summary["conflict_fraction"][key] = float((col < 0).mean()) if col.size else None
            summary.setdefault("cosine_defined", {})[key] = int(col.size)
        gates = self.gate_summary(model, valid, batch_size)
        if gates is not None:
            summary["gates"] = gates
        self.epochs.append(summary)
        return summary

    def gate_summary(
        self, model: MTLModel, table: TensorTable, batch_size: int
    ) -> dict[str, Any] | None:
        """Gate weights averaged over ``table``'s rows ([T, E]) with utilisation and collapse
        flags, or ``None`` for a model without gates. One extra no-grad pass over the rows."""
        if self._has_gates is False or len(table) == 0:
            return None
        was_training = model.training
        model.eval()
        total: torch.Tensor | None = None
        rows = 0
        with torch.no_grad():
            for batch in table.batches(batch_size):
                gates = model(batch).extras.get("gates")
                if gates is None:
                    break
                part = gates.double().sum(0)  # [T, E]
                total = part if total is None else total + part
                rows += gates.shape[0]
        model.train(was_training)
        self._has_gates = total is not None
        if total is None:
            return None
        # one expert, or a gate built to pick a single one (DSelect-k with k = 1): no collapse
        can_collapse = total.shape[1] > 1 and getattr(model, "experts_per_task", None) != 1
        labels = expert_labels(model, total.shape[1])
        return summarise_gates(total / rows, self.tasks, labels, can_collapse)

    # --- output ------------------------------------------------------------------------------------
    def warnings(self) -> list[str]:
        """One line per collapsed gate in the latest epoch (for the training log)."""
        if not self.epochs or "gates" not in self.epochs[-1]:
            return []
        g = self.epochs[-1]["gates"]
        return [
            f"warning: the gate of task {t!r} puts {g['max_share'][t]:.2f} of its mass on "
            f"expert {g['top_expert'][t]} (collapse)"
            for t in g["collapsed"]
        ]

    def to_dict(self) -> dict[str, Any]:
        """The ``diagnostics.json`` content; the per-step series is averaged into at most
        ``max_points`` consecutive buckets when longer (per-epoch summaries use every step)."""
        n = len(self.step)
        step = np.array(self.step, dtype=np.int64)
        epoch = np.array(self.epoch, dtype=np.int64)
        norms = np.array(self.norms, dtype=np.float64).reshape(n, len(self.tasks))
        cos = np.array(self.cosines, dtype=np.float64).reshape(n, len(self.pairs))
        downsampled = None
        if n > self.max_points:
            buckets = np.array_split(np.arange(n), self.max_points)
            last = np.array([b[-1] for b in buckets])
            step, epoch = step[last], epoch[last]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN bucket stays NaN
                norms = np.stack([np.nanmean(norms[b], 0) for b in buckets])
                cos = np.stack([np.nanmean(cos[b], 0) for b in buckets])
            downsampled = {
                "from_points": n,
                "to_points": len(buckets),
                "how": "mean over consecutive buckets; 'step' is each bucket's last step",
            }
        keys = [pair_key(self.tasks[i], self.tasks[j]) for i, j in self.pairs]
        out: dict[str, Any] = {
            "version": 1,
            "tasks": self.tasks,
            "pairs": [[self.tasks[i], self.tasks[j]] for i, j in self.pairs],
            "every": self.every,
            "steps_seen": self.calls,
            "shared_parameters": self.shared_dim,
            "collapse_share": COLLAPSE_SHARE,
            "series": {
                "step": step.tolist(),
                "epoch": epoch.tolist(),
                "grad_norm": {t: _nullable(norms[:, i]) for i, t in enumerate(self.tasks)},
                "cosine": {k: _nullable(cos[:, c]) for c, k in enumerate(keys)},
                "downsampled": downsampled,
            },
            "epochs": self.epochs,
        }
        if self.shared_dim == 0:
            out["note"] = "the model shares no parameters: there is no gradient conflict to measure"
        return out

    def save(self, path: str | Path) -> None:
        save_json(self.to_dict(), path)

    def state_dict(self) -> dict[str, Any]:
        """Everything recorded so far, raw (not downsampled), for the trainer's checkpoint: a run
        resumed mid-epoch continues the same step count, sampling and series."""
        return {
            "calls": self.calls,
            "shared_dim": self.shared_dim,
            "step": list(self.step),
            "epoch": list(self.epoch),
            "norms": [list(r) for r in self.norms],
            "cosines": [list(r) for r in self.cosines],
            "epochs": list(self.epochs),
            "epoch_start": self._epoch_start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls, self.shared_dim = state["calls"], state["shared_dim"]
        self.step, self.epoch = list(state["step"]), list(state["epoch"])
        self.norms = [list(r) for r in state["norms"]]
        self.cosines = [list(r) for r in state["cosines"]]
        self.epochs, self._epoch_start = list(state["epochs"]), state["epoch_start"]

    def restore(self, path: str | Path, completed_epochs: int) -> None:
        """Continue a run resumed from a checkpoint written before the monitor's state was part
        of it: keep what ``path`` recorded for the first ``completed_epochs`` epochs, drop
        anything later (a downsampled series comes back as its bucket means)."""
        path = Path(path)
        if not path.exists():
            return
        data = json.loads(path.read_text())
        if data.get("tasks") != self.tasks:
            return
        self.epochs = [e for e in data.get("epochs", []) if e["epoch"] <= completed_epochs]
        self.calls = self.epochs[-1]["steps_seen"] if self.epochs else 0
        self.shared_dim = data.get("shared_parameters")
        series = data["series"]
        keep = [i for i, e in enumerate(series["epoch"]) if e <= completed_epochs]
        keys = [pair_key(self.tasks[i], self.tasks[j]) for i, j in self.pairs]
        self.step = [series["step"][i] for i in keep]
        self.epoch = [series["epoch"][i] for i in keep]
        self.norms = [[_nan(series["grad_norm"][t][i]) for t in self.tasks] for i in keep]
        self.cosines = [[_nan(series["cosine"][k][i]) for k in keys] for i in keep]
        self._epoch_start = len(self.step)


def expert_labels(model: MTLModel, num: int) -> list[str]:
    """Names of the gate's columns: CGC/PLE gates list the task's own experts, then the shared
    ones; the other expert models gate over shared experts only."""
    specific = getattr(model.config, "specific_experts", None)
    shared = getattr(model.config, "shared_experts", None)
    if specific is not None and shared is not None and specific + shared == num:
        return [f"own{i}" for i in range(specific)] + [f"shared{i}" for i in range(shared)]
    return [f"e{i}" for i in range(num)]


def summarise_gates(
    mean: torch.Tensor, tasks: Sequence[str], labels: Sequence[str], can_collapse: bool = True
) -> dict:
    """Statistics of the mean gate weights ``mean`` [T, E] (rows sum to 1).

    ``effective_experts``: exp(entropy) of a task's mean gate, 1 (one expert) to E (uniform).
    ``expert_load``: mean over tasks of each column's weight (for CGC/PLE the ``own`` columns
    are different experts for each task). ``collapsed``: tasks with ``max_share`` above
    :data:`COLLAPSE_SHARE` (none when ``can_collapse`` is false).
    """
    mean = mean.double()
    p = mean.clamp_min(1e-12)
    entropy = -(mean * p.log()).sum(1)
    share, top = mean.max(1)
    collapsed = [t for t, s in zip(tasks, share.tolist()) if s > COLLAPSE_SHARE and can_collapse]
    return {
        "experts": list(labels),
        "mean": {t: row for t, row in zip(tasks, mean.tolist())},
        "effective_experts": dict(zip(tasks, entropy.exp().tolist())),
        "max_share": dict(zip(tasks, share.tolist())),
        "top_expert": {t: labels[i] for t, i in zip(tasks, top.tolist())},
        "expert_load": mean.mean(0).tolist(),
        "collapsed": collapsed,
        "collapse_warning": bool(collapsed),
    }


def _mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def _nullable(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values.tolist()]


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)
