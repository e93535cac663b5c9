"""Do the committed benchmark results still reproduce with the current code?

Why: every table under benchmarks/ is made of training runs (config, seed, per-epoch history).
When the code changes what training computes (a fused kernel, another summation order, a new
initialisation), the committed numbers can no longer be reproduced with their own command, and
nothing says so. The run folders themselves are not committed (checkpoints are large), so
``--record`` stores every finished run's fingerprint in ``fingerprints.json``: its resolved
config and, per epoch of its first ``--epochs`` (2), the training losses and validation metrics
(two epochs: a change that acts from the second epoch on once passed a first-epoch check).
Without ``--record`` this trains every fingerprinted run again for those epochs
(``mtlrec.train.replay``) and reports which still match bit for bit, from a clean checkout.
Every seed is recorded, not one per configuration: a benchmark where only some seeds were re-run
after a change would otherwise pass.
``--quick`` replays the lowest seed of each configuration only (a third of the time).

Usage::

    python benchmarks/reproduce/run.py                 # replay fingerprints.json, 2 at a time
    python benchmarks/reproduce/run.py --quick         # one seed per configuration
    python benchmarks/reproduce/run.py --runs 'census/aitm-*' --merge   # after re-running some
    python benchmarks/reproduce/run.py --benchmarks census zoo --parallel 1
    python benchmarks/reproduce/run.py --record        # after re-running a benchmark

Writes ``results.json`` (one row per run: benchmark, run, status, summary, max_abs_diff) and
``RESULTS.md`` beside this script (``--results-dir`` to change).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import date
from fnmatch import fnmatch
from multiprocessing import get_context
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCHMARKS = HERE.parent
REPO = BENCHMARKS.parent
FINGERPRINTS = HERE / "fingerprints.json"
# Benchmarks whose runs are single-process `mtlrec train` runs with one torch thread (the scale
# benchmark's runs are multi-process torchrun runs and are not replayed here).
DEFAULT_BENCHMARKS = ("census", "zoo", "balance", "cascade", "sequence")
_SEED = re.compile(r"-seed(\d+)$")


def finished_runs(folder: Path) -> list[Path]:
    """Runs in ``folder`` with config.yaml and history.json, sorted by name."""
    return sorted(
        h.parent for h in folder.glob("*/history.json") if (h.parent / "config.yaml").exists()
    )


def lowest_seeds(prints: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One fingerprint per configuration (benchmark and run name without ``-seedN``): the
    lowest seed's, in the original order."""
    lowest: dict[tuple[str, str], tuple[int, int]] = {}
    for i, fp in enumerate(prints):
        match = _SEED.search(fp["run"])
        name, seed = (fp["run"][: match.start()], int(match.group(1))) if match else (fp["run"], 0)
        key = (fp["benchmark"], name)
        if key not in lowest or seed < lowest[key][0]:
            lowest[key] = (seed, i)
    keep = {i for _, i in lowest.values()}
    return [fp for i, fp in enumerate(prints) if i in keep]


def record(benchmarks: list[str], epochs: int, root: Path = BENCHMARKS) -> list[dict[str, Any]]:
    """Fingerprints of the local run folders of ``benchmarks`` (``root/NAME/runs``)."""
    from mtlrec.train.replay import fingerprint

    prints = []
    for name in benchmarks:
        folder = root / name / "runs"
        if not folder.is_dir():
            raise SystemExit(f"{folder}: no runs to record (run the benchmark first)")
        for run in finished_runs(folder):
            prints.append({"benchmark": name, "run": run.name, **fingerprint(run, epochs)})
    return prints


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def write_markdown(
    path: Path, rows: list[dict[str, Any]], args: argparse.Namespace, epochs: int = 1
) -> None:
    from mtlrec.bench.hardware import describe
    from mtlrec.bench.runs import shown_arguments

    command = "python benchmarks/reproduce/run.py " + shlex.join(shown_arguments(sys.argv[1:]))
    statuses = dict.fromkeys(r["status"] for r in rows)
    counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in statuses)
    lines = [
        "# Do the committed benchmark results reproduce?",
        "",
        f"Command: `{command.strip()}` with `MTLREC_DATA_DIR` set to the shared data folder "
        f"({date.today().isoformat()}, code at commit {_git_commit()}).",
        f"Hardware: {describe()}; {args.parallel} replay(s) at a time, each with its run's own "
        "thread count (1).",
        "",
        "For every run of every benchmark (each seed; `--quick`: the lowest seed of each "
        "configuration), `fingerprints.json` holds its resolved config and, for each of its "
        f"first {epochs} epoch(s), the training loss and validation AUC / log loss per task. "
        "The config (same seed, same data) is trained again for those epochs and every "
        "figure is compared bit for bit. 'evaluation differs': the training losses match and only "
        "the validation figures moved (the evaluation code changed in the last bits); 'training "
        "differs': the benchmark's numbers cannot be reproduced with the current code and its "
        "rows need a re-run. Why more than one epoch: a first-epoch replay cannot see a change "
        "that acts only from the second epoch on (it missed one: runs made before commit 46f9be0 "
        "kept their first epoch and moved from the second, found with `mtlrec reproduce RUN "
        "--epochs 3`); `--record --epochs N` sets how many epochs are fingerprinted."
        + (
            " With `--merge`, only the runs matching `--runs` were replayed by this command; the "
            "other rows come from the previous replay in results.json."
            if getattr(args, "merge", False)
            else ""
        ),
        "",
        f"Summary: {counts}.",
        "",
        "| benchmark | run | status | max abs diff | first difference |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        diff = "-" if not r.get("max_abs_diff") else f"{r['max_abs_diff']:.2g}"
        summary = r["summary"]
        first = summary if r["status"] == "error" else summary.partition("first: ")[2]
        lines.append(f"| {r['benchmark']} | {r['run']} | {r['status']} | {diff} | {first} |")
    lines.append("")
    path.write_text("\n".join(lines))


def replay_all(prints: list[dict[str, Any]], parallel: int) -> list[dict[str, Any]]:
    """Replay every fingerprint, ``parallel`` processes at a time; rows in fingerprint order."""
    from mtlrec.train.replay import replay_fingerprint

    rows: dict[int, dict[str, Any]] = {}

    def done(i: int, result: dict[str, Any]) -> None:
        rows[i] = {"benchmark": prints[i]["benchmark"], "run": prints[i]["run"], **result}
        print(
            f"[{len(rows)}/{len(prints)}] {_label(prints[i])}: {result['summary']}", file=sys.stderr
        )

    if parallel == 1:
        for i, fp in enumerate(prints):
            done(i, replay_fingerprint(fp, _label(fp)))
    else:
        with ProcessPoolExecutor(parallel, mp_context=get_context("spawn")) as pool:
            futures = {
                pool.submit(replay_fingerprint, fp, _label(fp)): i for i, fp in enumerate(prints)
            }
            for future in as_completed(futures):
                done(futures[future], future.result())
    return [rows[i] for i in range(len(prints))]


def merged_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` rows with the runs ``new`` replayed replaced (in place), new runs appended."""
    fresh = {_label(r): r for r in new}
    rows = [fresh.pop(_label(r), r) for r in old]
    return rows + list(fresh.values())


def _label(fp: dict[str, Any]) -> str:
    return f"{fp['benchmark']}/{fp['run']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--benchmarks", nargs="+", default=list(DEFAULT_BENCHMARKS))
    parser.add_argument(
        "--record", action="store_true", help="write fingerprints.json from the local run folders"
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs to fingerprint (--record)")
    parser.add_argument("--parallel", type=int, default=2, help="replays at a time")
    parser.add_argument(
        "--quick", action="store_true", help="replay the lowest seed of each configuration only"
    )
    parser.add_argument(
        "--runs", nargs="+", default=None, help="replay only BENCHMARK/RUN names matching these"
    )
    parser.add_argument(
        "--merge", action="store_true", help="update these rows of results.json, keep the others"
    )
    parser.add_argument("--fingerprints", type=Path, default=FINGERPRINTS)
    parser.add_argument("--results-dir", type=Path, default=HERE)
    parser.add_argument("--runs-root", type=Path, default=BENCHMARKS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.parallel < 1 or args.epochs < 1:
        parser.error("--parallel and --epochs must be >= 1")
    if args.record:
        prints = record(args.benchmarks, args.epochs, args.runs_root)
        args.fingerprints.write_text(json.dumps(prints, indent=1) + "\n")
        print(f"wrote {len(prints)} fingerprints to {args.fingerprints}", file=sys.stderr)
        return 0

    from mtlrec.bench.runs import use_shared_data

    use_shared_data(REPO)
    if not args.fingerprints.exists():
        parser.error(f"{args.fingerprints}: not found (make it with --record)")
    prints = [
        fp for fp in json.loads(args.fingerprints.read_text()) if fp["benchmark"] in args.benchmarks
    ]
    if args.quick:
        prints = lowest_seeds(prints)
    if args.runs:
        prints = [fp for fp in prints if any(fnmatch(_label(fp), pat) for pat in args.runs)]
    print(f"{len(prints)} runs, {args.parallel} at a time", file=sys.stderr)
    rows = replay_all(prints, args.parallel)
    previous = args.results_dir / "results.json"
    if args.merge and previous.exists():
        rows = merged_rows(json.loads(previous.read_text()), rows)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    epochs = max((fp["epochs"] for fp in prints), default=1)
    write_markdown(args.results_dir / "RESULTS.md", rows, args, epochs)
    print(f"wrote {args.results_dir / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
