"""MeLU vs CLOVER on MovieLens-100K: accuracy and gender fairness (issue: the CLOVER model).

Why: CLOVER (Wei and He, KDD 2022) trains a meta-learned recommender (MeLU) against adversaries
that try to read a sensitive user attribute; the claim is fairer recommendations at little cost in
accuracy. Here ``clover`` with ``fair_weight: 0`` (MeLU) and with the default ``fair_weight``
are trained with the same preset (``mtlrec/presets/movielens-100k.yaml``'s ``clover`` block:
meta-training over users, gender as the sensitive attribute) and seeds, and again with plain
training (``train.meta: false``), which separates what the adversary does from what
meta-learning does.

Reported (test split, mean ± sample std over seeds): rating MSE / MAE and like AUC scored with
the global weights (no adaptation); the cold-start protocol of MeLU / CLOVER (each test user
with more than ``--support`` test rows is adapted on their earliest ``--support`` rows and scored
on the rest): rating MAE, CF (mean |change| of the rating prediction when gender is flipped) and
GF (|difference| of the genders' mean per-user rating MAE); attacker AUC (a fresh classifier on
the global user representations of the training users, scored on the test users).

Usage::

    python benchmarks/fairness/run.py                      # 2 models x seeds 1 2 3
    python benchmarks/fairness/run.py --seeds 1 --epochs 2 --max-rows 5000 --results-dir /tmp/f

Runs in process (the fairness measures need the trained model); writes ``results.json`` and
``RESULTS.md`` into ``--results-dir`` (default: this folder).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from mtlrec import config as cfg
from mtlrec.balance import build_balancer
from mtlrec.bench.runs import mean_std, shown_arguments, use_shared_data
from mtlrec.data.datasets import load_dataset
from mtlrec.data.encoder import Encoder
from mtlrec.models import build_model
from mtlrec.train import fairness as fm
from mtlrec.train.metrics import auc
from mtlrec.train.run import seed_everything
from mtlrec.train.trainer import Trainer, predict

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATASET = "movielens-100k"
# name -> (model options, train options) over the preset's clover block
VARIANTS = {
    "MeLU (fair_weight 0)": ({"fair_weight": 0.0}, {}),
    "CLOVER": ({}, {}),
    "MeLU, plain training": ({"fair_weight": 0.0}, {"meta": False}),
    "CLOVER, plain training": ({}, {"meta": False}),
}
METRICS = [  # key, label, higher is better
    ("rating_mse", "rating MSE", False),
    ("rating_mae", "rating MAE", False),
    ("like_auc", "like AUC", True),
    ("cold_rating_mae", "cold-start MAE", False),
    ("cold_cf", "CF", False),
    ("cold_gf", "GF", False),
    ("attacker_auc", "attacker AUC", False),
]


def setup(max_rows: int | None):
    """(preset-resolved config, encoder, train / valid / test tables)."""
    config = cfg.resolve({"dataset": {"name": DATASET}, "model": {"name": "clover"}})
    splits = load_dataset(DATASET, max_rows=max_rows)
    enc = Encoder(splits.schema).fit(splits.train)
    return config, enc, [enc.transform(s) for s in (splits.train, splits.valid, splits.test)]


def run_one(variant: str, seed: int, args, config, enc, tables) -> dict[str, Any]:
    train, valid, test = tables
    options = {k: v for k, v in config["model"].items() if k != "name"}
    model_options, train_options = VARIANTS[variant]
    options.update(model_options)
    tcfg = {**config["train"], **train_options}
    tcfg.update(seed=seed, threads=args.threads, progress=False)
    if args.epochs:
        tcfg["epochs"] = args.epochs
    seed_everything(seed)
    model = build_model("clover", enc.schema, enc.layout(), options)
    started = time.perf_counter()
    result = Trainer(model, build_balancer("ew", model), tcfg).fit(train, valid)
    seconds = time.perf_counter() - started
    names = enc.schema.task_names
    like, rating = names.index("like"), names.index("rating")
    pred, _ = predict(model, test)
    labels = test.labels
    row: dict[str, Any] = {
        "variant": variant,
        "seed": seed,
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "train_seconds": seconds,
        "rating_mse": float((pred[:, rating] - labels[:, rating]).pow(2).mean()),
        "rating_mae": float((pred[:, rating] - labels[:, rating]).abs().mean()),
        "like_auc": auc(labels[:, like].numpy(), pred[:, like].numpy()),
    }
    # cold start: per test user, adapt on the earliest `support` rows, score the rest
    users = test_user_keys(model, test)
    cold = fm.cold_start_predictions(
        model, test, users, model.sensitive, args.support, tcfg["inner_steps"], tcfg["inner_lr"]
    )
    cold_labels = labels[cold.rows]
    row["cold_users"] = int(cold.users.unique().numel())
    row["cold_rows"] = len(cold.rows)
    row["cold_rating_mae"] = float((cold.pred[:, rating] - cold_labels[:, rating]).abs().mean())
    row["cold_cf"] = float(fm.per_user_mean(cold.cf_gap[:, rating], cold.users)[1].mean())
    row["cold_gf"] = float(fm.group_gap(cold.pred, cold_labels, cold.users, cold.groups)[rating])
    # attacker: training users' representations -> test users'
    train_keys = model.user.local(train)
    _, rep_tr, grp_tr = fm.user_representations(model, train, train_keys, model.sensitive)
    _, rep_te, grp_te = fm.user_representations(model, test, users, model.sensitive)
    row["attacker_auc"] = fm.attacker_auc(rep_tr, grp_tr, rep_te, grp_te, seed=seed)
    return row


def test_user_keys(model, table) -> torch.Tensor:
    """[N] a key per test user. Cold-start users share the out-of-vocabulary user id, so the key
    is built from the user's attributes row-wise (age bucket, gender, occupation, region, age)
    together with the id: distinct users with identical attributes and no id merge (rare)."""
    parts = [table.cat[:, j] for j in range(table.cat.shape[1]) if j in model.user_idx.tolist()]
    parts.append(model.user.local(table))
    key = torch.stack(parts, 1)
    if len(model.user_num):
        key = torch.cat([key, (table.num[:, model.user_num] * 1000).round().long()], 1)
    return torch.unique(key, dim=0, return_inverse=True)[1]


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        summary: dict[str, Any] = {"seeds": [r["seed"] for r in mine]}
        for key, _, _ in METRICS + [("train_seconds", "", False)]:
            values = [r[key] for r in mine]
            summary[f"{key}_mean"] = statistics.mean(values)
            summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        out[variant] = summary
    return out


def write(results_dir: Path, rows, summary, command: str, wall: float, args) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    arguments = {"seeds": args.seeds, "support": args.support, "threads": args.threads}
    payload = {
        "command": command,
        "wall_seconds": wall,
        "arguments": arguments,
        "summary": summary,
        "runs": rows,
    }
    (results_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    header = "| model | " + " | ".join(label for _, label, _ in METRICS) + " | train s |"
    lines = [
        "# MeLU vs CLOVER on MovieLens-100K (gender as the sensitive attribute)",
        "",
        f"Command: `{command}` (from the repository root, MTLREC_DATA_DIR pointing at the data).",
        f"Date: {date.today().isoformat()}. Hardware: {platform.processor() or platform.machine()}"
        f", 2-core CPU, {args.threads} torch thread(s). Wall time: {wall / 60:.1f} min.",
        "",
        "Setup: the preset's `clover` block (meta-training over users, `train.meta: true`; "
        "the 'plain training' rows: `train.meta: false`); "
        "the chronological 80/10/10 split; early stopping on validation like AUC, best epoch "
        "restored. MSE / MAE / like AUC: test split scored with the global weights. Cold start: "
        f"every test user with more than {args.support} test rows, adapted on the earliest "
        f"{args.support} (`adapt`, the preset's inner_steps / inner_lr), scored on the rest; "
        "CF and GF on those rows (rating task). Attacker AUC: a fresh Linear-ReLU-Linear "
        "classifier on the training users' representations, scored on the test users "
        "(0.5 = gender not recoverable). Mean ± sample std over seeds "
        f"{', '.join(map(str, args.seeds))}.",
        "",
        header,
        "|" + "---|" * (len(METRICS) + 2),
    ]
    for variant, s in summary.items():
        cells = [mean_std(s[f"{k}_mean"], s[f"{k}_std"]) for k, _, _ in METRICS]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {s['train_seconds_mean']:.0f} |")
    lines += ["", "Lower is better for every column except like AUC."]
    if args.note:
        lines += ["", "## Notes", "", *(f"- {note}" for note in args.note)]
    lines.append("")
    (results_dir / "RESULTS.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=None, help="cap the preset's epochs")
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--support", type=int, default=10, help="cold-start support rows per user")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-dir", type=Path, default=HERE)
    parser.add_argument("--note", action="append", default=[], help="a reading note (repeatable)")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite RESULTS.md from results.json"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads((args.results_dir / "results.json").read_text())
        for key, value in saved["arguments"].items():
            setattr(args, key, value)
        rows = saved["runs"]
        write(
            args.results_dir, rows, summarise(rows), saved["command"], saved["wall_seconds"], args
        )
        return 0
    use_shared_data(REPO)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/fairness/run.py " + shlex.join(
        shown_arguments(sys.argv[1:] if argv is None else argv)
    )
    started = time.perf_counter()
    config, enc, tables = setup(args.max_rows)
    rows = []
    for seed in args.seeds:
        for variant in VARIANTS:
            row = run_one(variant, seed, args, config, enc, tables)
            print(json.dumps({k: v for k, v in row.items()}), flush=True)
            rows.append(row)
    wall = time.perf_counter() - started
    write(args.results_dir, rows, summarise(rows), command.strip(), wall, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
