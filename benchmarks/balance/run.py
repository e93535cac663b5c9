"""Census-Income balancer benchmark: models x balancers x seeds, test AUC per task vs ``ew``.

Why: every balancer claims to help multi-task training; this measures, on one public split and
with everything else fixed (dataset preset, model, seeds), whether it beats plain equal weights
(``ew``) and what it costs per epoch.

Usage::

    python benchmarks/balance/run.py                       # mmoe, shared-bottom x all x 1 2 3
    python benchmarks/balance/run.py --parallel 2          # two training processes at a time
    python benchmarks/balance/run.py --models mmoe --balancers ew pcgrad --seeds 1 --epochs 1 \
        --results-dir /tmp/bal                             # a quick end-to-end check

Each run is ``python -m mtlrec.cli train --dataset census-income --model M --balance B --seed S
--out RUNS/M-B-seedS --quiet --set train.threads=1 --resume`` (one intra-op thread per process,
so ``--parallel K`` uses K cores). A run whose ``metrics.json`` exists is reused, an interrupted
one resumes from its checkpoint, so the benchmark can be stopped and restarted (``--force``
retrains). Writes, in ``--results-dir`` (default: this folder):

* ``results.json``: rows ``{model, balancer, task, auc_mean, auc_std, seconds_per_epoch}``,
* ``runs.json``: one row per run (per-seed AUCs, epochs, wall time, failures),
* ``RESULTS.md``: the table, the command, the hardware and which balancers help vs ``ew``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

from mtlrec.bench.hardware import cpu_name
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
MODELS = ["mmoe", "shared-bottom"]
REFERENCE = "ew"
NOISE_SE = 2.0  # a mean paired difference beyond this many standard errors is called real


def all_balancers() -> list[str]:
    """The registered balancers, in ``mtlrec list balancers`` order."""
    from mtlrec.balance import describe_balancers

    return list(describe_balancers())


def nproc() -> str:
    """``nproc`` (the CPUs this process may use), else ``os.cpu_count()``."""
    exe = shutil.which("nproc")
    if exe:
        try:
            return subprocess.run([exe], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return str(os.cpu_count())


def run_one(
    model: str, balancer: str, seed: int, args: argparse.Namespace, runs_dir: Path
) -> dict[str, Any]:
    """Train (or reuse) one run; return its per-run row (``status`` says whether it worked)."""
    out = runs_dir / f"{model}-{balancer}-seed{seed}"
    row: dict[str, Any] = {"model": model, "balancer": balancer, "seed": seed, "run": str(out)}
    extra = ["--balance", balancer]
    command = train_command(DATASET, model, seed, out, args.epochs, args.max_rows, extra)
    return train_or_reuse(out, command, row, force=args.force, train=not args.report_only)


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation of test AUC over seeds, per model, balancer, task."""
    rows = []
    ok = [r for r in runs if r["status"] == "ok"]
    for model in dict.fromkeys(r["model"] for r in ok):
        for balancer in dict.fromkeys(r["balancer"] for r in ok if r["model"] == model):
            group = [r for r in ok if r["model"] == model and r["balancer"] == balancer]
            secs = [r["seconds_per_epoch"] for r in group if r["seconds_per_epoch"] is not None]
            for task in group[0]["auc"]:
                values = [r["auc"][task] for r in group if r["auc"].get(task) is not None]
                rows.append(
                    {
                        "model": model,
                        "balancer": balancer,
                        "task": task,
                        "auc_mean": statistics.mean(values) if values else None,
                        "auc_std": statistics.stdev(values) if len(values) > 1 else None,
                        "seconds_per_epoch": statistics.mean(secs) if secs else None,
                    }
                )
    return rows


def compare_to_reference(runs: list[dict[str, Any]], model: str, balancer: str) -> dict[str, Any]:
    """Paired (same seed) difference of the mean-over-tasks test AUC, ``balancer`` minus ``ew``.

    ``verdict``: ``helps``/``hurts`` when the mean difference is beyond ``NOISE_SE`` standard
    errors of the paired differences, ``no clear difference`` otherwise; with one seed there is
    no noise estimate and the verdict says so.
    """

    def mean_auc(r: dict[str, Any]) -> float | None:
        values = [v for v in r["auc"].values() if v is not None]
        return statistics.mean(values) if values else None

    by_seed = {}
    for r in runs:
        if r["status"] == "ok" and r["model"] == model and r["balancer"] in (balancer, REFERENCE):
            by_seed.setdefault(r["seed"], {})[r["balancer"]] = mean_auc(r)
    diffs = [
        d[balancer] - d[REFERENCE]
        for d in by_seed.values()
        if d.get(balancer) is not None and d.get(REFERENCE) is not None
    ]
    if not diffs:
        return {"delta": None, "se": None, "seeds": 0, "verdict": f"no paired {REFERENCE} run"}
    delta = statistics.mean(diffs)
    if len(diffs) < 2:
        word = "higher" if delta > 0 else "lower" if delta < 0 else "equal"
        return {
            "delta": delta,
            "se": None,
            "seeds": 1,
            "verdict": f"{word} (1 seed, no noise estimate)",
        }
    se = statistics.stdev(diffs) / len(diffs) ** 0.5
    if delta > NOISE_SE * se:
        verdict = "helps"
    elif delta < -NOISE_SE * se:
        verdict = "hurts"
    else:
        verdict = "no clear difference"
    return {"delta": delta, "se": se, "seeds": len(diffs), "verdict": verdict}


def effect_sizes(deltas: list[tuple[float, float, str]]) -> list[str]:
    """One sentence on how large the differences are, so that a consistent but tiny Δ is not
    read as a gain: the largest |Δ| and the range of all the others. ``deltas``: (|Δ|, Δ,
    "model/balancer") per compared balancer."""
    if len(deltas) < 2:
        return []
    (_, top, name), *rest = sorted(deltas, reverse=True)
    return [
        "",
        f"Size: the largest Δ is {top:+.4f} ({name}); every other Δ lies within "
        f"±{rest[0][0]:.4f}. 'helps'/'hurts' says a difference is consistent across the paired "
        "seeds, not that it is large.",
    ]


def write_markdown(
    path: Path, rows: list[dict[str, Any]], runs: list[dict[str, Any]], args: argparse.Namespace
) -> None:
    import torch

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    seeds = sorted({r["seed"] for r in runs})
    command = "python benchmarks/balance/run.py " + shlex.join(shown_arguments(sys.argv[1:]))
    lines = [
        "# Census-Income (KDD): gradient balancers vs equal weights (`ew`)",
        "",
        f"Command: `{command.strip()}` with `MTLREC_DATA_DIR` set to the shared data folder "
        f"({date.today().isoformat()}).",
        f"Hardware: {cpu_name()}; `nproc` = {nproc()}; one torch thread per training process, "
        f"{args.parallel} process(es) at a time; Python {platform.python_version()}, "
        f"torch {torch.__version__}.",
        census_setup(False, args.epochs, args.max_rows),
        "",
        "| model | balancer | "
        + " | ".join(f"{t} AUC" for t in tasks)
        + f" | Δ mean AUC vs {REFERENCE} | s/epoch | vs {REFERENCE} |",
        "|---|---|" + "---|" * len(tasks) + "---|---|---|",
    ]
    verdicts: dict[str, dict[str, list[str]]] = {}
    deltas: list[tuple[float, float, str]] = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for balancer in dict.fromkeys(r["balancer"] for r in rows if r["model"] == model):
            cells = {
                r["task"]: r for r in rows if r["model"] == model and r["balancer"] == balancer
            }
            first = next(iter(cells.values()))
            aucs = " | ".join(
                mean_std(cells[t]["auc_mean"], cells[t]["auc_std"]) if t in cells else "-"
                for t in tasks
            )
            secs = first["seconds_per_epoch"]
            if balancer == REFERENCE:
                delta, verdict = "—", "reference"
            else:
                c = compare_to_reference(runs, model, balancer)
                if c["delta"] is not None:
                    deltas.append((abs(c["delta"]), c["delta"], f"{model}/{balancer}"))
                delta = "-" if c["delta"] is None else f"{c['delta']:+.4f}"
                if c["se"] is not None:
                    delta += f" (SE {c['se']:.4f})"
                verdict = c["verdict"]
                verdicts.setdefault(model, {}).setdefault(verdict, []).append(balancer)
            lines.append(
                f"| {model} | {balancer} | {aucs} | {delta} | "
                f"{'-' if secs is None else f'{secs:.2f}'} | {verdict} |"
            )
    lines += [
        "",
        f"AUC: mean ± sample standard deviation over seeds {', '.join(map(str, seeds))}. "
        f"Δ: mean over seeds of (mean test AUC over tasks, balancer minus {REFERENCE}, same "
        f"seed); 'helps'/'hurts' when |Δ| exceeds {NOISE_SE:g} standard errors of those paired "
        "differences. s/epoch: training seconds per epoch (diagnostics off), measured with "
        f"{args.parallel} process(es) sharing the machine.",
        "",
        "## Which methods help",
        "",
    ]
    if not verdicts:
        lines.append(
            f"Nothing to compare: the {REFERENCE} runs or the other balancers are missing."
        )
    for model, groups in verdicts.items():
        helps, hurts = groups.get("helps", []), groups.get("hurts", [])
        neutral = groups.get("no clear difference", [])
        other = {
            k: v for k, v in groups.items() if k not in ("helps", "hurts", "no clear difference")
        }
        lines.append(
            f"- {model}: help over {REFERENCE}: {', '.join(helps) or 'none'}; "
            f"hurt: {', '.join(hurts) or 'none'}; no clear difference: {', '.join(neutral) or 'none'}"
            + "".join(f"; {k}: {', '.join(v)}" for k, v in other.items())
            + "."
        )
    lines += effect_sizes(deltas)
    if args.note:
        lines += ["", "## Notes", "", *(f"- {note}" for note in args.note)]
    if len(seeds) < 3:
        lines += [
            "",
            f"**Partial**: {len(seeds)} of the 3 seeds this benchmark is specified for; with one "
            "seed there is no noise estimate, so no balancer is called helpful or harmful. "
            "`make bench-balance` adds the other seeds (finished runs are reused).",
        ]
    missing = [r for r in runs if r["status"] == "not run"]
    if missing:
        lines += [
            "",
            f"**Partial**: {len(runs) - len(missing)} of {len(runs)} runs finished when this was "
            "written (`--report-only`); `make bench-balance` resumes the rest (finished runs are "
            "reused).",
        ]
    failed = [r for r in runs if r["status"] not in ("ok", "not run")]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [
            f"- {r['model']} / {r['balancer']} / seed {r['seed']}: {r['status']}" for r in failed
        ]
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
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--balancers", nargs="+", default=None, help="default: all registered")
    add_run_options(parser, HERE)
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the finished runs (the rest are listed as not run)",
    )
    args = parser.parse_args()
    if args.parallel < 1:
        parser.error("--parallel must be >= 1")
    balancers = args.balancers or all_balancers()
    if REFERENCE not in balancers:
        balancers = [REFERENCE, *balancers]  # every verdict is relative to ew
        print(f"adding {REFERENCE!r}: the comparisons need it", file=sys.stderr)
    results_dir = args.results_dir.resolve()
    runs_dir = (args.runs_dir or results_dir / "runs").resolve()
    results_dir.mkdir(parents=True, exist_ok=True)

    use_shared_data(REPO)
    # Seed-major: a stopped benchmark leaves whole seeds done, reported with --seeds.
    jobs = [(m, b, s) for s in args.seeds for m in args.models for b in balancers]
    print(f"{len(jobs)} runs, {args.parallel} at a time, into {runs_dir}", file=sys.stderr)
    runs = run_all([(m, b, s, args, runs_dir) for m, b, s in jobs], run_one, args.parallel)
    rows = aggregate(runs)
    (results_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (results_dir / "runs.json").write_text(json.dumps(runs, indent=2) + "\n")
    write_markdown(results_dir / "RESULTS.md", rows, runs, args)
    print(f"wrote {results_dir / 'results.json'} and {results_dir / 'RESULTS.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
