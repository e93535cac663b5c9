"""Census-Income model zoo: every registered model that takes two parallel binary tasks.

Why: the models come from different papers, each with its own data and tuning; this puts all of
them on one public split with everything else fixed (dataset preset, seeds, one torch thread per
run, same machine) and reports test AUC per task, size and cost side by side.

Usage::

    python benchmarks/zoo/run.py                          # every eligible model x seeds 1 2 3
    python benchmarks/zoo/run.py --parallel 2             # two training processes at a time
    python benchmarks/zoo/run.py --models mmoe mssm --seeds 1 --epochs 1 \
        --results-dir /tmp/zoo                            # a quick end-to-end check

Eligibility: before training, every requested model is built (default options) on a tiny schema
with two parallel binary tasks, as Census-Income has (income, never married). A model that
refuses it with a ``ConfigError`` (funnel models that need ``depends_on`` tasks, for instance)
is skipped and listed in RESULTS.md with its reason; a training run that fails is listed too.

Each run is ``python -m mtlrec.cli train --dataset census-income --model M --seed S --out
RUNS/M-seedS --quiet --set train.threads=1 --resume`` (model sizes from the preset's ``models:``
block, early stopping on validation AUC, the test split read once). A run whose ``metrics.json``
exists is reused and an interrupted one resumes from its checkpoint, so the benchmark can be
stopped and restarted (``--force`` retrains). Writes, in ``--results-dir`` (default: this
folder): ``results.json`` (rows ``{model, task, auc_mean, auc_std, seeds, parameters,
seconds_per_epoch, epochs_run}``), ``runs.json`` (one row per run) and ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from datetime import date
from pathlib import Path
from typing import Any

from mtlrec.bench.runs import (
    add_run_options,
    census_setup,
    mean_std,
    run_all,
    shown_arguments,
    train_command,
    train_or_reuse,
    use_shared_data,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATASET = "census-income"
TASKS = ("income", "marital")
# Rows that train a registered model with extra settings: name -> (model, --set overrides, why).
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "metaheac+scenarios": (
        "metaheac",
        ["model.scenario_feature=det_ind_code", "train.meta=true"],
        "MetaHeac's multi-scenario setting: the 52 detailed industries of Census-Income "
        "(`det_ind_code`) are the scenarios (median about 1,000 training rows each, half the "
        "rows in industry 0), meta-trained in episodes of 5 scenarios per batch "
        "(`train.meta`); the paper's Tencent look-alike campaigns are not public and no "
        "multi-campaign log is in the shared data, so a categorical field of the same table "
        "stands in for campaigns, which keeps this row comparable with the others",
    ),
}


def registered_models() -> list[str]:
    """Every registered model, in ``mtlrec list models`` order."""
    from mtlrec.models import describe_models

    return list(describe_models())


def screen(models: list[str]) -> tuple[list[str], dict[str, str]]:
    """(models that accept two parallel binary tasks, {refusing model: its ConfigError}).

    The probe schema mirrors Census-Income's shape: categorical fields, a numeric field that is
    also bucketised (the preset embeds numeric buckets) and two binary tasks without
    ``depends_on``."""
    import numpy as np
    import pandas as pd

    from mtlrec.data.encoder import Encoder
    from mtlrec.errors import ConfigError
    from mtlrec.models import build_model
    from mtlrec.schema import Feature, Schema, Task

    rng = np.random.default_rng(0)
    rows = 64
    frame = pd.DataFrame(
        {
            "sex": rng.choice(["Male", "Female"], rows),
            "education": rng.choice(["a", "b", "c", "d"], rows),
            "age": rng.integers(18, 80, rows).astype(float),
            TASKS[0]: rng.integers(0, 2, rows),
            TASKS[1]: rng.integers(0, 2, rows),
        }
    )
    schema = Schema(
        features=[Feature("sex"), Feature("education"), Feature("age", "numeric", buckets=4)],
        tasks=[Task(TASKS[0]), Task(TASKS[1])],
    )
    layout = Encoder(schema).fit(frame).layout()
    eligible, refused = [], {}
    for name in models:
        try:
            build_model(name, schema, layout)
        except ConfigError as exc:
            refused[name] = str(exc)
        else:
            eligible.append(name)
    return eligible, refused


def run_one(model: str, seed: int, args: argparse.Namespace, runs_dir: Path) -> dict[str, Any]:
    """Train (or reuse) one run; return its row (``status`` says whether it worked)."""
    out = runs_dir / f"{model}-seed{seed}"
    row: dict[str, Any] = {"model": model, "seed": seed, "run": str(out)}
    base, overrides, _ = VARIANTS.get(model, (model, [], ""))
    extra = [arg for item in overrides for arg in ("--set", item)]
    command = train_command(DATASET, base, seed, out, args.epochs, args.max_rows, extra)
    return train_or_reuse(out, command, row, force=args.force)


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and task: mean and sample standard deviation of test AUC over seeds."""
    rows = []
    ok = [r for r in runs if r["status"] == "ok"]
    for model in dict.fromkeys(r["model"] for r in ok):
        group = [r for r in ok if r["model"] == model]
        secs = [r["seconds_per_epoch"] for r in group if r["seconds_per_epoch"] is not None]
        for task in group[0]["auc"]:
            values = [r["auc"][task] for r in group if r["auc"].get(task) is not None]
            rows.append(
                {
                    "model": model,
                    "task": task,
                    "auc_mean": statistics.mean(values) if values else None,
                    "auc_std": statistics.stdev(values) if len(values) > 1 else None,
                    "seeds": sorted(r["seed"] for r in group),
                    "parameters": group[0]["parameters"],
                    "seconds_per_epoch": statistics.mean(secs) if secs else None,
                    "epochs_run": statistics.mean(r["epochs_run"] for r in group),
                }
            )
    return rows


def write_markdown(
    path: Path,
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    refused: dict[str, str],
    args: argparse.Namespace,
) -> None:
    from mtlrec.bench.hardware import describe

    tasks = list(dict.fromkeys(r["task"] for r in rows)) or list(TASKS)
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["task"]] = r

    def mean_auc(model: str) -> float:
        values = [c["auc_mean"] for c in by_model[model].values() if c["auc_mean"] is not None]
        return statistics.mean(values) if values else float("-inf")

    seeds = sorted({r["seed"] for r in runs})
    command = "python benchmarks/zoo/run.py " + shlex.join(shown_arguments(sys.argv[1:]))
    lines = [
        "# Census-Income (KDD): the model zoo",
        "",
        f"Command: `{command.strip()}` with `MTLREC_DATA_DIR` set to the shared data folder "
        f"({date.today().isoformat()}).",
        f"Hardware: {describe()}; one torch thread per training process, {args.parallel} "
        "process(es) at a time.",
        census_setup(True, args.epochs, args.max_rows),
        "",
        "| model | "
        + " | ".join(f"{t} AUC" for t in tasks)
        + " | mean AUC | parameters | s/epoch | epochs run |",
        "|---|" + "---|" * len(tasks) + "---|---|---|---|",
    ]
    for model in sorted(by_model, key=mean_auc, reverse=True):
        cells = by_model[model]
        first = next(iter(cells.values()))
        aucs = " | ".join(
            mean_std(cells[t]["auc_mean"], cells[t]["auc_std"]) if t in cells else "-"
            for t in tasks
        )
        secs = first["seconds_per_epoch"]
        lines.append(
            f"| {model} | {aucs} | {mean_auc(model):.4f} | {first['parameters']:,} | "
            f"{'-' if secs is None else f'{secs:.2f}'} | {first['epochs_run']:.1f} |"
        )
    lines += [
        "",
        f"AUC: mean ± sample standard deviation over seeds {', '.join(map(str, seeds))} "
        "(test split). s/epoch: training seconds per epoch, measured with "
        f"{args.parallel} process(es) sharing the machine; epochs run: mean over seeds, "
        "early stopping included.",
    ]
    variants = [name for name in by_model if name in VARIANTS]
    if variants:
        lines += ["", "## Rows with extra settings", ""]
        lines += [
            f"- `{name}` = `{VARIANTS[name][0]}` with "
            + ", ".join(f"`--set {o}`" for o in VARIANTS[name][1])
            + f": {VARIANTS[name][2]}."
            for name in variants
        ]
    if refused:
        lines += ["", "## Skipped: models that refuse two parallel binary tasks", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in refused.items()]
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {r['model']} / seed {r['seed']}: {r['status']}" for r in failed]
    if args.note:
        lines += ["", "## Notes", "", *(f"- {note}" for note in args.note)]
    lines += [
        "",
        "Per-run numbers: `runs.json`; per-run logs: each run folder's `train.log` (run folders are not committed; `make bench-reproduce` re-checks every run from its committed fingerprint).",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=None, help="default: all registered")
    add_run_options(parser, HERE)
    args = parser.parse_args()
    if args.parallel < 1:
        parser.error("--parallel must be >= 1")
    use_shared_data(REPO)

    requested = args.models or registered_models() + list(VARIANTS)
    bases = {VARIANTS[m][0] for m in requested if m in VARIANTS}
    plain = [m for m in requested if m not in VARIANTS]
    eligible, refused = screen(list(dict.fromkeys([*plain, *sorted(bases)])))
    models = [m for m in requested if (VARIANTS[m][0] if m in VARIANTS else m) in eligible]
    for name, reason in refused.items():
        print(f"skipping {name}: {reason}", file=sys.stderr)
    results_dir = args.results_dir.resolve()
    runs_dir = (args.runs_dir or results_dir / "runs").resolve()
    results_dir.mkdir(parents=True, exist_ok=True)

    jobs = [(m, s) for m in models for s in args.seeds]
    print(f"{len(jobs)} runs, {args.parallel} at a time, into {runs_dir}", file=sys.stderr)
    runs = run_all([(m, s, args, runs_dir) for m, s in jobs], run_one, args.parallel)
    rows = aggregate(runs)
    (results_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (results_dir / "runs.json").write_text(json.dumps(runs, indent=2) + "\n")
    write_markdown(results_dir / "RESULTS.md", rows, runs, refused, args)
    print(f"wrote {results_dir / 'results.json'} and {results_dir / 'RESULTS.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
