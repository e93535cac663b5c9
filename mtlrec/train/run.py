"""One training run end to end, and re-evaluation of a finished run.

A run directory holds everything needed later, without the training process:
``config.yaml`` (resolved), ``schema.json``, ``encoder.json``, ``model.pt`` (best weights),
``checkpoint.pt`` (resumable state), ``history.json`` and ``metrics.json``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mtlrec.balance import build_balancer
from mtlrec.config import split_named, train_config
from mtlrec.data.datasets import DatasetSplits, load_dataset
from mtlrec.data.encoder import Encoder
from mtlrec.errors import DataError, MTLRecError
from mtlrec.models import MTLModel, build_model
from mtlrec.train.checkpoint import save_json, save_text, save_torch
from mtlrec.train.diagnostics import DIAGNOSTICS_FILE, GradientMonitor
from mtlrec.train.trainer import EpochRecord, Trainer, evaluate

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_splits(config: dict[str, Any]) -> DatasetSplits:
    name, options = split_named(config["dataset"], "dataset")
    max_rows = options.pop("max_rows", None)
    return load_dataset(name, max_rows=max_rows, seed=config["train"]["seed"], **options)


def train_run(
    config: dict[str, Any],
    out_dir: str | Path,
    resume: bool = False,
    echo=print,
) -> dict[str, Any]:
    """Train, select on validation, test once; returns the metrics written to metrics.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = train_config(config["train"])
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    seed_everything(tcfg.seed)
    model_name, model_options = split_named(config["model"], "model")
    balance_name, balance_options = split_named(config["balance"], "balance")

    started = time.perf_counter()
    splits = load_splits(config)
    encoder = Encoder(splits.schema).fit(splits.train, where=_where(splits.train, "train"))
    train = encoder.transform(splits.train, where=_where(splits.train, "train"))
    valid = encoder.transform(splits.valid, where=_where(splits.valid, "valid"))
    if len(train) == 0 or len(valid) == 0:
        raise DataError("the train and validation splits need at least one row each")
    load_seconds = time.perf_counter() - started

    model = build_model(model_name, splits.schema, encoder.layout(), model_options)
    balancer = build_balancer(balance_name, model, balance_options)
    encoder.save(out / "encoder.json")
    splits.schema.save(out / "schema.json")
    save_text(yaml.safe_dump(config, sort_keys=False), out / "config.yaml")
    monitor = GradientMonitor.from_config(model, tcfg)  # None unless train.diagnose
    if not resume:  # a stale file from an earlier run in this folder would mislead 'report'
        (out / DIAGNOSTICS_FILE).unlink(missing_ok=True)

    def report(rec: EpochRecord) -> None:
        parts = " ".join(
            f"{t}:{m.get('auc', m.get('mse', float('nan'))):.4f}" for t, m in rec.valid.items()
        )
        echo(
            f"epoch {rec.epoch}: valid {parts}  ({rec.seconds:.1f}s, "
            f"{rec.samples_per_second:,.0f} samples/s)"
        )
        if monitor is not None:  # written every epoch, so a crashed run keeps its diagnostics
            monitor.save(out / DIAGNOSTICS_FILE)
            for line in monitor.warnings():
                echo(line)

    trainer = Trainer(
        model,
        balancer,
        tcfg,
        checkpoint_path=out / "checkpoint.pt",
        on_epoch=report,
        monitor=monitor,
    )
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.exists():
        trainer.load_state(torch.load(ckpt, weights_only=False))
        echo(f"resumed from {ckpt} at epoch {trainer.start_epoch + 1}")
        if monitor is not None:
            monitor.restore(out / DIAGNOSTICS_FILE, trainer.start_epoch)
    result = trainer.fit(train, valid)

    save_torch(
        {"model": model_name, "options": model_options, "state_dict": model.state_dict()},
        out / "model.pt",
    )
    # The test split is encoded and read exactly once, here, after model selection.
    test = encoder.transform(splits.test, where=_where(splits.test, "test"))
    metrics = {
        "valid": evaluate(model, valid, tcfg.eval_batch_size),
        "test": evaluate(model, test, tcfg.eval_batch_size) if len(test) else {},
    }
    metrics = _clean(metrics)
    save_json(metrics, out / "metrics.json")
    save_json(
        {
            "model": model_name,
            "balancer": balance_name,
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "load_seconds": load_seconds,
            "parameters": sum(p.numel() for p in model.parameters()),
            "epochs": [_clean(asdict(r)) for r in result.history],
        },
        out / "history.json",
    )
    return metrics


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], Encoder, MTLModel]:
    """Config, encoder and best model of a finished run."""
    run = Path(run_dir)
    for name in ("config.yaml", "encoder.json", "model.pt"):
        if not (run / name).exists():
            raise MTLRecError(f"{run}: not a finished run directory ({name} is missing)")
    config = yaml.safe_load((run / "config.yaml").read_text())
    encoder = Encoder.load(run / "encoder.json")
    saved = torch.load(run / "model.pt", weights_only=False)
    model = build_model(saved["model"], encoder.schema, encoder.layout(), saved["options"])
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return config, encoder, model


def evaluate_run(run_dir: str | Path, data: str | None = None) -> dict[str, Any]:
    """Metrics of a finished run on its dataset's test split, or on a given file."""
    from mtlrec.data.readers import read_frame

    config, encoder, model = load_run(run_dir)
    batch = int(config["train"].get("eval_batch_size", 16384))
    if data:
        frame = read_frame(data, columns=encoder.schema.required_columns())
        return _clean({Path(data).name: evaluate(model, encoder.transform(frame, data), batch)})
    splits = load_splits(config)
    table = encoder.transform(splits.test, where=_where(splits.test, "test"))
    return _clean({"test": evaluate(model, table, batch)})


def _where(frame, split: str) -> str:
    return frame.attrs.get("source", split)


def _clean(value: Any) -> Any:
    """NaN -> None so the JSON is valid (an undefined AUC stays visible as null)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value
