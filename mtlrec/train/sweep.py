"""Compare models x balancers x seeds on one dataset (`mtlrec sweep`).

Every combination is an ordinary ``mtlrec train`` run in its own folder
(``OUT/<model>--<balancer>/seed-<seed>``), launched as a separate process, K at a time with the
cores shared out between them, so a sweep can be stopped and started again: finished runs are read back, interrupted ones
resume from their checkpoint. The summary ranks the configurations by their mean validation
score (the same figure early stopping maximises), because choosing a winner is model selection
and belongs to the validation split; the test metrics are reported beside it, never used to rank.
Differences to the first configuration are paired by seed (same data order, same initialisation
seed), with the standard error of the mean paired difference, so that a gap smaller than the
seed-to-seed noise is visible as such.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtlrec.balance.base import check_compile, check_optimizer, describe_balancers
from mtlrec.bench.runs import run_all, train_or_reuse
from mtlrec.config import RESUMABLE_KEYS, REUSABLE_KEYS, config_changes, split_named, train_config
from mtlrec.errors import ConfigError
from mtlrec.models.base import build_config
from mtlrec.models.registry import model_class
from mtlrec.schema import Schema
from mtlrec.train.metrics import monitor_value
from mtlrec.train.run import read_run_config

SUMMARY_JSON = "sweep.json"
SUMMARY_MD = "SWEEP.md"
SUMMARY_PNG = "SWEEP.png"


@dataclass(frozen=True)
class Job:
    model: str
    balancer: str | None  # None: whatever the config says (``fixed`` by default)
    seed: int
    out: Path

    @property
    def config_name(self) -> str:
        return f"{self.model} + {_balancer_label(self.balancer)}"


def _balancer_label(balancer: str | None) -> str:
    return balancer or "configured"


def plan(
    out: Path, models: Sequence[str], balancers: Sequence[str | None], seeds: Sequence[int]
) -> list[Job]:
    """Every (model, balancer, seed), configuration by configuration."""
    if not models or not balancers or not seeds:
        raise ConfigError("sweep: give at least one model, balancer and seed")
    for name, values in (("models", models), ("balancers", balancers), ("seeds", seeds)):
        dup = sorted({str(v) for v in values if list(values).count(v) > 1})
        if dup:
            raise ConfigError(f"sweep: --{name} lists {', '.join(dup)} twice")
    return [
        Job(m, b, s, out / f"{m}--{_balancer_label(b)}" / f"seed-{s}")
        for m in models
        for b in balancers
        for s in seeds
    ]


def check_names(models: Sequence[str], balancers: Sequence[str | None]) -> None:
    """Unknown model or balancer names, as one ConfigError naming the choices."""
    for m in models:
        model_class(m)
    known = describe_balancers()
    unknown = [b for b in balancers if b is not None and b not in known]
    if unknown:
        raise ConfigError(
            f"unknown balancer(s) {', '.join(unknown)}; choose from: {', '.join(sorted(known))}"
        )


def check_config(config: dict[str, Any], rank_by: str | None = None) -> None:
    """What can be checked of a run's config without its data: the train section, the model's
    option keys, types and common ranges, train.compile against the balancer, and with a schema
    file, the schema and ``rank_by`` (a named dataset's tasks are known once it is loaded)."""
    tcfg = train_config(config["train"])
    name, options = split_named(config["model"], "model")
    build_config(model_class(name).Config, options, name)
    check_compile(tcfg.compile, config["balance"]["name"], tcfg.diagnose)
    check_optimizer(tcfg.optimizer, config["balance"]["name"])
    if config["dataset"].get("schema"):  # a typo in depends_on fails now, not in every run
        schema = Schema.load(config["dataset"]["schema"])
        if rank_by is not None and rank_by not in schema.task_names:
            raise ConfigError(
                f"--rank-by {rank_by!r} is not a task of the schema; its tasks are "
                f"{', '.join(schema.task_names)}"
            )


def run_warnings(jobs: Sequence[Job]) -> list[str]:
    """The distinct ``warning:`` lines of the runs' train.log files (a run trains with --quiet,
    which keeps its warnings: about the data they are the same for every run, so once each)."""
    lines: dict[str, None] = {}
    for job in jobs:
        log = job.out / "train.log"
        if log.exists():
            text = log.read_text(errors="replace")
            lines.update(dict.fromkeys(x for x in text.splitlines() if x.startswith("warning:")))
    return list(lines)


def stale_runs(jobs: Sequence[Job], expected: Callable[[Job], dict[str, Any]]) -> list[str]:
    """Runs already in their folder whose saved config differs from ``expected(job)``, each with
    its first difference. A finished run is a result: its epochs and patience count too."""
    stale = []
    for job in jobs:
        saved = job.out / "config.yaml"
        if not saved.exists():
            continue
        finished = (job.out / "metrics.json").exists()
        changes = config_changes(
            read_run_config(saved),
            expected(job),
            REUSABLE_KEYS if finished else RESUMABLE_KEYS,
        )
        if changes:
            stale.append(f"{job.out} ({changes[0]})")
    return stale


def run_jobs(
    jobs: Sequence[Job], train_args: Sequence[str], parallel: int, force: bool = False
) -> list[dict[str, Any]]:
    """Train (or reuse) every job; one status row per job, in job order (a job cancelled after
    every earlier run failed gets the status "not run"). The machine's cores are shared out:
    each of the ``parallel`` processes gets cores // parallel threads."""
    threads = max(1, (os.cpu_count() or 1) // max(1, parallel))

    def run(job: Job) -> dict[str, Any]:
        command = [sys.executable, "-m", "mtlrec.cli", "train", *train_args]
        command += ["--model", job.model, "--seed", str(job.seed), "--out", str(job.out)]
        command += ["--balance", job.balancer] if job.balancer else []
        command += ["--resume", "--quiet"]
        row = {"model": job.model, "balancer": job.balancer, "seed": job.seed}
        row["config"] = job.config_name
        return train_or_reuse(job.out, command, row, force=force, threads=threads)

    done = run_all([(job,) for job in jobs], run, max(1, parallel), line=_progress_line)
    by_key = {(r["model"], r["balancer"], r["seed"]): r for r in done}
    return [
        by_key.get((j.model, j.balancer, j.seed))
        or {"model": j.model, "balancer": j.balancer, "seed": j.seed, "status": "not run"}
        for j in jobs
    ]


def _progress_line(row: dict[str, Any]) -> str:
    return f"{row['config']}, seed {row['seed']}: {row['status']}"


def summarise(
    jobs: Sequence[Job], statuses: Sequence[dict[str, Any]], rank_by: str | None = None
) -> dict[str, Any]:
    """Per configuration: seeds, validation score, per-task test metrics (mean, std, per seed),
    paired differences to the first configuration; sorted by mean validation score: the
    early-stopping figure, or with ``rank_by`` that one task's validation AUC (minus its MSE for
    a regression task), for when one task (say conversion) is what the product lives on."""
    configs: dict[str, dict[str, Any]] = {}
    failed = []
    for job, status in zip(jobs, statuses):
        entry = configs.setdefault(
            job.config_name,
            {"model": job.model, "balancer": job.balancer, "seeds": {}, "failed": []},
        )
        if status.get("status") != "ok":
            entry["failed"].append(job.seed)
            failed.append({"run": str(job.out), "status": status.get("status")})
            continue
        metrics = _nan(json.loads((job.out / "metrics.json").read_text()))
        history = json.loads((job.out / "history.json").read_text())
        config = read_run_config(job.out / "config.yaml")
        monitor = config["train"].get("monitor", "auc")
        if rank_by is None:
            score = monitor_value(metrics["valid"], monitor)
        elif rank_by in metrics["valid"]:
            name, value = _headline(metrics["valid"][rank_by])
            score = value if name == "auc" else -value
        else:
            raise ConfigError(
                f"--rank-by {rank_by!r} is not a task of {job.out}; its tasks are "
                f"{', '.join(metrics['valid'])}"
            )
        entry["seeds"][job.seed] = {
            "valid_score": score,
            "test": {t: _headline(m) for t, m in (metrics.get("test") or {}).items()},
            "epochs": len(history.get("epochs") or []),
        }
    reference = next(iter(configs.values()), None)
    rows = [_config_row(name, c, reference) for name, c in configs.items()]
    ranked = sorted(rows, key=lambda r: -_or(r["valid_score"]["mean"], -math.inf))
    return {
        "configurations": ranked,
        "reference": next(iter(configs), None),
        "failed": failed,
        "rank_by": rank_by,
    }


def _config_row(name: str, c: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    seeds = c["seeds"]
    tasks: dict[str, dict[str, Any]] = {}
    for s, values in sorted(seeds.items()):
        for task, (metric, value) in values["test"].items():
            tasks.setdefault(task, {"metric": metric, "per_seed": {}})["per_seed"][s] = value
    for task, t in tasks.items():
        t.update(_mean_std(list(t["per_seed"].values())))
        if reference is not None and reference is not c:
            ref = {s: v["test"].get(task) for s, v in reference["seeds"].items()}
            paired = [
                t["per_seed"][s] - ref[s][1]
                for s in t["per_seed"]
                if ref.get(s) is not None and _finite(t["per_seed"][s]) and _finite(ref[s][1])
            ]
            t["vs_reference"] = _paired(paired)
    return {
        "config": name,
        "model": c["model"],
        "balancer": c["balancer"],
        "seeds_ok": sorted(seeds),
        "seeds_failed": c["failed"],
        "valid_score": _mean_std([v["valid_score"] for v in seeds.values()]),
        "epochs": _mean_std([v["epochs"] for v in seeds.values()])["mean"],
        "test": tasks,
    }


def _headline(m: dict[str, Any]) -> tuple[str, float]:
    """The one test metric shown per task: AUC for a binary task, MSE for a regression task."""
    return ("auc", m.get("auc", math.nan)) if "auc" in m else ("mse", m.get("mse", math.nan))


def _mean_std(values: list[float]) -> dict[str, float | None]:
    finite = [v for v in values if _finite(v)]
    return {
        "mean": statistics.fmean(finite) if finite else None,
        "std": statistics.stdev(finite) if len(finite) > 1 else None,
    }


def _paired(diffs: list[float]) -> dict[str, Any]:
    """Mean paired difference, its standard error (std / sqrt(n)) and n."""
    if not diffs:
        return {"mean": None, "se": None, "n": 0}
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return {"mean": statistics.fmean(diffs), "se": se, "n": len(diffs)}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _nan(value: Any) -> Any:
    """null (an undefined metric in metrics.json) -> NaN, as the metric code expects."""
    if isinstance(value, dict):
        return {k: _nan(v) for k, v in value.items()}
    return math.nan if value is None else value


def markdown(summary: dict[str, Any], command: str) -> str:
    """SWEEP.md: the ranking table and the paired differences."""
    rows = summary["configurations"]
    tasks = list(dict.fromkeys(t for r in rows for t in r["test"]))
    metric = {t: next(r["test"][t]["metric"] for r in rows if t in r["test"]) for t in tasks}
    lines = [
        "# Sweep",
        "",
        f"Command: `{command}`",
        "",
        _ranking_sentence(summary.get("rank_by"))
        + "; the test columns are reported, not used to rank. Mean ± sample standard deviation "
        "over seeds.",
        "",
        *_table_head(
            ["rank", "configuration", "seeds", "valid score"]
            + [f"test {t} {metric[t]}" for t in tasks]
            + ["epochs"]
        ),
    ]
    for i, r in enumerate(rows, 1):
        cells = [_pm(r["test"].get(t, {})) for t in tasks]
        seeds = f"{len(r['seeds_ok'])}" + (
            f" ({len(r['seeds_failed'])} failed)" if r["seeds_failed"] else ""
        )
        row = [str(i), r["config"], seeds, _pm(r["valid_score"]), *cells, _num(r["epochs"], 1)]
        lines.append("| " + " | ".join(row) + " |")
    if summary["reference"] and len(rows) > 1 and tasks:
        lines += [
            "",
            f"Paired test differences to `{summary['reference']}` (same seeds): mean ± standard "
            "error; a difference within about two standard errors is not distinguishable from "
            "seed noise.",
            "",
            *_table_head(["configuration"] + [f"Δ {t} {metric[t]}" for t in tasks]),
        ]
        for r in rows:
            if r["config"] == summary["reference"]:
                continue
            cells = [_diff(r["test"].get(t, {}).get("vs_reference")) for t in tasks]
            lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    if summary["failed"]:
        lines += ["", "Failed runs (see each folder's train.log):", ""]
        lines += [f"- `{f['run']}`: {f['status']}" for f in summary["failed"]]
    return "\n".join(lines) + "\n"


def _table_head(columns: list[str]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _ranking_sentence(rank_by: str | None) -> str:
    if rank_by:
        return (
            f"Ranked by the mean validation AUC of task `{rank_by}` (minus its MSE for a "
            "regression task)"
        )
    return (
        "Ranked by mean validation score (mean validation AUC over binary tasks, or minus the "
        "mean validation loss: the early-stopping figure)"
    )


def _num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pm(stats: dict[str, Any]) -> str:
    if not stats or stats.get("mean") is None:
        return "—"
    std = stats.get("std")
    return _num(stats["mean"]) + ("" if std is None else f" ± {std:.4f}")


def _diff(stats: dict[str, Any] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "—"
    se = stats.get("se")
    return f"{stats['mean']:+.4f}" + ("" if se is None else f" ± {se:.4f}") + f" (n={stats['n']})"


def write_figure(summary: dict[str, Any], path: Path) -> bool:
    """SWEEP.png: per task, every configuration's test metric per seed (dots) and its mean ±
    std (bar), in ranking order, so overlap between configurations is seen at a glance. Returns
    False when matplotlib (extra 'plots') is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    rows = summary["configurations"]
    tasks = list(dict.fromkeys(t for r in rows for t in r["test"]))
    if not rows or not tasks:
        return False
    fig = Figure(figsize=(4.2 * len(tasks), 0.45 * len(rows) + 1.6))
    labels = [r["config"] for r in rows]
    ys = list(range(len(rows)))[::-1]  # rank 1 on top
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        metric = "?"
        for y, r in zip(ys, rows):
            stats = r["test"].get(task)
            if not stats or stats["mean"] is None:
                continue
            metric = stats["metric"]
            seeds = [v for v in stats["per_seed"].values() if _finite(v)]
            ax.plot(seeds, [y] * len(seeds), "o", color="tab:blue", alpha=0.5, markersize=4)
            ax.errorbar(stats["mean"], y, xerr=stats["std"] or 0, fmt="|", color="black")
        ax.set_yticks(ys)
        ax.set_yticklabels(labels if i == 0 else [""] * len(labels), fontsize=8)
        ax.set_title(f"test {task} {metric}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True
