"""``mtlrec report``: plots and a plain-language verdict for a finished run.

Why: the final metrics say how good a multi-task model is, not why it is worse than it should be.
The report puts next to each other the training curves, the gradient diagnostics recorded with
``--diagnose`` (how often the tasks' gradients point against each other on the shared
parameters; whether an expert model's gates collapsed) and, given a single-task baseline run,
whether sharing helped or hurt each task (negative transfer).

Everything goes to ``RUN_DIR/report/``: PNG figures and ``verdict.md`` (also returned, for the
CLI to print). matplotlib is imported only here, and only its Agg canvas is used (no pyplot, no
global backend switch), so a headless machine and the rest of the package never need it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlrec.config import read_yaml
from mtlrec.errors import MTLRecError, first_line, make_dir
from mtlrec.train.checkpoint import save_text
from mtlrec.train.diagnostics import COLLAPSE_SHARE, DIAGNOSTICS_FILE

REPORT_DIR = "report"
VERDICT_FILE = "verdict.md"
# Metrics where a higher value is better; every other compared metric is a loss (lower wins).
HIGHER_IS_BETTER = {"auc", "joint_auc"}
SAME = 5e-5  # differences below this print as 0.0000: call them no difference
FREQUENT, OCCASIONAL = 0.5, 0.2  # conflict fractions that make a pair "frequent"/"occasional"


@dataclass
class RunFiles:
    """What a run directory holds, as read by the report (diagnostics and config optional)."""

    path: Path
    metrics: dict[str, Any]
    history: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.history.get("model") or (self.config.get("model") or {}).get("name", "?")

    @property
    def dataset(self) -> str | None:
        return (self.config.get("dataset") or {}).get("name")


def read_run(run_dir: str | Path) -> RunFiles:
    """Read a run directory; anything that is not one is an :class:`MTLRecError` naming it."""
    path = Path(run_dir)
    if not path.is_dir():
        raise MTLRecError(f"{path}: no such run directory")
    for name in ("metrics.json", "history.json"):
        if not (path / name).is_file():
            raise MTLRecError(
                f"{path}: not a finished run ({name} is missing); pass a folder written by "
                "'mtlrec train'"
            )
    metrics = _read_json(path / "metrics.json")
    history = _read_json(path / "history.json")
    if not isinstance(metrics, dict) or not isinstance(history, dict):
        raise MTLRecError(f"{path}: metrics.json and history.json must be JSON objects")
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        config = read_yaml(path / "config.yaml", "run config") or {}
        if not isinstance(config, dict):
            raise MTLRecError(f"{path / 'config.yaml'}: expected a mapping of config sections")
    diagnostics = None
    if (path / DIAGNOSTICS_FILE).is_file():
        diagnostics = _read_json(path / DIAGNOSTICS_FILE)
        if not isinstance(diagnostics, dict):
            raise MTLRecError(f"{path / DIAGNOSTICS_FILE}: must be a JSON object")
    return RunFiles(path, metrics, history, config, diagnostics)


def write_report(run_dir: str | Path, baseline: str | Path | None = None) -> str:
    """Write the figures and ``verdict.md`` into ``RUN_DIR/report/``; return the verdict."""
    run = read_run(run_dir)
    base = read_run(baseline) if baseline is not None else None
    out = make_dir(run.path / REPORT_DIR, "report folder")
    try:
        figures = write_figures(run, out)
        verdict = build_verdict(run, base, figures)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        # a hand-edited or foreign history.json / diagnostics.json of the right JSON type
        raise MTLRecError(
            f"{run.path}: a run file is not shaped as 'mtlrec train' writes it "
            f"({type(exc).__name__}: {first_line(exc)}); re-create the run"
        ) from exc
    save_text(verdict, out / VERDICT_FILE)
    return verdict


# --- verdict ---------------------------------------------------------------------------------------


def build_verdict(run: RunFiles, base: RunFiles | None, figures: list[str] | None = None) -> str:
    """The markdown verdict: conflict per task pair, gate collapse, transfer per task."""
    balancer = run.history.get("balancer") or (run.config.get("balance") or {}).get("name", "?")
    title = f"# Report: {run.path.name} ({run.name}, balancer {balancer}"
    title += f", dataset {run.dataset})" if run.dataset else ")"
    lines = [title, ""]
    lines += conflict_section(run.diagnostics, run.name)
    lines += gate_section(run.diagnostics, run.history.get("best_epoch"))
    lines += transfer_section(run, base)
    if figures:
        lines += ["## Figures", ""] + [f"- `{REPORT_DIR}/{f}`" for f in figures] + [""]
    return "\n".join(lines)


def conflict_section(diag: dict[str, Any] | None, model: str = "?") -> list[str]:
    lines = ["## Gradient conflict between tasks", ""]
    if diag is None:
        return lines + [
            "No gradient diagnostics in this run: train with `--diagnose` to record how often "
            "the tasks' gradients conflict on the shared parameters.",
            "",
        ]
    if diag.get("note"):
        return lines + [diag["note"] + ".", ""]
    stats = pair_statistics(diag)
    if not stats:
        return lines + ["Only one task, or no recorded step: nothing to compare.", ""]
    every = diag.get("every", 1)
    lines.append(
        "Cosine between each pair of task gradients on the shared parameters, recorded "
        + ("on every step" if every == 1 else f"every {every} steps")
        + "; a pair conflicts on a step when the cosine is below 0."
    )
    lines.append("")
    for pair, s in sorted(stats.items(), key=lambda kv: -(kv[1]["fraction"] or 0)):
        if s["fraction"] is None:
            lines.append(f"- {pair}: undefined (a task's gradient was always zero)")
            continue
        level = (
            "frequent conflict"
            if s["fraction"] >= FREQUENT
            else "occasional conflict"
            if s["fraction"] >= OCCASIONAL
            else "rare conflict"
        )
        lines.append(
            f"- {pair}: {level}, cosine < 0 on {s['fraction']:.0%} of {s['steps']} recorded "
            f"steps (mean cosine {_signed(s['cosine'], 3)}"
            + (f"; {s['last']:.0%} in the last epoch)" if s["last"] is not None else ")")
        )
    frequent = [p for p, s in stats.items() if (s["fraction"] or 0) >= FREQUENT]
    lines.append("")
    if frequent:
        lines.append(
            f"Conflicting on most steps: {', '.join(frequent)}. A conflict-aware balancer "
            "(`--balance pcgrad`, `cagrad`, `nashmtl`, ...) may help; compare against "
            "`--balance ew`"
            + (
                ", or give each task its own gate (`--model mmoe`, `ple`)."
                if model == "shared-bottom"
                else "."
            )
        )
    else:
        lines.append("No task pair conflicts on most steps.")
    return lines + [""]


def pair_statistics(diag: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per pair: conflict fraction and mean cosine over the recorded steps where the cosine is
    defined (the per-epoch summaries weighted by those counts, so downsampling of the series
    does not matter; a step where a task had no observed row has no cosine)."""
    out: dict[str, dict[str, Any]] = {}
    epochs = diag.get("epochs") or []
    for a, b in diag.get("pairs") or []:
        key = f"{a}/{b}"
        frac_sum = cos_sum = 0.0
        n = 0
        last = None
        for e in epochs:
            f, c = e["conflict_fraction"].get(key), e["cosine"].get(key)
            k = (e.get("cosine_defined") or {}).get(key, e.get("steps_recorded", 0))
            if f is None or c is None or not k:
                continue
            frac_sum += f * k
            cos_sum += c * k
            n += k
            last = f
        out[f"{a} / {b}"] = {
            "fraction": frac_sum / n if n else None,
            "cosine": cos_sum / n if n else None,
            "steps": n,
            "last": last,
        }
    return out


def gate_section(diag: dict[str, Any] | None, best_epoch: int | None) -> list[str]:
    summary = _gate_epoch(diag, best_epoch)
    if summary is None:
        return []
    epoch, g = summary
    lines = [f"## Expert gates (validation rows, epoch {epoch})", ""]
    for task in g["mean"]:
        lines.append(
            f"- {task}: top expert {g['top_expert'][task]} with {g['max_share'][task]:.0%} of "
            f"the gate mass; {g['effective_experts'][task]:.1f} of {len(g['experts'])} experts "
            "effectively used"
        )
    lines.append("")
    if g["collapsed"]:
        lines.append(
            f"Warning: gate collapse (one expert above {COLLAPSE_SHARE:.0%} of the mass) for "
            f"{', '.join(g['collapsed'])}: those tasks do not use the mixture; try more "
            "experts, gate dropout or a higher learning rate for the gates."
        )
    else:
        lines.append(
            f"No gate collapsed (no task puts more than {COLLAPSE_SHARE:.0%} on one expert)."
        )
    return lines + [""]


def transfer_section(run: RunFiles, base: RunFiles | None) -> list[str]:
    lines = ["## Transfer: multi-task vs single-task baseline", ""]
    if base is None:
        data_args = data_arguments(run.config)
        out = run.path.parent / "single-task"
        return lines + [
            "No baseline was given, so negative transfer cannot be judged. Train a single-task "
            "baseline on the same data and seed, then pass it with `--baseline`:",
            "",
            f"    mtlrec train {data_args} --model single-task --out {out}",
            f"    mtlrec report {run.path} --baseline {out}",
            "",
        ]
    split = "test"
    if not run.metrics.get("test") or not base.metrics.get("test"):
        split = "valid"
        lines += ["(No test metrics in one of the runs: comparing validation metrics.)", ""]
    if base.name != "single-task":
        lines += [f"(Note: the baseline is model {base.name!r}, not 'single-task'.)", ""]
    mine, theirs = run.metrics.get(split) or {}, base.metrics.get(split) or {}
    for warning in comparability_warnings(run, base, split):
        lines += [f"(Warning: {warning})", ""]
    negative, compared = [], 0
    for task, m in mine.items():
        b = theirs.get(task)
        if b is None:
            lines.append(f"- {task}: not in the baseline's metrics")
            continue
        metric = primary_metric(m, b)
        if metric is None:
            lines.append(f"- {task}: no metric defined in both runs")
            continue
        compared += 1
        delta = m[metric] - b[metric]
        label = metric.upper() if metric == "auc" else metric
        change = f"{_signed(delta)} {label}"
        versus = f"multi-task {m[metric]:.4f} vs single-task {b[metric]:.4f} ({split})"
        if abs(delta) < SAME:
            lines.append(f"- no difference on task {task} ({change}): {versus}")
        elif (delta > 0) == (metric in HIGHER_IS_BETTER):
            lines.append(f"- positive transfer on task {task} ({change}): {versus}")
        else:
            negative.append(task)
            lines.append(f"- negative transfer on task {task} ({change}): {versus}")
    lines.append("")
    if negative:
        lines.append(
            f"Negative transfer on {len(negative)} of {compared} task(s): {', '.join(negative)}. "
            "The single-task model is better there; sharing hurts those tasks."
        )
    elif compared:
        which = "every task" if compared == len(mine) else f"the {compared} tasks compared"
        lines.append(f"No negative transfer: the multi-task model is at least as good on {which}.")
    lines.append(
        "One run each: differences of a few thousandths can be seed noise; repeat with "
        "`--seed` before concluding."
    )
    return lines + [""]


def comparability_warnings(run: RunFiles, base: RunFiles, split: str) -> list[str]:
    """Why the two runs' numbers may not be comparable: other data settings (dataset name,
    files, row cap, split fractions), another seed, or another number of scored rows."""
    out = []
    mine, theirs = run.config.get("dataset") or {}, base.config.get("dataset") or {}
    differs = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if mine and theirs and differs:
        shown = "; ".join(f"dataset.{k}: {mine.get(k)!r} vs {theirs.get(k)!r}" for k in differs[:3])
        out.append(f"the two runs were trained on other data settings ({shown})")
    seeds = [(r.config.get("train") or {}).get("seed") for r in (run, base)]
    if None not in seeds and seeds[0] != seeds[1]:
        out.append(
            f"other seeds ({seeds[0]} vs {seeds[1]}): a part of any difference is seed noise"
        )
    rows = {
        t: (m.get("rows"), (base.metrics.get(split) or {}).get(t, {}).get("rows"))
        for t, m in (run.metrics.get(split) or {}).items()
    }
    other = [f"{t} {a} vs {b}" for t, (a, b) in rows.items() if None not in (a, b) and a != b]
    if other:
        out.append(f"the {split} split has other rows in the two runs ({', '.join(other)})")
    return out


def data_arguments(config: dict[str, Any]) -> str:
    """The ``mtlrec train`` flags that give a run's data again (for a baseline's command)."""
    dataset = dict(config.get("dataset") or {})
    name = dataset.pop("name", None)
    if not name:
        return "--train ... --valid ... --test ... --schema ..."
    if name == "files":
        args = [
            f"--{k} {dataset.pop(k)}"
            for k in ("train", "valid", "test", "schema")
            if dataset.get(k)
        ]
    else:
        args = [f"--dataset {name}"]
    if dataset.get("max_rows") is not None:
        args.append(f"--max-rows {dataset.pop('max_rows')}")
    args += [f"--set dataset.{k}={v}" for k, v in sorted(dataset.items()) if v is not None]
    seed = (config.get("train") or {}).get("seed")
    if seed is not None:
        args.append(f"--seed {seed}")
    return " ".join(args)


def primary_metric(mine: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """The metric a task is judged on: AUC for a binary task, else log loss, else MSE."""
    for metric in ("auc", "logloss", "mse"):
        a, b = mine.get(metric), theirs.get(metric)
        if isinstance(a, int | float) and isinstance(b, int | float):
            if not (math.isnan(a) or math.isnan(b)):
                return metric
    return None


# --- figures ---------------------------------------------------------------------------------------


def write_figures(run: RunFiles, out: Path) -> list[str]:
    """Write the PNGs into ``out``; returns their file names. Needs matplotlib (extra 'plots')."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise MTLRecError("the report needs matplotlib: pip install 'mtlrec[plots]'") from exc

    written: list[str] = []

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        written.append(name)

    epochs = run.history.get("epochs") or []
    best = run.history.get("best_epoch")
    if epochs:
        xs = [e["epoch"] for e in epochs]
        tasks = list(epochs[0].get("valid") or {})
        if tasks:
            fig = Figure(figsize=(4.5 * len(tasks), 3.5))
            for i, task in enumerate(tasks):
                ax = fig.add_subplot(1, len(tasks), i + 1)
                metric = _curve_metric(epochs, task)
                ys = [_num((e["valid"].get(task) or {}).get(metric)) for e in epochs]
                ax.plot(xs, ys, marker="o")
                if best and best > 0:
                    ax.axvline(best, color="grey", linestyle="--", linewidth=1, label="best")
                    ax.legend(loc="best", fontsize=8)
                ax.set_title(f"{task}: validation {metric}")
                ax.set_xlabel("epoch")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            save(fig, "valid_metric.png")
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_subplot(1, 1, 1)
        for task in epochs[0].get("train_loss") or {}:
            ax.plot(xs, [_num(e["train_loss"].get(task)) for e in epochs], marker="o", label=task)
        ax.set_title("train loss per task")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best", fontsize=8)
        save(fig, "train_loss.png")

    diag = run.diagnostics
    series = (diag or {}).get("series") or {}
    if diag and series.get("step"):
        steps = series["step"]
        fig = Figure(figsize=(7, 3.5))
        ax = fig.add_subplot(1, 1, 1)
        positive = True
        for task, values in series["grad_norm"].items():
            ys = [_num(v) for v in values]
            positive = positive and all(y > 0 for y in ys if not math.isnan(y))
            ax.plot(steps, ys, linewidth=0.8, label=task)
        if positive:
            ax.set_yscale("log")
        ax.set_title("gradient norm per task on the shared parameters")
        ax.set_xlabel("training step")
        ax.legend(loc="best", fontsize=8)
        save(fig, "grad_norm.png")

        fig = Figure(figsize=(7, 3.5))
        ax = fig.add_subplot(1, 1, 1)
        for k, (pair, values) in enumerate(series["cosine"].items()):
            ys = [_num(v) for v in values]
            color = f"C{k % 10}"
            ax.plot(steps, ys, linewidth=0.5, alpha=0.35, color=color)
            ax.plot(steps, _smooth(ys), linewidth=1.6, color=color, label=f"{pair} (smoothed)")
        ax.axhline(0.0, color="black", linewidth=1)
        ax.set_ylim(-1.05, 1.05)
        ax.set_title("cosine between task gradients (below 0: conflict)")
        ax.set_xlabel("training step")
        ax.legend(loc="best", fontsize=8)
        save(fig, "cosine.png")

    gates = _gate_epoch(diag, best)
    if gates is not None:
        epoch, g = gates
        tasks = list(g["mean"])
        matrix = [g["mean"][t] for t in tasks]
        fig = Figure(figsize=(1.0 + 0.7 * len(g["experts"]), 1.2 + 0.6 * len(tasks)))
        ax = fig.add_subplot(1, 1, 1)
        _heatmap(fig, ax, matrix, g["experts"], tasks)
        ax.set_title(f"mean gate weight per task (validation, epoch {epoch})")
        save(fig, "gates.png")
        history = [e for e in diag["epochs"] if "gates" in e]
        if len(history) > 1:
            fig = Figure(figsize=(4.5 * len(tasks), 1.5 + 0.3 * len(history)))
            for i, task in enumerate(tasks):
                ax = fig.add_subplot(1, len(tasks), i + 1)
                rows = [e["gates"]["mean"][task] for e in history]
                _heatmap(fig, ax, rows, g["experts"], [str(e["epoch"]) for e in history])
                ax.set_title(f"{task}: gate weight by epoch")
                ax.set_ylabel("epoch")
            save(fig, "gates_by_epoch.png")
    return written


def _heatmap(fig, ax, matrix: list[list[float]], cols: list[str], rows: list[str]) -> None:
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols, fontsize=8)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=8)
    if len(cols) * len(rows) <= 120:
        for r, row in enumerate(matrix):
            for c, v in enumerate(row):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 else "black")  # fmt: skip
    fig.colorbar(image, ax=ax)


def _gate_epoch(
    diag: dict[str, Any] | None, best_epoch: int | None
) -> tuple[int, dict[str, Any]] | None:
    """The gate summary of the best epoch (the weights the run kept), else the last one."""
    with_gates = [e for e in (diag or {}).get("epochs") or [] if "gates" in e]
    if not with_gates:
        return None
    chosen = next((e for e in with_gates if e["epoch"] == best_epoch), with_gates[-1])
    return chosen["epoch"], chosen["gates"]


def _curve_metric(epochs: list[dict[str, Any]], task: str) -> str:
    for metric in ("auc", "logloss", "mse"):
        if any(_defined((e["valid"].get(task) or {}).get(metric)) for e in epochs):
            return metric
    return "auc"


def _smooth(values: list[float]) -> list[float]:
    """Trailing moving average over ~1/25 of the series, skipping undefined points."""
    window = max(1, len(values) // 25)
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def _signed(delta: float, digits: int = 4) -> str:
    """``+0.0012`` / ``−0.0123`` (a true minus sign, as written in prose)."""
    text = f"{delta:+.{digits}f}"
    return text.replace("-", "\u2212")


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _defined(value: Any) -> bool:
    return isinstance(value, int | float) and not math.isnan(value)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MTLRecError(f"{path}: cannot read ({exc})") from exc
