"""Does a saved run still come out the same? Train its first epochs again and compare.

Why: a benchmark table is only worth its command if running the command again gives the same
numbers. Retraining a whole run takes minutes to hours, but the first epoch of the same config
and seed already shows whether the code, the data or the environment changed what training
computes: any change in arithmetic (a fused kernel, another summation order, a new default)
moves the first epoch's training loss in its last bits. Runs are bit-reproducible on CPU with a
fixed thread count (the benchmarks use ``train.threads: 1``); a run replayed with another thread
count, on another CPU type or on a GPU may differ in the last bits without any code change.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlrec import config as cfg
from mtlrec.errors import MTLRecError

# Per-epoch figures that training computes; timings and row counts are left out.
_COMPARED_METRICS = ("auc", "logloss", "mse")


@dataclass
class Replay:
    """The outcome of replaying ``epochs`` epochs of the run in ``run_dir``."""

    run_dir: Path
    epochs: int
    compared: int = 0
    max_abs_diff: float = 0.0
    differences: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences

    @property
    def training_identical(self) -> bool:
        """Every training loss matched; only validation figures (evaluation code) differ."""
        return not any(" train_loss " in d for d in self.differences)

    def summary(self) -> str:
        if self.identical:
            return f"identical ({self.compared} figures over {self.epochs} epoch(s))"
        where = (
            "training identical, validation metrics differ (evaluation changed)"
            if self.training_identical
            else "training differs"
        )
        return (
            f"{where}: {len(self.differences)} of {self.compared} figures, "
            f"max |diff| {self.max_abs_diff:.3g}; first: {self.differences[0]}"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise MTLRecError(f"{path}: cannot read ({exc.strerror}); is this a finished run?") from exc
    except json.JSONDecodeError as exc:
        raise MTLRecError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc


def epoch_figures(history: dict[str, Any], epochs: int, source: Path) -> dict[str, float]:
    """``{"epoch 1 train_loss income": 0.2016..., "epoch 1 valid income auc": ...}`` for the
    first ``epochs`` epochs of a ``history.json``."""
    recorded = history.get("epochs") or [] if isinstance(history, dict) else None
    if not isinstance(recorded, list) or not all(isinstance(r, dict) for r in recorded):
        raise MTLRecError(f"{source}: 'epochs' is not a list of epoch records; re-create the run")
    if len(recorded) < epochs:
        raise MTLRecError(
            f"{source}: records {len(recorded)} epoch(s), fewer than the {epochs} to replay"
        )
    figures: dict[str, float] = {}
    for record in recorded[:epochs]:
        n = record["epoch"]
        for task, loss in (record.get("train_loss") or {}).items():
            figures[f"epoch {n} train_loss {task}"] = loss
        for task, metrics in (record.get("valid") or {}).items():
            for name in _COMPARED_METRICS:
                if name in metrics:
                    figures[f"epoch {n} valid {task} {name}"] = metrics[name]
    return figures


def compare_figures(saved: dict[str, float], again: dict[str, float], replay: Replay) -> Replay:
    """Fill ``replay`` with every figure that is not bit-for-bit the same (NaN equals NaN)."""
    for key in sorted(saved.keys() | again.keys()):
        if key not in saved or key not in again:
            where = "the replay" if key not in again else "the saved run"
            replay.differences.append(f"{key}: missing in {where}")
            continue
        a, b = saved[key], again[key]
        replay.compared += 1
        if a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b)):
            continue
        diff = abs(a - b) if a is not None and b is not None else math.inf
        replay.max_abs_diff = max(replay.max_abs_diff, diff)
        replay.differences.append(f"{key}: {a!r} -> {b!r}")
    return replay


def replay_config(
    config: dict[str, Any],
    saved: dict[str, float],
    epochs: int = 1,
    label: str | Path = "run",
    work_dir: str | Path | None = None,
) -> Replay:
    """Train ``config`` (a run's resolved config: same seed, same data) for ``epochs`` epochs in
    ``work_dir`` (a temporary folder by default) and compare its per-epoch figures with
    ``saved`` (as :func:`epoch_figures` returns them)."""
    from mtlrec.train.run import train_run

    if epochs < 1:
        raise MTLRecError(f"epochs to replay must be >= 1, got {epochs}")
    cfg.check_sections(config, str(label))
    # Early stopping cannot end the replay before ``epochs``; nothing else changes.
    overrides = {"train": {"epochs": epochs, "progress": False, "patience": epochs}}
    resolved = cfg.resolve(config, [overrides])
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        train_run(resolved, Path(tmp), echo=lambda *_: None)
        history = _read_json(Path(tmp) / "history.json")
    again = epoch_figures(history, epochs, Path(label) / "replay")
    return compare_figures(saved, again, Replay(run_dir=Path(label), epochs=epochs))


def replay_run(run_dir: str | Path, epochs: int = 1, work_dir: str | Path | None = None) -> Replay:
    """Replay the first ``epochs`` epochs of a finished run directory (its ``config.yaml``)
    and compare them with its ``history.json``."""
    saved = fingerprint(run_dir, epochs)
    return replay_config(
        saved["config"], saved["figures"], epochs, label=Path(run_dir), work_dir=work_dir
    )


def fingerprint(run_dir: str | Path, epochs: int = 1) -> dict[str, Any]:
    """What :func:`replay_fingerprint` needs to check a run without its folder: the run's
    resolved config and its first ``epochs`` epochs' figures (small enough to commit)."""
    run = Path(run_dir)
    history = _read_json(run / "history.json")
    return {
        "epochs": epochs,
        "config": cfg.load_yaml(run / "config.yaml"),
        "figures": epoch_figures(history, epochs, run / "history.json"),
    }


def replay_fingerprint(fp: dict[str, Any], label: str = "run") -> dict[str, Any]:
    """Replay a :func:`fingerprint`; a row ``{status, summary, max_abs_diff, seconds}`` where
    status is 'identical', 'evaluation differs', 'training differs' or 'error'."""
    started = time.perf_counter()
    try:
        result = replay_config(fp["config"], fp["figures"], fp["epochs"], label=label)
    except MTLRecError as exc:
        return {"status": "error", "summary": str(exc), "max_abs_diff": None, "seconds": None}
    if result.identical:
        status = "identical"
    else:
        status = "evaluation differs" if result.training_identical else "training differs"
    return {
        "status": status,
        "summary": result.summary(),
        "max_abs_diff": result.max_abs_diff,
        "seconds": round(time.perf_counter() - started, 1),
    }
