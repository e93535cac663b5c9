"""torch-rechub 0.9.0 on exactly mtlrec's Census-Income split: the peer numbers, measured here.

Why: the issue quotes torch-rechub's test AUC on "this split", but the validation/test halves of
the Census test file depend on how they were shuffled, and the never-married AUC differs by
~0.0003 between the two halves of our own split (about one standard error of an AUC near 0.995
on 50k rows). Comparing our test AUC with numbers measured on another half would compare halves,
not libraries. This script trains torch-rechub's own models, with the architectures and
optimiser settings of its ``examples/ranking/run_census.py`` (embedding dim 4; MMoE 8 experts
[16], towers [8]; PLE one level, 2 specific + 1 shared expert [16]; Shared-Bottom [117];
AITM bottom [32, 16]; Adam lr 1e-3, weight decay 1e-4, batch 1024, 15 epochs, its
``MTLTrainer``), on mtlrec's encoded arrays of the same split (categorical vocabularies with an
out-of-vocabulary bucket, standardised numerics; torch-rechub's example feeds its own
label-encoded CSV instead), and scores the validation and the test half.

Usage::

    python benchmarks/census/peers.py                       # 4 models x 3 seeds (~1 h, 1 core)
    python benchmarks/census/peers.py --models mmoe --seeds 1 --epochs 1 --out /tmp/p   # a check

Each finished run is kept in ``OUT/<model>-seed<N>.json`` and reused, so an interrupted run
resumes. Writes ``peers.json`` beside this file; ``run.py --report-only`` renders it into
RESULTS.md next to mtlrec's own rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "speed"))

from run import ensure_peers  # noqa: E402  (benchmarks/speed/run.py: installs the peers)

EPOCHS = 15
BATCH = 1024
LR = 1e-3
WEIGHT_DECAY = 1e-4
EMBED_DIM = 4
MODELS = ["mmoe", "ple", "shared-bottom", "aitm"]


def build_rechub(name: str, features: list[Any]) -> Any:
    """torch-rechub's model ``name`` as its Census example configures it."""
    from torch_rechub.models.multi_task import AITM, MMOE, PLE, SharedBottom

    types = ["classification", "classification"]
    towers = [{"dims": [8]}, {"dims": [8]}]
    if name == "mmoe":
        return MMOE(features, types, 8, expert_params={"dims": [16]}, tower_params_list=towers)
    if name == "ple":
        return PLE(
            features, types, n_level=1, n_expert_specific=2, n_expert_shared=1,
            expert_params={"dims": [16]}, tower_params_list=towers,
        )  # fmt: skip
    if name == "shared-bottom":
        return SharedBottom(
            features, types, bottom_params={"dims": [117]}, tower_params_list=towers
        )
    if name == "aitm":
        return AITM(features, 2, bottom_params={"dims": [32, 16]}, tower_params_list=towers)
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def run_one(name: str, seed: int, epochs: int, data: tuple) -> dict[str, Any]:
    """Train torch-rechub's ``name`` for ``epochs`` with ``seed``; AUC on both halves."""
    import torch
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    from mtlrec.bench.rechub import rechub_columns, rechub_features

    layout, tasks, train, valid, test = data
    torch.manual_seed(seed)
    model = build_rechub(name, rechub_features(layout, EMBED_DIM))
    x = {
        k: rechub_columns(layout, t)
        for k, t in (("train", train), ("valid", valid), ("test", test))
    }
    y = {k: t.labels.numpy() for k, t in (("train", train), ("valid", valid), ("test", test))}
    train_dl, valid_dl, test_dl = DataGenerator(x["train"], y["train"]).generate_dataloader(
        x_val=x["valid"], y_val=y["valid"], x_test=x["test"], y_test=y["test"], batch_size=BATCH
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = MTLTrainer(
            model,
            task_types=["classification", "classification"],
            optimizer_params={"lr": LR, "weight_decay": WEIGHT_DECAY},
            n_epoch=epochs,
            earlystop_patience=30,  # the example's: never stops inside 15 epochs
            model_path=tmp,
        )
        trainer.fit(train_dl, valid_dl)
    seconds = time.perf_counter() - started
    return {
        "model": name,
        "seed": seed,
        "epochs": epochs,
        "seconds_per_epoch": seconds / epochs,
        "parameters": sum(p.numel() for p in model.parameters()),
        "valid": dict(zip(tasks, map(float, trainer.evaluate(model, valid_dl)), strict=True)),
        "test": dict(zip(tasks, map(float, trainer.evaluate(model, test_dl)), strict=True)),
    }


def gbdt_reference() -> dict[str, Any]:
    """A strong non-neural reference on the same halves: scikit-learn's histogram gradient-boosted
    trees, one per task, on the raw columns (categorical columns as native categories), early
    stopping on 10 % of the training split. It shows how high an AUC each half allows."""
    import pandas as pd
    from sklearn.ensemble import HistGradientBoostingClassifier

    from mtlrec.data.datasets import load_dataset
    from mtlrec.train.metrics import auc

    splits = load_dataset("census-income")
    names = [f.name for f in splits.schema.features]
    categorical = [f.name for f in splits.schema.features if f.type == "categorical"]
    levels = {c: pd.Categorical(splits.train[c]).categories for c in categorical}

    def frame(df: pd.DataFrame) -> pd.DataFrame:
        x = df[names].copy()
        for c in categorical:
            x[c] = pd.Categorical(x[c], categories=levels[c])
        return x

    x = {"train": frame(splits.train), "valid": frame(splits.valid), "test": frame(splits.test)}
    started = time.perf_counter()
    run: dict[str, Any] = {"model": "hist-gbdt", "seed": 0, "epochs": 0, "valid": {}, "test": {}}
    for task in [t.name for t in splits.schema.tasks]:
        model = HistGradientBoostingClassifier(
            categorical_features="from_dtype", learning_rate=0.03, max_iter=3000,
            max_leaf_nodes=63, early_stopping=True, random_state=0,
        )  # fmt: skip
        model.fit(x["train"], splits.train[task])
        for split in ("valid", "test"):
            scores = model.predict_proba(x[split])[:, 1]
            run[split][task] = auc(getattr(splits, split)[task].to_numpy(), scores)
    run["seconds_per_epoch"] = time.perf_counter() - started
    run["parameters"] = 0
    return run


def census_arrays() -> tuple:
    """(layout, task names, train, valid, test) of the encoded Census-Income split."""
    from mtlrec.bench.rechub import encoded_census

    encoder, tables = encoded_census(("train", "valid", "test"))
    tasks = [t.name for t in encoder.schema.tasks]
    return encoder.layout(), tasks, tables["train"], tables["valid"], tables["test"]


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and sample std per (model, split, task) over seeds."""
    rows = []
    for name in dict.fromkeys(r["model"] for r in runs):
        rs = [r for r in runs if r["model"] == name]
        row: dict[str, Any] = {"model": name, "seeds": [r["seed"] for r in rs]}
        for split in ("valid", "test"):
            for task in rs[0][split]:
                values = [r[split][task] for r in rs]
                row[f"{split}_{task}_mean"] = statistics.fmean(values)
                row[f"{split}_{task}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["seconds_per_epoch"] = statistics.fmean(r["seconds_per_epoch"] for r in rs)
        row["parameters"] = rs[0]["parameters"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-gbdt", action="store_true", help="skip the gradient-boosting row")
    parser.add_argument("--out", type=Path, default=HERE / "runs" / "torch-rechub")
    parser.add_argument("--results", type=Path, default=HERE / "peers.json")
    args = parser.parse_args(argv)

    import torch

    ensure_peers()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = None
    runs = []
    jobs = [(name, seed) for name in args.models for seed in args.seeds]
    if not args.no_gbdt:
        jobs.append(("hist-gbdt", 0))
    for name, seed in jobs:
        path = args.out / f"{name}-seed{seed}.json"
        epochs = 0 if name == "hist-gbdt" else args.epochs
        if path.exists() and json.loads(path.read_text())["epochs"] == epochs:
            runs.append(json.loads(path.read_text()))
            continue
        if name == "hist-gbdt":
            run = gbdt_reference()
        else:
            data = data or census_arrays()
            run = run_one(name, seed, args.epochs, data)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(run, indent=1) + "\n")
        tmp.replace(path)
        print(json.dumps(run), flush=True)
        runs.append(run)
    meta = {
        "command": "python benchmarks/census/peers.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "threads": args.threads,
        "settings": {"epochs": args.epochs, "batch": BATCH, "lr": LR,
                     "weight_decay": WEIGHT_DECAY, "embed_dim": EMBED_DIM},
    }  # fmt: skip
    args.results.write_text(
        json.dumps({"meta": meta, "rows": summarise(runs), "runs": runs}, indent=1) + "\n"
    )
    for row in summarise(runs):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
