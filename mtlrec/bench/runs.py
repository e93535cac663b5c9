"""Training runs for the benchmark scripts: train-or-reuse one run, run many in parallel.

Why: the zoo and balancer benchmarks both launch hundreds of ``mtlrec train`` processes, reuse
finished ones, resume interrupted ones and stop early when every run fails the same way; one
implementation keeps their behaviour identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from mtlrec.errors import make_dir


def use_shared_data(repo: Path) -> None:
    """Point ``MTLREC_DATA_DIR`` at ``repo/../shared/data`` unless it is set or that folder is
    missing, as the Makefile and the tests do."""
    shared = repo.parent / "shared" / "data"
    if "MTLREC_DATA_DIR" not in os.environ and shared.is_dir():
        os.environ["MTLREC_DATA_DIR"] = str(shared)


def train_or_reuse(
    out: Path,
    command: Sequence[str],
    row: dict[str, Any],
    force: bool = False,
    train: bool = True,
    threads: int = 1,
) -> dict[str, Any]:
    """Run ``command`` (an ``mtlrec train ... --out OUT --resume``) unless ``OUT/metrics.json``
    exists; return ``row`` extended with status, split, per-task AUC, parameters, epochs and
    seconds per epoch. ``threads`` intra-op threads per process (the benchmarks: one, so
    ``--parallel K`` uses K cores).
    ``train=False`` only reads finished runs (status "not run" for the others), to report a
    benchmark that was stopped part-way."""
    if force and out.exists():
        shutil.rmtree(out)
    wall = None
    if not (out / "metrics.json").exists() and not train:
        return {**row, "status": "not run"}
    if not (out / "metrics.json").exists():
        make_dir(out, "--out")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        started = time.perf_counter()
        with (out / "train.log").open("w") as log:
            proc = subprocess.run(list(command), stdout=log, stderr=subprocess.STDOUT, env=env)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            tail = (out / "train.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
            return {**row, "status": f"failed (exit {proc.returncode}): {tail[0]}"}
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "history.json").read_text())
    epochs = history.get("epochs") or []
    split = "test" if metrics.get("test") else "valid"
    return {
        **row,
        "status": "ok",
        "split": split,
        "auc": {t: m.get("auc") for t, m in metrics[split].items()},
        "parameters": history.get("parameters"),
        "epochs_run": len(epochs),
        "best_epoch": history.get("best_epoch"),
        "seconds_per_epoch": statistics.mean(e["seconds"] for e in epochs) if epochs else None,
        "wall_seconds": wall,
    }


def run_all(
    jobs: Sequence[tuple],
    run: Callable[..., dict[str, Any]],
    parallel: int,
    line: Callable[[dict[str, Any]], str] = json.dumps,
) -> list[dict[str, Any]]:
    """``run(*job)`` for every job, ``parallel`` at a time, one progress line per finished run on
    stderr (``line(row)``); stops early when the first runs all fail (the same mistake would fail
    the rest). Returns the rows in job order (a cancelled job has none)."""
    started = time.perf_counter()
    rows: dict[int, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(run, *job): i for i, job in enumerate(jobs)}
        for done, future in enumerate(as_completed(futures), 1):
            row = future.result()
            rows[futures[future]] = row
            print(
                f"[{done}/{len(jobs)} {time.perf_counter() - started:,.0f}s] {line(row)}",
                file=sys.stderr,
                flush=True,
            )
            failed = sum(r["status"].startswith("failed") for r in rows.values())
            if failed >= max(2, parallel) and failed == len(rows):
                for f in futures:
                    f.cancel()
                print("stopping: every run so far failed (see above)", file=sys.stderr)
                break
    return [rows[i] for i in sorted(rows)]


def train_command(
    dataset: str,
    model: str,
    seed: int,
    out: Path,
    epochs: int | None = None,
    max_rows: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``mtlrec train`` command of one benchmark run: one torch thread (``--parallel K``
    then uses K cores), quiet, resumable; ``extra`` arguments (``--balance B``, ``--set k=v``)
    before the caps."""
    cmd = [
        sys.executable, "-m", "mtlrec.cli", "train", "--dataset", dataset, "--model", model,
        "--seed", str(seed), "--out", str(out), "--quiet", "--set", "train.threads=1", "--resume",
        *extra,
    ]  # fmt: skip
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    if max_rows is not None:
        cmd += ["--max-rows", str(max_rows)]
    return cmd


def mean_std(mean: float | None, std: float | None) -> str:
    """A table cell: ``mean ± std`` to 4 decimals, the mean alone without a spread, ``-`` when
    there is no value."""
    if mean is None:
        return "-"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def census_setup(models_block: bool, epochs: int | None, max_rows: int | None) -> str:
    """The "Setup:" sentence of a Census-Income benchmark's RESULTS.md."""
    sizes = ", model sizes from its `models:` block, defaults otherwise" if models_block else ""
    return (
        f"Setup: the dataset preset (mtlrec/presets/census-income.yaml{sizes}), the MMoE paper's "
        "split, early stopping on mean validation AUC, best epoch restored, test split read once"
        + (f"; epochs capped at {epochs}" if epochs else "")
        + (f"; at most {max_rows} rows per split" if max_rows else "")
        + "."
    )


def shown_arguments(argv: list[str]) -> list[str]:
    """The command-line arguments that change results, for the command printed in RESULTS.md:
    folder options (machine-specific paths), ``--note`` lines and ``--report-only`` (which only
    re-renders) are left out."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--results-dir", "--runs-dir", "--note"):
            skip = True
        elif arg != "--report-only" and not arg.startswith(
            ("--results-dir=", "--runs-dir=", "--note=")
        ):
            shown.append(arg)
    return shown


def add_run_options(parser: argparse.ArgumentParser, results_dir: Path) -> None:
    """The options every Census-Income run benchmark takes (seeds, caps, parallelism, folders)."""
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--max-rows", type=int, default=None, help="cap rows per split (checks)")
    parser.add_argument("--parallel", type=int, default=1, help="training processes at once")
    parser.add_argument("--results-dir", type=Path, default=results_dir, help="where results go")
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: RESULTS_DIR/runs")
    parser.add_argument("--force", action="store_true", help="retrain runs that already exist")
    parser.add_argument("--note", action="append", default=[], help="a line for RESULTS.md")
