"""Cascade / selection-bias benchmark: CVR over the entire space, where the truth is known.

On ``synthetic-funnel`` every test impression carries its true post-click conversion probability
(``true_cvr``), so a CVR model can be scored on *all* impressions, not only on the clicked ones it
was trained on; ``--biases`` sets how strongly clicks select the likely buyers. On ``coat`` the test
ratings were collected on randomly chosen items, so "liked" metrics there are unbiased.

Models: ``naive`` is ``shared-bottom`` with the base class's default loss, i.e. the CVR loss on
clicked rows only (the conventional estimator; no new model is needed for it), then ``esmm``,
``esm2``, ``aitm``, ``multi-ipw``, ``multi-dr``, ``escm2``, ``dbmtl``, ``apem`` with their defaults.
``esm2`` needs a post-click D-action task: synthetic-funnel has one (cart), coat has none, so it is
skipped there (and says so).

Metrics (test split, best validation epoch restored):
  synthetic-funnel, purchase task:
    cvr_auc_clicked  AUC of pCVR against the purchase label on clicked rows (what logs can measure)
    cvr_auc_all      AUC of pCVR against the truth on ALL impressions: each impression counts as a
                     positive with weight true_cvr and as a negative with weight 1 - true_cvr (the
                     expected AUC if conversions were drawn from the true probabilities)
    cvr_bias_all     mean(pCVR) - mean(true_cvr) over ALL impressions (signed calibration error;
                     "bias" below means its absolute value)
    cvr_mae_all      mean |pCVR - true_cvr| over ALL impressions
    ctcvr_auc        AUC of pCTCVR (joint) against click & purchase over all impressions
  coat, liked task on the 4,640 random-exposure test ratings:
    liked_auc        AUC of P(liked | exposed)
    ndcg5            NDCG@5 per user over the user's 16 test items, relevance = liked (binary),
                     averaged over users with at least one liked test item

Usage (library API: ``train_run`` -> ``load_run`` -> ``trainer.predict``):
  python benchmarks/cascade/run.py                      # full: 3 biases x 3 seeds x 9 models + coat
  python benchmarks/cascade/run.py --models naive esmm --biases 0 1 --seeds 1 --epochs 1 \
      --n-train 20000 --results-dir /tmp/cascade        # a tiny check
Each run's numbers are kept in <results-dir>/runs/<run>/bench.json and reused on a rerun (so an
interrupted benchmark resumes); ``--rerun`` retrains. Writes results.json and RESULTS.md into
--results-dir (default: this folder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from mtlrec.bench.hardware import cpu_name, usable_cpus

HERE = Path(__file__).resolve().parent
MODELS = ["naive", "esmm", "esm2", "aitm", "multi-ipw", "multi-dr", "escm2", "dbmtl", "apem"]
LIBRARY_NAME = {"naive": "shared-bottom"}
ENTIRE_SPACE = ["esmm", "esm2", "aitm", "escm2", "apem"]  # supervise entire-space probabilities
CAUSAL = ["multi-ipw", "multi-dr", "escm2"]  # propensity-weighted CVR losses
NEEDS_DACTION = {"esm2"}
DATASETS = ["synthetic-funnel", "coat"]
TREND_TOL = 0.005  # calibration-gap differences smaller than this count as "the same"


# --- metrics --------------------------------------------------------------------------------------


def _auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    from sklearn.metrics import roc_auc_score

    if labels.size == 0 or labels.min() == labels.max():
        return math.nan
    return float(roc_auc_score(labels, scores, sample_weight=weights))


def auc_against_truth(truth: np.ndarray, scores: np.ndarray) -> float:
    """Expected AUC when each row converts with probability ``truth``: every row enters once as a
    positive weighted ``truth`` and once as a negative weighted ``1 - truth``."""
    n = len(truth)
    labels = np.r_[np.ones(n), np.zeros(n)]
    return _auc(labels, np.r_[scores, scores], np.r_[truth, 1.0 - truth])


def ndcg_at(k: int, users: np.ndarray, relevance: np.ndarray, scores: np.ndarray) -> float:
    """Mean NDCG@k over users with at least one relevant item (binary gains, log2 discounts)."""
    values = []
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    for user in np.unique(users):
        rows = users == user
        rel, s = relevance[rows], scores[rows]
        if rel.sum() == 0:
            continue
        top = rel[np.argsort(-s, kind="stable")][:k]
        ideal = np.sort(rel)[::-1][:k]
        values.append(
            float((top * discounts[: len(top)]).sum() / (ideal * discounts[: len(ideal)]).sum())
        )
    return float(np.mean(values)) if values else math.nan


# --- one run --------------------------------------------------------------------------------------


def dataset_section(dataset: str, bias: float | None, n_train: int) -> dict[str, Any]:
    if dataset == "synthetic-funnel":
        n_rest = max(1, n_train // 4)
        return {
            "name": dataset,
            "bias": bias,
            "n_train": n_train,
            "n_valid": n_rest,
            "n_test": n_rest,
            "data_seed": 0,
        }
    return {"name": dataset}


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (dataset, bias, model, seed), reload the best model, score the test split."""
    import torch

    from mtlrec.config import resolve
    from mtlrec.data.datasets import load_dataset
    from mtlrec.train.run import load_run, train_run
    from mtlrec.train.trainer import predict

    torch.set_num_threads(1)
    out = Path(job["out"])
    cached = out / "bench.json"
    if cached.exists() and not job["rerun"]:
        return json.loads(cached.read_text())
    section = dataset_section(job["dataset"], job["bias"], job["n_train"])
    config = resolve(
        {
            "dataset": section,
            "model": {"name": LIBRARY_NAME.get(job["model"], job["model"])},
            "train": {
                "epochs": job["epochs"],
                "seed": job["seed"],
                "threads": 1,
                "progress": False,
                "patience": 2,
            },
            "balance": {"name": "fixed"},
        }
    )
    started = time.perf_counter()
    train_run(config, out, echo=lambda *_: None)
    train_seconds = time.perf_counter() - started
    _, encoder, model = load_run(out)
    options = {k: v for k, v in section.items() if k != "name"}
    splits = load_dataset(section["name"], seed=job["seed"], **options)
    test = splits.test  # the encoder keeps row order, so frame rows align with predictions
    cond, joint = predict(model, encoder.transform(test), 16384)
    cond, joint = cond.double().numpy(), joint.double().numpy()
    names = encoder.schema.task_names
    row: dict[str, Any] = {k: job[k] for k in ("dataset", "bias", "model", "seed")}
    if job["dataset"] == "synthetic-funnel":
        t, up = names.index("purchase"), names.index("click")
        truth = test["true_cvr"].to_numpy()
        clicked = test["click"].to_numpy() == 1
        purchase = test["purchase"].to_numpy()
        p = cond[:, t]
        row.update(
            cvr_auc_clicked=_auc(purchase[clicked], p[clicked]),
            cvr_auc_all=auc_against_truth(truth, p),
            cvr_bias_all=float(p.mean() - truth.mean()),
            cvr_mae_all=float(np.abs(p - truth).mean()),
            ctcvr_auc=_auc(purchase, joint[:, t]),
            ctr_auc=_auc(clicked.astype(float), cond[:, up]),
            true_cvr_mean=float(truth.mean()),
            true_cvr_mean_clicked=float(truth[clicked].mean()),
        )
    else:
        t = names.index("liked")
        liked = test["liked"].to_numpy()
        row.update(
            liked_auc=_auc(liked, cond[:, t]),
            ndcg5=ndcg_at(5, test["user"].to_numpy(), liked, cond[:, t]),
        )
    history = json.loads((out / "history.json").read_text())
    row.update(
        epochs_run=len(history["epochs"]),
        best_epoch=history["best_epoch"],
        parameters=history["parameters"],
        train_seconds=train_seconds,
        wall_seconds=time.perf_counter() - started,
    )
    row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    cached.write_text(json.dumps(row, indent=2))
    (out / "checkpoint.pt").unlink(missing_ok=True)  # the numbers are kept; save the disk
    return row


# --- summaries ------------------------------------------------------------------------------------


def _mean(values: list[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return statistics.mean(vals) if vals else math.nan


def _ms(values: list[float | None], digits: int = 4) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) < 2:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean per (dataset, bias, model) of every metric."""
    out: dict[str, Any] = {}
    keys = sorted({(r["dataset"], r["bias"], r["model"]) for r in rows}, key=str)
    for dataset, bias, model in keys:
        rs = [r for r in rows if (r["dataset"], r["bias"], r["model"]) == (dataset, bias, model)]
        metrics = [k for k in rs[0] if k not in ("dataset", "bias", "model", "seed")]
        label = f"{dataset}|bias={bias}" if bias is not None else dataset
        out.setdefault(label, {})[model] = {m: _mean([r.get(m) for r in rs]) for m in metrics}
        out[label][model]["seeds"] = len(rs)
    return out


def bias_statement(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Does supervising over the entire space (or reweighting) shrink the naive model's
    calibration gap on all impressions, more so as selection bias grows? Computed, not asserted:
    per bias level, the naive model's |mean(pCVR) - mean(true_cvr)| (mean over seeds) against the
    group's median model; "yes" when the median is lower at the strongest bias and the reduction
    grows with the bias (or stays the same within ``TREND_TOL``), "partly" when it is lower at the
    strongest bias but the reduction shrinks or wanders, else "no"."""
    synth = [r for r in rows if r["dataset"] == "synthetic-funnel"]
    biases = sorted({r["bias"] for r in synth})
    models = {r["model"] for r in synth}
    if "naive" not in models or not biases:
        return "Not computed: the synthetic runs need the naive model.", {}

    def abs_bias(model: str, b: float) -> float:
        return _mean(
            [abs(r["cvr_bias_all"]) for r in synth if r["model"] == model and r["bias"] == b]
        )

    numbers: dict[str, Any] = {}
    lines = []
    for group_name, group in (("entire-space", ENTIRE_SPACE), ("causal", CAUSAL)):
        present = [m for m in group if m in models]
        if not present:
            continue
        reductions = []
        parts = []
        for b in biases:
            naive = abs_bias("naive", b)
            per_model = {m: abs_bias(m, b) for m in present}
            group_median = statistics.median(per_model.values())
            better = sum(v < naive for v in per_model.values())
            reductions.append(naive - group_median)
            numbers.setdefault(group_name, {})[str(b)] = {
                "naive_abs_bias": naive,
                "group_median_abs_bias": group_median,
                "models_below_naive": better,
                "models": per_model,
            }
            parts.append(
                f"bias {b:g}: naive {naive:.4f} vs {group_median:.4f} ({better}/{len(present)} "
                "models lower)"
            )
        r = reductions
        steady = all(b2 >= b1 - TREND_TOL for b1, b2 in zip(r, r[1:]))
        if r[-1] <= 0:
            verdict, trend = "no", ""
        elif len(r) < 2:
            verdict, trend = "yes", ""
        elif steady and r[-1] - r[0] > TREND_TOL:
            verdict, trend = "yes", ", and the reduction grows with the bias"
        elif abs(r[-1] - r[0]) <= TREND_TOL and min(r) > 0:
            verdict, trend = "yes", f", by about the same amount at every bias (within {TREND_TOL})"
        else:
            verdict, trend = (
                "partly",
                (": lower at the strongest bias, but the reduction does not grow steadily with it"),
            )
        lines.append(
            f"- **{group_name} models ({', '.join(present)}) reduce the naive model's |mean(pCVR) - "
            f"mean(true CVR)| over all impressions: {verdict}**{trend}. Absolute calibration gap "
            "(mean over seeds), naive vs the group's median model: " + "; ".join(parts) + "."
        )
    return "\n".join(lines), numbers


# --- environment --------------------------------------------------------------------------------


# --- report ---------------------------------------------------------------------------------------


def write_report(results_dir: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    statement, numbers = bias_statement(rows)
    payload = {**meta, "statement": statement, "bias_numbers": numbers}
    payload["summary"] = summarise(rows)
    payload["runs"] = rows
    (results_dir / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    lines = [
        "# Cascade / selection-bias benchmark",
        "",
        f"Command: `{meta['command']}`",
        f"Hardware: {meta['cpu']}, {meta['nproc']} CPUs available (nproc), torch 1 thread per run, "
        f"{meta['parallel']} run(s) in parallel; Python {platform.python_version()}, "
        f"torch {meta['torch']}. Total wall time {meta['wall_seconds'] / 60:.1f} min.",
        f"Training: at most {meta['epochs']} epochs, batch 1024, Adam lr 1e-3, early stopping on "
        "mean validation AUC (patience 2), best epoch restored, test split read once. Seeds: "
        f"{', '.join(map(str, meta['seeds']))}. Every model with its default options; `naive` is "
        "`shared-bottom` trained with the default masked loss (CVR loss on clicked rows only).",
        "",
        "## Does the entire space help as selection bias grows?",
        "",
        statement,
        "",
    ]
    synth = [r for r in rows if r["dataset"] == "synthetic-funnel"]
    if synth:
        lines += [
            "## synthetic-funnel (click -> cart / purchase, known true CVR per impression)",
            "",
            f"{meta['n_train']:,} training impressions, {max(1, meta['n_train'] // 4):,} "
            "validation and test impressions (data_seed 0). pCVR is P(purchase | click) from each "
            "model; 'all' columns score it on every test impression against `true_cvr` "
            "(AUC: each impression is a positive with weight true_cvr and a negative with weight "
            "1 - true_cvr; bias: mean(pCVR) - mean(true_cvr), signed; MAE: mean |pCVR - true_cvr|).",
            "",
        ]
        for b in sorted({r["bias"] for r in synth}):
            rs = [r for r in synth if r["bias"] == b]
            truth_all = _mean([r["true_cvr_mean"] for r in rs])
            truth_clk = _mean([r["true_cvr_mean_clicked"] for r in rs])
            lines += [
                f"### bias = {b:g} (true CVR: {truth_all:.4f} over all test impressions, "
                f"{truth_clk:.4f} over clicked ones)",
                "",
                "| model | CVR AUC (clicked) | CVR AUC (all, vs truth) | CVR bias (all) | "
                "CVR MAE (all) | CTCVR AUC | epochs (best) | s/run |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for model in [m for m in MODELS if any(r["model"] == m for r in rs)]:
                mr = [r for r in rs if r["model"] == model]
                lines.append(
                    f"| {model} | {_ms([r['cvr_auc_clicked'] for r in mr])} | "
                    f"{_ms([r['cvr_auc_all'] for r in mr])} | "
                    f"{_ms([r['cvr_bias_all'] for r in mr])} | "
                    f"{_ms([r['cvr_mae_all'] for r in mr])} | "
                    f"{_ms([r['ctcvr_auc'] for r in mr])} | "
                    f"{_mean([r['epochs_run'] for r in mr]):.1f} "
                    f"({_mean([r['best_epoch'] for r in mr]):.1f}) | "
                    f"{_mean([r['wall_seconds'] for r in mr]):.0f} |"
                )
            lines.append("")
    coat = [r for r in rows if r["dataset"] == "coat"]
    if coat or "coat" in meta["datasets"]:
        lines += [
            "## coat (exposed -> liked; random-exposure test ratings)",
            "",
            "Trained on the 87,000 user-item pairs of the self-selected training matrix (10 % of "
            "pairs held out for validation), tested on the 4,640 ratings of randomly chosen items. "
            "NDCG@5 per user over the user's 16 test items (relevance: rating >= 4), averaged over "
            "users with at least one liked test item.",
            "",
            "| model | liked AUC | NDCG@5 | epochs (best) | s/run |",
            "|---|---|---|---|---|",
        ]
        for model in [m for m in MODELS if any(r["model"] == m for r in coat)]:
            mr = [r for r in coat if r["model"] == model]
            lines.append(
                f"| {model} | {_ms([r['liked_auc'] for r in mr])} | {_ms([r['ndcg5'] for r in mr])} "
                f"| {_mean([r['epochs_run'] for r in mr]):.1f} "
                f"({_mean([r['best_epoch'] for r in mr]):.1f}) | "
                f"{_mean([r['wall_seconds'] for r in mr]):.0f} |"
            )
        for model in meta.get("skipped", {}).get("coat", []):
            lines.append(f"| {model} | skipped: coat has no post-click D-action task | | | |")
        lines.append("")
    lines += [
        "Mean ± sample standard deviation over seeds; per-run numbers in `results.json` (`runs`).",
        "",
    ]
    (results_dir / "RESULTS.md").write_text("\n".join(lines))


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--biases", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (1 thread each)")
    parser.add_argument("--results-dir", default=str(HERE))
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    parser.add_argument("--n-train", type=int, default=200_000, help="synthetic training rows")
    parser.add_argument("--rerun", action="store_true", help="retrain runs that have numbers")
    args = parser.parse_args(argv)
    os.environ.setdefault("MTLREC_DATA_DIR", str(HERE.parents[2] / "shared" / "data"))
    results_dir = Path(args.results_dir).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)

    jobs, skipped = [], {}
    for dataset in args.datasets:
        for bias in args.biases if dataset == "synthetic-funnel" else [None]:
            for model in args.models:
                if dataset == "coat" and model in NEEDS_DACTION:
                    skipped.setdefault("coat", []).append(model)
                    continue
                for seed in args.seeds:
                    tag = f"{dataset}-bias{bias:g}" if bias is not None else dataset
                    jobs.append(
                        {
                            "dataset": dataset,
                            "bias": bias,
                            "model": model,
                            "seed": seed,
                            "epochs": args.epochs,
                            "n_train": args.n_train,
                            "rerun": args.rerun,
                            "out": str(results_dir / "runs" / f"{tag}-{model}-seed{seed}"),
                        }
                    )
    started = time.perf_counter()
    rows = []
    if args.parallel > 1:
        with ProcessPoolExecutor(max_workers=args.parallel) as pool:
            futures = [pool.submit(run_one, job) for job in jobs]
            for fut in as_completed(futures):
                rows.append(fut.result())
                print(json.dumps(rows[-1]), flush=True)
    else:
        for job in jobs:
            rows.append(run_one(job))
            print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda r: (r["dataset"], str(r["bias"]), MODELS.index(r["model"]), r["seed"]))
    import torch

    meta = {
        "command": "python benchmarks/cascade/run.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "cpu": cpu_name(),
        "nproc": usable_cpus(),
        "parallel": args.parallel,
        "torch": torch.__version__,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "biases": args.biases,
        "n_train": args.n_train,
        "datasets": args.datasets,
        "models": args.models,
        "skipped": skipped,
        "wall_seconds": time.perf_counter() - started,
    }
    write_report(results_dir, rows, meta)
    print(f"wrote {results_dir / 'results.json'} and {results_dir / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
