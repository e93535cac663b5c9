"""How much of a Census-Income test AUC is the model, and how much the half it was scored on?

Why: the MMoE setup splits the 99,762-row Census test file 1:1 into validation and test "with a
fixed seed", and every reproduction picks its own shuffle. The issue's 0.995 never-married bar and
its peer figures come from another shuffle than ours. This script takes the models that
``run.py`` trained (``runs/<model>-seed<N>``, unchanged), scores the whole test file once, and
computes each model's AUC (mean over its seeds) on

* mtlrec's validation and test halves (``census_halves``, what the dataset loader uses),
* the halves of keras-mmoe's census demo, the best-known public reproduction of the paper
  (``DataFrame.sample(frac=0.5, random_state=1)`` is its validation half),
* 200 further random halves (numpy seed 0),

so the spread of "test AUC" that comes from the choice of half alone is measured, with the
models held fixed. Writes ``halves.json``; ``run.py --report-only`` renders it into RESULTS.md.

Usage: python benchmarks/census/halves.py [--runs DIR] [--draws 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from mtlrec.train.metrics import auc

HERE = Path(__file__).resolve().parent
TASKS = ("income", "marital")
BARS = {"income": 0.952, "marital": 0.995}  # the test-AUC bars for MMoE


def score_runs(runs: Path, frame) -> dict[str, list[np.ndarray]]:
    """{model: [[N, T] predictions of each seed's run]} over the whole test file."""
    from mtlrec.train.run import load_run
    from mtlrec.train.trainer import predict

    scores: dict[str, list[np.ndarray]] = {}
    for run_dir in sorted(runs.glob("*-seed*")):
        if not (run_dir / "metrics.json").exists():
            continue  # an unfinished run
        _, encoder, model = load_run(run_dir)
        cond, _ = predict(model, encoder.transform(frame), 8192)
        scores.setdefault(run_dir.name.rsplit("-seed", 1)[0], []).append(cond.numpy())
    return scores


def half_auc(labels: np.ndarray, preds: list[np.ndarray], rows: np.ndarray) -> list[float]:
    """Per task: the mean over seeds of the AUC on ``rows``."""
    return [
        statistics.mean(auc(labels[rows, t], p[rows, t]) for p in preds) for t in range(len(TASKS))
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(HERE / "runs"))
    parser.add_argument("--draws", type=int, default=200, help="random halves")
    parser.add_argument("--out", default=str(HERE / "halves.json"))
    args = parser.parse_args(argv)

    from mtlrec.data.datasets.census import census_halves, read_census

    frame = read_census("test")
    labels = frame[list(TASKS)].to_numpy()
    scores = score_runs(Path(args.runs), frame)
    if not scores:
        raise SystemExit(f"no finished runs under {args.runs}: run benchmarks/census/run.py")
    rows = len(frame)
    ours_valid, ours_test = census_halves(rows)
    keras_valid = frame.sample(frac=0.5, replace=False, random_state=1).index.to_numpy()
    named = {
        "mtlrec validation half": ours_valid,
        "mtlrec test half": ours_test,
        "keras-mmoe validation half": keras_valid,
        "keras-mmoe test half": np.setdiff1d(np.arange(rows), keras_valid),
    }
    rng = np.random.default_rng(0)
    draws = [rng.permutation(rows)[: rows // 2] for _ in range(args.draws)]
    every = np.arange(rows)
    result = {"rows": rows, "draws": args.draws, "bars": BARS, "models": {}}
    for model, preds in scores.items():
        random_aucs = np.array([half_auc(labels, preds, d) for d in draws])  # [draws, T]
        result["models"][model] = {
            "seeds": len(preds),
            "whole file": dict(zip(TASKS, half_auc(labels, preds, every))),
            "named halves": {
                name: dict(zip(TASKS, half_auc(labels, preds, idx))) for name, idx in named.items()
            },
            "random halves": {
                task: {
                    "mean": float(random_aucs[:, t].mean()),
                    "std": float(random_aucs[:, t].std(ddof=1)),
                    "min": float(random_aucs[:, t].min()),
                    "max": float(random_aucs[:, t].max()),
                    "share at or above bar": float((random_aucs[:, t] >= BARS[task]).mean()),
                }
                for t, task in enumerate(TASKS)
            },
        }
        print(model, json.dumps(result["models"][model]["random halves"]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
