"""Census-Income benchmark: every model of the core library, 3 seeds, the MMoE paper's split.

Usage: python benchmarks/census/run.py [--models mmoe ple ...] [--seeds 1 2 3] [--out DIR]
Writes results.csv (one row per run) and RESULTS.md (mean ± std per model) beside this file.
Each run uses the dataset preset (mtlrec/presets/census-income.yaml): early stopping on the
validation half, the test half read once at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mtlrec.bench.hardware import cpu_name

HERE = Path(__file__).resolve().parent
MODELS = ["single-task", "shared-bottom", "omoe", "mmoe", "cgc", "ple", "esmm", "aitm"]
PEERS = {  # measured by the author on this split, 3 seeds (test AUC income / marital)
    "torch-rechub 0.9.0 MMoE": (0.9520, 0.9949),
    "torch-rechub 0.9.0 PLE": (0.9524, 0.9949),
    "torch-rechub 0.9.0 Shared-Bottom": (0.9523, 0.9949),
    "torch-rechub 0.9.0 AITM": (0.9510, 0.9949),
    "DeepCTR-Torch 0.3.0 MMoE": (0.9491, 0.9947),
    "DeepCTR-Torch 0.3.0 PLE": (0.9497, 0.9942),
}


def run_one(model: str, seed: int, root: Path) -> dict:
    """Train one (model, seed) in its own process with one torch thread; return its row."""
    out = root / f"{model}-seed{seed}"
    cmd = [
        sys.executable, "-m", "mtlrec.cli", "train", "--dataset", "census-income",
        "--model", model, "--seed", str(seed), "--out", str(out), "--quiet",
        "--set", "train.threads=1",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    scores = json.loads((out / "metrics.json").read_text())
    metrics = scores["test"]
    history = json.loads((out / "history.json").read_text())
    epochs = history["epochs"]
    row = {
        "model": model,
        "seed": seed,
        "income_auc": metrics["income"]["auc"],
        "marital_auc": metrics["marital"]["auc"],
        "epochs_run": len(epochs),
        "best_epoch": history["best_epoch"],
        "sec_per_epoch": statistics.mean(e["seconds"] for e in epochs),
        "parameters": history["parameters"],
        "wall_seconds": wall,
        "valid_income_auc": scores["valid"]["income"]["auc"],
        "valid_marital_auc": scores["valid"]["marital"]["auc"],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--out", default=str(HERE / "runs"))
    parser.add_argument(
        "--parallel", type=int, default=2, help="runs at once (1 torch thread each)"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite RESULTS.md from results.csv"
    )
    args = parser.parse_args()
    if args.report_only:
        write_markdown(read_rows())
        return
    jobs = [(m, s) for m in args.models for s in args.seeds]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        rows = list(pool.map(lambda job: run_one(*job, Path(args.out)), jobs))
    rows = merged(read_rows(), rows)
    with (HERE / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_markdown(rows)


def read_rows() -> list[dict]:
    """The committed per-run rows of results.csv (none if it does not exist yet)."""
    path = HERE / "results.csv"
    if not path.exists():
        return []
    with path.open() as fh:
        return [
            {k: (v if k == "model" else _number(v)) for k, v in row.items()}
            for row in csv.DictReader(fh)
        ]


def _number(text: str) -> int | float:
    """Counts stay integers, so rewriting results.csv does not change the rows it keeps."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with the (model, seed) rows that ``new`` re-measured replaced, so that re-running
    some models keeps the others' rows; ordered as ``MODELS``, then by seed."""
    fresh = {(r["model"], int(r["seed"])) for r in new}
    rows = [r for r in old if (r["model"], int(r["seed"])) not in fresh] + new
    order = {m: i for i, m in enumerate(MODELS)}
    return sorted(rows, key=lambda r: (order.get(r["model"], len(order)), int(r["seed"])))


def _ms(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.5f} ± {statistics.stdev(values):.5f}"


def write_markdown(rows: list[dict]) -> None:
    lines = [
        "# Census-Income (KDD): test AUC of every core model",
        "",
        "Command: `make bench-census` (= `python benchmarks/census/run.py`), "
        "`MTLREC_DATA_DIR=../shared/data`.",
        f"Hardware: {cpu_name()}, {os.cpu_count()} cores; runs two at a time, one torch "
        "thread each (s/epoch is per process under that sharing); "
        f"Python {platform.python_version()}.",
        "Split: the MMoE paper's setup — 199,523 training rows; the 99,762-row test file split "
        "1:1 (fixed seed) into validation and test. Early stopping on mean validation AUC "
        "(patience from the preset), best epoch restored, test read once. Configuration: "
        "`mtlrec/presets/census-income.yaml` (chosen on validation AUC).",
        "",
        "The s/epoch column was measured while other jobs shared the 2 cores (load average "
        "2-4, different for rows re-run at different times), so it is inflated and only a "
        "rough guide; alone, MMoE runs about 3 s/epoch on one thread here.",
        "",
        "Every row is checked against the current code by `make bench-reproduce`, which trains "
        "the first two epochs of each of its seeds' runs again and compares them bit for bit "
        "([benchmarks/reproduce/RESULTS.md](../reproduce/RESULTS.md)). That check found that the "
        "CGC, PLE and ESMM runs no longer matched (they predated the experts' one-GEMM first "
        "layer, which also changed the order of the experts' dropout draws, and the "
        "`index_select` embedding lookup), so those rows were re-run; MMoE and OMoE were re-run "
        "after their gates and the experts' first layer moved into one GEMM. Single-task, "
        "Shared-Bottom and AITM were re-run later: their first epoch replayed for seed 1, but "
        "not for every seed, and their later epochs no longer matched: they predated commit "
        "46f9be0 (index_select lookup, fused Adam), and a two-epoch run of the same config at "
        "the commits before and after it keeps epoch 1 and moves epoch 2. "
        "`python benchmarks/census/run.py --models cgc ple esmm` "
        "re-runs just "
        "those rows and keeps the others.",
        "",
        "| model | income AUC | never-married AUC | epochs run (best) | s/epoch | parameters |",
        "|---|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        lines.append(
            f"| {model} | {_ms([r['income_auc'] for r in rs])} | "
            f"{_ms([r['marital_auc'] for r in rs])} | "
            f"{statistics.mean(r['epochs_run'] for r in rs):.1f} "
            f"({statistics.mean(r['best_epoch'] for r in rs):.1f}) | "
            f"{statistics.mean(r['sec_per_epoch'] for r in rs):.2f} | {int(rs[0]['parameters']):,} |"
        )
    lines += [
        "",
        "Mean ± sample standard deviation over seeds "
        + ", ".join(str(int(s)) for s in sorted({r["seed"] for r in rows}))
        + ". Per-run numbers: `results.csv`.",
        "",
        "Peers as reported in the issue for this setup (3 seeds each; the issue's "
        "validation/test shuffle may differ from ours; the next section measures torch-rechub on "
        "exactly our halves):",
        "",
        "| peer | income AUC | never-married AUC |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {a:.4f} | {b:.4f} |" for name, (a, b) in PEERS.items()]
    lines += measured_peers(rows)
    lines += split_sensitivity()
    lines.append("")
    (HERE / "RESULTS.md").write_text("\n".join(lines))


def measured_peers(rows: list[dict]) -> list[str]:
    """The section comparing torch-rechub measured on this very split (``peers.py`` ->
    ``peers.json``) with mtlrec, on both halves of the Census test file; empty without it."""
    path = HERE / "peers.json"
    if not path.exists():
        return []
    peers = json.loads(path.read_text())
    settings = peers["meta"]["settings"]
    lines = [
        "",
        "## torch-rechub measured here, on exactly this split",
        "",
        f"Command: `{peers['meta']['command'].strip()}` (one torch thread). torch-rechub 0.9.0's "
        "own models, trainer and the settings of its `examples/ranking/run_census.py` "
        f"(embedding dim {settings['embed_dim']}, Adam lr {settings['lr']}, weight decay "
        f"{settings['weight_decay']}, batch {settings['batch']}, {settings['epochs']} epochs, "
        "last epoch kept), fed mtlrec's encoded arrays of this split (same vocabularies, "
        "standardised numerics, no numeric buckets). Both halves of the Census test file are "
        "scored: the never-married AUC of the same model differs between the halves by about "
        "0.0003, one standard error of an AUC near 0.995 on 50k rows, which is why numbers "
        "measured on another shuffle of the halves cannot be compared to 4 decimals. The "
        "gradient-boosted trees (learning rate 0.03, 63 leaves, early stopping on 10 % of the "
        "training split; raw columns) are a strong non-neural reference for how high each half "
        "allows the AUC to go.",
        "",
        "| model | valid income | valid never-married | test income | test never-married "
        "| parameters |",
        "|---|---|---|---|---|---|",
    ]
    for p in peers["rows"]:
        gbdt = p["model"] == "hist-gbdt"
        label = "scikit-learn HistGradientBoosting, one per task" if gbdt else "torch-rechub "
        cells = [
            f"{p[f'{split}_{task}_mean']:.5f}"
            + ("" if len(p["seeds"]) < 2 else f" ± {p[f'{split}_{task}_std']:.5f}")
            for split in ("valid", "test")
            for task in ("income", "marital")
        ]
        params = "—" if gbdt else f"{p['parameters']:,}"
        lines.append(
            f"| {label if gbdt else label + p['model']} | {' | '.join(cells)} | {params} |"
        )
    for model in [p["model"] for p in peers["rows"] if p["model"] != "hist-gbdt"]:
        rs = [r for r in rows if r["model"] == model and "valid_income_auc" in r]
        if rs:
            lines.append(
                f"| mtlrec {model} | {_ms([r['valid_income_auc'] for r in rs])} | "
                f"{_ms([r['valid_marital_auc'] for r in rs])} | "
                f"{_ms([r['income_auc'] for r in rs])} | {_ms([r['marital_auc'] for r in rs])} "
                f"| {int(rs[0]['parameters']):,} |"
            )
    ahead, behind = [], []
    for p in peers["rows"]:
        rs = [r for r in rows if r["model"] == p["model"] and "valid_income_auc" in r]
        if p["model"] == "hist-gbdt" or not rs:
            continue
        ours = {
            f"{split}_{task}": statistics.mean(r[f"{prefix}{task}_auc"] for r in rs)
            for split, prefix in (("valid", "valid_"), ("test", ""))
            for task in ("income", "marital")
        }
        beaten = all(ours[k] >= p[f"{k}_mean"] for k in ours)
        (ahead if beaten else behind).append(p["model"])
    lines += [
        "",
        f"mtlrec's mean AUC is at least torch-rechub's on both halves and both tasks for: "
        f"{', '.join(ahead) or 'none'}"
        + (f"; not for: {', '.join(behind)}." if behind else ".")
        + " (mtlrec's models are the preset's, larger than torch-rechub's example sizes.)",
    ]
    return lines


def split_sensitivity() -> list[str]:
    """The section on how much a test AUC moves with the choice of half (``halves.py`` ->
    ``halves.json``): the same trained models scored on many halves; empty without it."""
    path = HERE / "halves.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    bars = data["bars"]
    lines = [
        "",
        "## How much of a test AUC is the half it was scored on",
        "",
        "Command: `python benchmarks/census/halves.py` (run by `make bench-census` after the "
        "training runs). The models above, unchanged, score the whole Census test file once; "
        "each model's AUC (mean over its seeds) is then computed on mtlrec's two halves, on the "
        "halves of keras-mmoe's census demo (`DataFrame.sample(frac=0.5, random_state=1)`), and "
        f"on {data['draws']} random halves. Only the half changes, never the model.",
        "",
        "| model | task | whole file | mtlrec valid / test half | keras-mmoe valid / test half "
        "| random halves: mean ± std | min – max | share ≥ bar |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, m in data["models"].items():
        halves = m["named halves"]
        for task in ("income", "marital"):
            r = m["random halves"][task]
            lines.append(
                f"| {model} | {'never-married' if task == 'marital' else task} "
                f"| {m['whole file'][task]:.5f} "
                f"| {halves['mtlrec validation half'][task]:.5f} / "
                f"{halves['mtlrec test half'][task]:.5f} "
                f"| {halves['keras-mmoe validation half'][task]:.5f} / "
                f"{halves['keras-mmoe test half'][task]:.5f} "
                f"| {r['mean']:.5f} ± {r['std']:.5f} | {r['min']:.5f} – {r['max']:.5f} "
                f"| {r['share at or above bar']:.0%} (≥ {bars[task]}) |"
            )
    mmoe = data["models"].get("mmoe")
    if mmoe:
        r = mmoe["random halves"]["marital"]
        lines += [
            "",
            f"Reading: the same MMoE scores between {r['min']:.4f} and {r['max']:.4f} "
            f"never-married AUC depending only on the half (std {r['std']:.5f}); "
            f"{r['share at or above bar']:.0%} of random halves reach the issue's "
            f"{bars['marital']} bar, and its whole-file AUC is "
            f"{mmoe['whole file']['marital']:.5f}. A 4-decimal comparison of test AUCs is only "
            "meaningful on the same half, which is why the section above measures the peers on "
            "ours.",
        ]
    return lines


if __name__ == "__main__":
    main()
