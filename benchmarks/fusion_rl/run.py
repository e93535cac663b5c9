"""BatchRL-MTF on semi-synthetic MovieLens-100K sessions: learned fusion weights vs fixed ones.

Why: BatchRL-MTF (Zhang et al., KDD 2022) learns per-request fusion weights offline from logged
sessions. No public dataset logs fusion weights, so this benchmark is **semi-synthetic**: the
users are simulated (``mtlrec.rl.simulator``) from a "world" MTL model trained on nearly all
MovieLens-100K ratings; the fusion ranks candidates with the predictions of a "ranker" MTL model
trained on the chronological training split only.

Steps (all on 2 CPU cores; about 5-10 minutes):

1. train the two Shared-Bottom models with ``mtlrec.train.run.train_run`` (the dataset preset,
   ``--epochs`` epochs; the world model's split is 97/2/1 instead of 80/10/10) and score every
   simulated user x catalogue movie with both;
2. per seed: log ``--log-sessions`` sessions with the paper's mixed exploration around the fixed
   logging weights (the library's default ``weighted_product`` weights: like 1, rating 0),
   train BatchRL-MTF on them (``--steps`` steps), and score the Conservative-OPEstimator on
   the logged sessions held out from training (the last 10 %);
3. grid search over fixed weights (the paper's baseline family; step ``--grid-step`` over the
   weight box) on separate tuning sessions;
4. evaluate the fixed logging weights, the best grid weights and BatchRL-MTF on ``--sessions``
   fresh sessions per seed (users and random draws from seeds no policy was trained or tuned on).

Usage::

    python benchmarks/fusion_rl/run.py                        # 3 seeds, the committed results
    python benchmarks/fusion_rl/run.py --seeds 1 --sessions 200 --log-sessions 300 --steps 200 \
        --epochs 1 --users 60 --grid-step 1 --results-dir /tmp/fusion   # a quick end-to-end check

Writes ``results.json`` and ``RESULTS.md`` into ``--results-dir`` (default: this folder); the two
MTL runs and the scored world go to ``--runs-dir`` (default ``<results-dir>/runs``, not
committed) and are reused on a rerun (``--force`` retrains).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATASET = "movielens-100k"
MODEL = "shared-bottom"
LOGGING_WEIGHTS = {"like": 1.0, "rating": 0.0}  # the library's default weighted_product weights
BOUNDS = {"like": (0.0, 2.0), "rating": (0.0, 2.0)}
POLICIES = ["logging (fixed)", "grid search (best fixed)", "BatchRL-MTF"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_models(runs: Path, epochs: int, force: bool) -> dict[str, Any]:
    """The world and ranker runs (reused when finished); returns their test metrics."""
    from mtlrec.config import resolve
    from mtlrec.train.run import train_run

    specs = {
        "world": {"name": DATASET, "valid_fraction": 0.02, "test_fraction": 0.01},
        "ranker": {"name": DATASET},
    }
    out = {}
    for name, dataset in specs.items():
        folder = runs / name
        if force and folder.exists():
            shutil.rmtree(folder)
        if not (folder / "metrics.json").exists():
            started = time.perf_counter()
            config = resolve(
                {
                    "dataset": dataset,
                    "model": {"name": MODEL},
                    "train": {"epochs": epochs, "seed": 1, "progress": False, "threads": 1},
                }
            )
            train_run(config, folder, echo=lambda *_: None)
            log(f"trained {name} model in {time.perf_counter() - started:.0f}s")
        metrics = json.loads((folder / "metrics.json").read_text())
        split = "test" if metrics.get("test") else "valid"
        out[name] = {
            "split": split,
            "like_auc": metrics[split]["like"]["auc"],
            "rating_mse": metrics[split]["rating"]["mse"],
            "dataset": dataset,
        }
    return out


def load_world(runs: Path, users: int, force: bool):
    """The scored world, cached as ``runs/world.npz``."""
    from mtlrec.rl.simulator import PROFILE_NAMES, SimWorld, movielens_world

    cache = runs / f"world-{users}.npz"
    if cache.exists() and not force:
        z = np.load(cache)
        return SimWorld(
            tasks=["like", "rating"],
            binary=[True, False],
            truth=z["truth"],
            ranker=z["ranker"],
            profile=z["profile"],
            profile_names=list(PROFILE_NAMES),
            activity=z["activity"],
            items=z["items"],
            users=z["users"],
        )
    started = time.perf_counter()
    world = movielens_world(runs / "world", runs / "ranker", users=users, seed=0)
    np.savez_compressed(
        cache,
        truth=world.truth,
        ranker=world.ranker,
        profile=world.profile,
        activity=world.activity,
        items=world.items,
        users=world.users,
    )
    log(
        f"scored {world.truth.shape[0]} users x {world.truth.shape[1]} movies with both models "
        f"in {time.perf_counter() - started:.0f}s"
    )
    return world


def world_summary(world) -> dict[str, float]:
    """How far the ranker is from the truth on the simulated pairs."""
    truth, pred = world.truth, world.ranker
    out = {
        "users": int(truth.shape[0]),
        "items": int(truth.shape[1]),
        "true_like_mean": float(truth[..., 0].mean()),
        "true_rating_mean": float(truth[..., 1].mean()),
    }
    for j, task in enumerate(world.tasks):
        out[f"{task}_corr_ranker_truth"] = float(
            np.corrcoef(truth[..., j].ravel(), pred[..., j].ravel())[0, 1]
        )
    return out


def grid_search(sim, step: float, sessions: int, seed: int) -> tuple[list[float], list[dict]]:
    """Every fixed weight vector on the grid (box ``BOUNDS``, ``step`` apart), scored by mean
    session return on ``sessions`` tuning sessions; returns the best and all scores."""
    from mtlrec.rl.simulator import fixed_policy

    axes = [np.round(np.arange(lo, hi + 1e-9, step), 6) for lo, hi in BOUNDS.values()]
    table = []
    for like in axes[0]:
        for rating in axes[1]:
            if like == 0 and rating == 0:
                continue  # no ranking at all
            res = sim.rollout(fixed_policy([like, rating]), sessions, seed)
            table.append(
                {"weights": [float(like), float(rating)], "return": float(res.returns.mean())}
            )
    best = max(table, key=lambda row: row["return"])
    return best["weights"], table


def run_seed(sim, seed: int, args: argparse.Namespace, grid_weights: list[float]) -> dict[str, Any]:
    from mtlrec.rl.batch_mtf import BatchRLConfig, BatchRLMTF, conservative_ope
    from mtlrec.rl.simulator import exploration_policy, fixed_policy

    low = np.array([b[0] for b in BOUNDS.values()])
    high = np.array([b[1] for b in BOUNDS.values()])
    logging_weights = [LOGGING_WEIGHTS[t] for t in sim.tasks]
    behaviour = exploration_policy(fixed_policy(logging_weights), low, high, seed=seed)
    started = time.perf_counter()
    logged = sim.rollout(behaviour, args.log_sessions, seed=20_000 + seed, record=True)
    batch = logged.transitions
    cut = int(args.log_sessions * 0.9)
    train_rows = batch.session < cut
    train, held = (
        batch.subset(np.flatnonzero(train_rows)),
        batch.subset(np.flatnonzero(~train_rows)),
    )
    config = BatchRLConfig(steps=args.steps, seed=seed)
    agent = BatchRLMTF(sim.state_dim, sim.tasks, BOUNDS, config, sim.state_names)
    agent.fit(train, log_every=max(args.steps // 10, 1))
    train_seconds = time.perf_counter() - started
    policies = {
        POLICIES[0]: fixed_policy(logging_weights),
        POLICIES[1]: fixed_policy(grid_weights),
        POLICIES[2]: agent.policy,
    }
    evaluation = {}
    for name, policy in policies.items():
        res = sim.rollout(policy, args.sessions, seed=30_000 + seed)
        evaluation[name] = res.summary()
    # the behaviour policy itself, for reference
    evaluation["exploration (logging policy)"] = logged.summary()
    # Conservative-OPEstimator on the held-out logged sessions (normalised actions)
    ope = {}
    held_norm = agent.normalize(held.action)
    first = held.first
    for name, policy in policies.items():
        acts = agent.normalize(policy(held.state))
        nxt = agent.normalize(policy(held.next_state))
        ope[name] = conservative_ope(
            _with_action(held, held_norm),
            acts,
            nxt,
            held.state[first],
            acts[first],
            gamma=config.gamma,
            steps=args.ope_steps,
            seed=seed,
        )
    weights = agent.policy(held.state)
    return {
        "seed": seed,
        "logged_transitions": len(batch),
        "train_transitions": len(train),
        "train_seconds": train_seconds,
        "evaluation": evaluation,
        "conservative_ope": ope,
        "batchrl_weights": {
            "mean": weights.mean(axis=0).tolist(),
            "std": weights.std(axis=0).tolist(),
            "ratio_rating_to_like_median": float(
                np.median(weights[:, 1] / np.maximum(weights[:, 0], 1e-6))
            ),
        },
        "training_history": agent.history,
    }


def _with_action(transitions, actions):
    from dataclasses import replace

    return replace(transitions, action=actions)


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rows = {}
    names = list(per_seed[0]["evaluation"])
    for name in names:
        row: dict[str, Any] = {}
        for key in ("return_mean", "discounted_return_mean", "length_mean", "like_per_session"):
            values = [r["evaluation"][name][key] for r in per_seed]
            row[key] = statistics.mean(values)
            row[key + "_seed_std"] = statistics.stdev(values) if len(values) > 1 else None
        for key in ("return_std", "length_std", "like_per_session_std"):
            row[key + "_sessions"] = statistics.mean(r["evaluation"][name][key] for r in per_seed)
        if name in per_seed[0]["conservative_ope"]:
            values = [r["conservative_ope"][name] for r in per_seed]
            row["conservative_ope"] = statistics.mean(values)
            row["conservative_ope_seed_std"] = statistics.stdev(values) if len(values) > 1 else None
        rows[name] = row
    diffs = [
        r["evaluation"][POLICIES[2]]["return_mean"] - r["evaluation"][POLICIES[1]]["return_mean"]
        for r in per_seed
    ]
    rows["BatchRL-MTF minus grid search (return)"] = {
        "per_seed": diffs,
        "mean": statistics.mean(diffs),
        "seed_std": statistics.stdev(diffs) if len(diffs) > 1 else None,
    }
    return rows


def cell(mean: float, std: float | None, digits: int = 2) -> str:
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_markdown(path: Path, results: dict[str, Any], args: argparse.Namespace) -> None:
    from mtlrec.bench.hardware import describe
    from mtlrec.bench.runs import shown_arguments

    agg = results["aggregate"]
    command = "python benchmarks/fusion_rl/run.py " + shlex.join(
        [a for a in shown_arguments(sys.argv[1:]) if a != "--force"]  # --force only retrains
    )
    lines = [
        "# BatchRL-MTF on semi-synthetic MovieLens-100K sessions",
        "",
        "**Semi-synthetic.** No public dataset logs fusion weights, so the users here are "
        'simulated: responses come from a "world" MTL model trained on nearly all MovieLens-100K '
        "ratings plus hand-set leave and response rules (`mtlrec/rl/simulator.py`), not from "
        "people. The numbers compare fusion policies inside that simulator only; they say nothing "
        "about real users.",
        "",
        f"Command: `{command.strip()}` with `MTLREC_DATA_DIR` set to the shared data folder "
        f"({date.today().isoformat()}).",
        f"Hardware: {describe()}; wall time {results['wall_seconds'] / 60:.1f} min in all.",
        "",
        "Setup: two Shared-Bottom models (dataset preset, "
        f"{args.epochs} epochs, seed 1): the world (split 97/2/1; test like AUC "
        f"{results['mtl']['world']['like_auc']:.3f}) and the ranker (chronological 80/10/10; test "
        f"like AUC {results['mtl']['ranker']['like_auc']:.3f}, rating MSE "
        f"{results['mtl']['ranker']['rating_mse']:.3f}); {results['world']['users']} users x "
        f"{results['world']['items']} movies (>= 10 ratings), the world sharpened (like logits x "
        f"{args.like_sharpness}, rating deviations x {args.rating_sharpness}); "
        f"{results['simulator']['candidates']} candidates per request, the top one consumed; "
        "reward per item = 1 (play) + like + (rating - 3) / 2; at most "
        f"{results['simulator']['max_steps']} requests per session. Fusion: the paper's Eq. (1) with beta = 0, i.e. the library's "
        "`weighted_product`, weights in [0, 2] per task. Logging: the paper's mixed exploration "
        "around the library's default weights (like 1, rating 0): half the requests N(0, 1) "
        "random, half the default plus N(0, 0.1) noise (normalised units), "
        f"{args.log_sessions} sessions per seed (90 % to train, 10 % held out for the "
        f"Conservative-OPEstimator). BatchRL-MTF: {args.steps} training steps, the paper's "
        "hyper-parameters otherwise (`mtlrec/rl/batch_mtf.py`). Grid search: every weight pair "
        f"{args.grid_step} apart in the box, {args.grid_sessions} tuning sessions each, best "
        f"mean return: like {results['grid']['best'][0]}, rating {results['grid']['best'][1]}.",
        "",
        f"Evaluation: {args.sessions} fresh sessions per seed (seeds "
        f"{', '.join(map(str, args.seeds))}; users and draws from seeds used for nothing else). "
        "Each cell: mean over seeds of the per-seed mean ± the standard deviation over seeds; "
        "the per-session standard deviation (averaged over seeds) is in parentheses.",
        "",
        "| policy | session return | discounted return (γ=0.95) | session length | likes per "
        "session | Conservative-OPE |",
        "|---|---|---|---|---|---|",
    ]
    for name in [*POLICIES, "exploration (logging policy)"]:
        row = agg[name]
        ope = row.get("conservative_ope")
        lines.append(
            f"| {name} | {cell(row['return_mean'], row['return_mean_seed_std'])} "
            f"({row['return_std_sessions']:.1f}) | "
            f"{cell(row['discounted_return_mean'], row['discounted_return_mean_seed_std'])} | "
            f"{cell(row['length_mean'], row['length_mean_seed_std'])} "
            f"({row['length_std_sessions']:.1f}) | "
            f"{cell(row['like_per_session'], row['like_per_session_seed_std'])} "
            f"({row['like_per_session_std_sessions']:.1f}) | "
            f"{'-' if ope is None else cell(ope, row['conservative_ope_seed_std'])} |"
        )
    diff = agg["BatchRL-MTF minus grid search (return)"]
    lines += [
        "",
        f"BatchRL-MTF minus grid search, session return per seed: "
        f"{', '.join(f'{d:+.2f}' for d in diff['per_seed'])} (mean {diff['mean']:+.2f}).",
        "",
        "Conservative-OPE: the paper's offline estimator (FQE with the CQL penalty, "
        "`conservative_ope`) of each policy's discounted value from the held-out logged "
        "sessions; compare with the discounted return measured in the simulator.",
    ]
    if args.note:
        lines += ["", "## Notes", "", *(f"- {note}" for note in args.note)]
    lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=8, help="MTL training epochs (both models)")
    parser.add_argument("--users", type=int, default=400, help="simulated users")
    parser.add_argument("--sessions", type=int, default=1500, help="evaluation sessions per seed")
    parser.add_argument("--log-sessions", type=int, default=2500, help="logged sessions per seed")
    parser.add_argument("--steps", type=int, default=3000, help="BatchRL-MTF training steps")
    parser.add_argument("--ope-steps", type=int, default=1500, help="Conservative-OPE steps")
    parser.add_argument("--like-sharpness", type=float, default=2.0, help="world like logits x")
    parser.add_argument("--rating-sharpness", type=float, default=1.5, help="world rating dev. x")
    parser.add_argument("--grid-step", type=float, default=0.25)
    parser.add_argument("--grid-sessions", type=int, default=500, help="tuning sessions / point")
    parser.add_argument("--results-dir", type=Path, default=HERE)
    parser.add_argument("--runs-dir", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="retrain the MTL models")
    parser.add_argument("--note", action="append", default=[], help="a line for RESULTS.md")
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md only")
    args = parser.parse_args()
    if args.report_only:
        results = json.loads((args.results_dir / "results.json").read_text())
        for key, value in results["arguments"].items():
            if key != "report_only":
                setattr(args, key, value)
        write_markdown(args.results_dir / "RESULTS.md", results, args)
        return

    from mtlrec.bench.runs import use_shared_data
    from mtlrec.rl.simulator import FusionSimulator, sharpen

    use_shared_data(REPO)
    torch.set_num_threads(1)
    started = time.perf_counter()
    results_dir = args.results_dir.resolve()
    runs = (args.runs_dir or results_dir / "runs").resolve()
    runs.mkdir(parents=True, exist_ok=True)
    mtl = train_models(runs, args.epochs, args.force)
    world = sharpen(
        load_world(runs, args.users, args.force), args.like_sharpness, args.rating_sharpness
    )
    sim = FusionSimulator(world)
    t0 = time.perf_counter()
    grid_best, grid_table = grid_search(sim, args.grid_step, args.grid_sessions, seed=10_000)
    log(
        f"grid search: best {grid_best} ({len(grid_table)} points, {time.perf_counter() - t0:.0f}s)"
    )
    per_seed = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        row = run_seed(sim, seed, args, grid_best)
        ev = row["evaluation"]
        log(
            f"seed {seed} ({time.perf_counter() - t0:.0f}s): "
            + "; ".join(f"{k} {v['return_mean']:.2f}" for k, v in ev.items())
        )
        per_seed.append(row)
    results = {
        "semi_synthetic": True,
        "mtl": mtl,
        "world": world_summary(world),
        "simulator": {k: v for k, v in vars(sim.config).items()},
        "state_features": sim.state_names,
        "bounds": BOUNDS,
        "logging_weights": LOGGING_WEIGHTS,
        "grid": {"best": grid_best, "step": args.grid_step, "table": grid_table},
        "aggregate": aggregate(per_seed),
        "per_seed": per_seed,
        "arguments": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("results_dir", "runs_dir", "note")
        },
        "wall_seconds": time.perf_counter() - started,
    }
    from mtlrec.bench.hardware import describe

    results["hardware"] = describe()
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_markdown(results_dir / "RESULTS.md", results, args)
    log(
        f"wrote {results_dir / 'results.json'} and RESULTS.md "
        f"({results['wall_seconds'] / 60:.1f} min)"
    )


if __name__ == "__main__":
    main()
