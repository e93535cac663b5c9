"""Sequence-aware models on MovieLens-100K: do the users' histories pay off, and for which model?

Why: ``movielens-100k`` gives every rating the user's earlier liked and other movies as two
history sequences that share the ``movie`` vocabulary. Models that pool a history into one mean
vector (Shared-Bottom, MMoE: the library's default treatment of a sequence feature) are compared
with models that read it item by item: DMT (a Transformer per history, the candidate movie
attending over it) and MoSE (LSTM experts over the history followed by the current row). Same
split (chronological 80/10/10), same preset (``mtlrec/presets/movielens-100k.yaml``), same seeds,
one torch thread per run.

Usage::

    python benchmarks/sequence/run.py --parallel 2        # 4 models x seeds 1 2 3
    python benchmarks/sequence/run.py --models mmoe dmt --seeds 1 --epochs 1 --max-rows 3000 \
        --results-dir /tmp/seq                            # a quick end-to-end check

Each run is ``python -m mtlrec.cli train --dataset movielens-100k --model M --seed S --out
RUNS/M-seedS --quiet --set train.threads=1 --resume``; a finished run is reused and an interrupted
one resumes (``--force`` retrains). Reported per model (mean ± sample std over seeds, test split,
best validation epoch restored): ``like`` AUC and log loss, ``rating`` MSE, parameters, seconds
per epoch. Writes ``results.json``, ``runs.json`` and ``RESULTS.md`` into ``--results-dir``
(default: this folder).
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
    mean_std,
    run_all,
    shown_arguments,
    train_command,
    train_or_reuse,
    use_shared_data,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATASET = "movielens-100k"
MODELS = ["shared-bottom", "mmoe", "dmt", "mose"]
# (task, metric, higher is better) in table order
COLUMNS = [("like", "auc", True), ("like", "logloss", False), ("rating", "mse", False)]


def run_one(model: str, seed: int, args: argparse.Namespace, runs_dir: Path) -> dict[str, Any]:
    """Train (or reuse) one run; its row adds every test metric to ``train_or_reuse``'s."""
    out = runs_dir / f"{model}-seed{seed}"
    row: dict[str, Any] = {"model": model, "seed": seed, "run": str(out)}
    command = train_command(DATASET, model, seed, out, args.epochs, args.max_rows)
    row = train_or_reuse(out, command, row, force=args.force)
    if row["status"] == "ok":
        metrics = json.loads((out / "metrics.json").read_text())
        row["metrics"] = metrics[row["split"]]
        row["valid_like_auc"] = metrics["valid"]["like"]["auc"]
    return row


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: mean and sample standard deviation over seeds of every reported metric."""
    rows = []
    ok = [r for r in runs if r["status"] == "ok"]
    for model in dict.fromkeys(r["model"] for r in ok):
        group = [r for r in ok if r["model"] == model]
        secs = [r["seconds_per_epoch"] for r in group if r["seconds_per_epoch"] is not None]
        row: dict[str, Any] = {
            "model": model,
            "seeds": sorted(r["seed"] for r in group),
            "parameters": group[0]["parameters"],
            "seconds_per_epoch": statistics.mean(secs) if secs else None,
            "epochs_run": statistics.mean(r["epochs_run"] for r in group),
        }
        valid = [r["valid_like_auc"] for r in group if r.get("valid_like_auc") is not None]
        row["valid_like_auc_mean"] = statistics.mean(valid) if valid else None
        for task, metric, _ in COLUMNS:
            values = [r["metrics"][task][metric] for r in group if task in r["metrics"]]
            row[f"{task}_{metric}_mean"] = statistics.mean(values) if values else None
            row[f"{task}_{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


def constant_baseline(max_rows: int | None) -> dict[str, float]:
    """Test metrics of predicting the training split's like rate and mean rating for every row:
    the floor every model must clear."""
    import numpy as np

    from mtlrec.data.datasets import load_dataset

    splits = load_dataset(DATASET, max_rows=max_rows)
    rate = float(splits.train["like"].mean())
    mean = float(splits.train["rating"].mean())
    like = splits.test["like"].to_numpy(dtype=float)
    logloss = -float(np.mean(like * np.log(rate) + (1 - like) * np.log(1 - rate)))
    mse = float(np.mean((splits.test["rating"].to_numpy(dtype=float) - mean) ** 2))
    return {"like_logloss": logloss, "rating_mse": mse}


def write_markdown(
    path: Path,
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    baseline: dict[str, float],
    args: argparse.Namespace,
) -> None:
    from mtlrec.bench.hardware import describe

    command = "python benchmarks/sequence/run.py " + shlex.join(shown_arguments(sys.argv[1:]))
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        "# MovieLens-100K: models that read the users' histories",
        "",
        f"Command: `{command.strip()}` with `MTLREC_DATA_DIR` set to the shared data folder "
        f"({date.today().isoformat()}).",
        f"Hardware: {describe()}; one torch thread per training process, {args.parallel} "
        "process(es) at a time.",
        "Setup: `movielens-100k` (chronological 80/10/10 split; `liked_history` and "
        "`other_history`, the user's 20 most recent earlier movies rated >= 4 and <= 3, sharing "
        "the `movie` vocabulary), the preset `mtlrec/presets/movielens-100k.yaml`, early stopping "
        "on validation `like` AUC, best epoch restored, test split read once"
        + (f"; epochs capped at {args.epochs}" if args.epochs else "")
        + (f"; at most {args.max_rows} rows per split" if args.max_rows else "")
        + ".",
        "",
        "| model | like AUC | like log loss | rating MSE | valid like AUC | parameters | s/epoch "
        "| epochs run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: -(r["like_auc_mean"] or 0.0)):
        cells = " | ".join(
            mean_std(row[f"{t}_{m}_mean"], row[f"{t}_{m}_std"]) for t, m, _ in COLUMNS
        )
        secs = row["seconds_per_epoch"]
        lines.append(
            f"| {row['model']} | {cells} | {mean_std(row['valid_like_auc_mean'], None)} | "
            f"{row['parameters']:,} | "
            f"{'-' if secs is None else f'{secs:.1f}'} | {row['epochs_run']:.1f} |"
        )
    lines.append(
        f"| constant (training like rate, mean rating) | 0.5 | {baseline['like_logloss']:.4f} | "
        f"{baseline['rating_mse']:.4f} | 0.5 | 2 | - | - |"
    )
    lines += [
        "",
        f"Mean ± sample standard deviation over seeds {', '.join(map(str, seeds))} (test split; "
        "valid like AUC: the mean over seeds of the best epoch's validation AUC, which chose it). "
        "The constant row predicts the training split's like rate and mean rating for every test "
        "row (computed by this script). s/epoch: training seconds per epoch with "
        f"{args.parallel} process(es) sharing the machine; epochs run: mean over seeds.",
    ]
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {r['model']} / seed {r['seed']}: {r['status']}" for r in failed]
    if args.note:
        lines += ["", "## Notes", "", *(f"- {note}" for note in args.note)]
    lines += [
        "",
        "Per-run numbers: `runs.json`; run folders are not committed (`make bench-reproduce` "
        "re-checks every run from its committed fingerprint).",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=MODELS)
    add_run_options(parser, HERE)
    args = parser.parse_args()
    if args.parallel < 1:
        parser.error("--parallel must be >= 1")
    use_shared_data(REPO)
    results_dir = args.results_dir.resolve()
    runs_dir = (args.runs_dir or results_dir / "runs").resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(m, s, args, runs_dir) for m in args.models for s in args.seeds]
    print(f"{len(jobs)} runs, {args.parallel} at a time, into {runs_dir}", file=sys.stderr)
    runs = run_all(jobs, run_one, args.parallel)
    rows = aggregate(runs)
    baseline = constant_baseline(args.max_rows)
    (results_dir / "results.json").write_text(
        json.dumps({"models": rows, "constant": baseline}, indent=2) + "\n"
    )
    (results_dir / "runs.json").write_text(json.dumps(runs, indent=2) + "\n")
    write_markdown(results_dir / "RESULTS.md", rows, runs, baseline, args)
    print(f"wrote {results_dir / 'results.json'} and {results_dir / 'RESULTS.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
