"""One training run end to end, and re-evaluation of a finished run.

A run directory holds everything needed later, without the training process:
``config.yaml`` (resolved), ``schema.json``, ``encoder.json``, ``model.pt`` (best weights),
``checkpoint.pt`` (resumable state), ``history.json`` and ``metrics.json``.

Under torchrun (several processes) every rank runs :func:`train_run`: rank 0 fits the encoder and
hands it to the others, writes every file and prints; all ranks train and evaluate together
(:mod:`mtlrec.train.distributed`). A Parquet training split larger than
``train.stream_threshold_mb`` (or any, with ``train.stream`` / ``--stream``) is streamed from disk
(:mod:`mtlrec.data.stream`); the validation and test splits are always read into memory.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mtlrec.balance import build_balancer
from mtlrec.balance.base import check_compile, check_optimizer
from mtlrec.config import (
    TrainConfig,
    config_changes,
    read_yaml,
    separator_option,
    split_named,
    train_config,
)
from mtlrec.data.checks import sequence_warnings, unseen_value_warnings
from mtlrec.data.datasets import DatasetSplits, load_dataset
from mtlrec.data.encoder import Encoder
from mtlrec.data.source import BatchSource
from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError, DataError, MTLRecError, first_line, make_dir
from mtlrec.models import MTLModel, build_model
from mtlrec.schema import Schema, schema_changes
from mtlrec.train import distributed as dist
from mtlrec.train.checkpoint import save_json, save_text, save_torch
from mtlrec.train.diagnostics import DIAGNOSTICS_FILE, GradientMonitor
from mtlrec.train.metrics import task_metrics, undefined_auc_warnings
from mtlrec.train.trainer import EpochRecord, Trainer, evaluate, predict

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (model initialisation, dropout),
    as ``mtlrec train`` does with ``train.seed`` before it builds the model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# What a run writes into its folder: a run that starts over (no --resume) removes them first, or
# an earlier run's checkpoint would be resumed, or its results read, as the new run's.
RUN_OUTPUTS = (
    "checkpoint.pt",
    "model.pt",
    "metrics.json",
    "history.json",
    DIAGNOSTICS_FILE,
    "config.yaml",
    "encoder.json",
    "schema.json",
)


def load_splits(config: dict[str, Any]) -> DatasetSplits:
    """The train, validation and test frames and the schema that ``config['dataset']`` names."""
    name, options = split_named(config["dataset"], "dataset")
    if name == SAVED_FROM_PYTHON:
        raise ConfigError(
            "this run was saved from Python (save_run) and records no dataset: evaluate or score "
            "a labelled file with --data FILE"
        )
    max_rows = options.pop("max_rows", None)
    return load_dataset(name, max_rows=max_rows, seed=config["train"]["seed"], **options)


def train_run(
    config: dict[str, Any],
    out_dir: str | Path,
    resume: bool = False,
    echo=print,
) -> dict[str, Any]:
    """Train, select on validation, test once; returns the metrics written to metrics.json.
    ``config``: a resolved configuration, ``mtlrec.config.resolve({...})`` (defaults, dataset
    preset and your keys merged), as ``mtlrec train`` builds it."""
    sections = ("dataset", "model", "train", "balance")
    if not all(isinstance(config.get(k), dict) for k in sections) or "seed" not in config["train"]:
        raise ConfigError(
            "train_run needs a resolved configuration (sections dataset, model, train, balance "
            "with every default): pass mtlrec.config.resolve(your_config)"
        )
    tcfg = train_config(config["train"])
    threads = torch.get_num_threads()  # train.threads holds for this run, not for the caller
    created = dist.init(tcfg.device)  # under torchrun: join the process group
    try:
        return _train_run(config, tcfg, Path(out_dir), resume, echo)
    finally:
        torch.set_num_threads(threads)
        if created:
            dist.cleanup()


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A run's ``checkpoint.pt``; a truncated or foreign file is an error naming it."""
    try:
        state = torch.load(path, weights_only=False, map_location=device)
    except Exception as exc:  # EOFError, UnpicklingError, RuntimeError of a truncated zip...
        raise MTLRecError(
            f"{path}: cannot read the checkpoint ({type(exc).__name__}: {first_line(exc)}); "
            "drop --resume to start over"
        ) from exc
    if not isinstance(state, dict) or "model" not in state:
        raise MTLRecError(f"{path}: not an mtlrec checkpoint; drop --resume to start over")
    return state


def _train_run(
    config: dict[str, Any], tcfg: TrainConfig, out: Path, resume: bool, echo
) -> dict[str, Any]:
    main = dist.is_main()  # rank 0 (or the only process) writes files and prints
    check_compile(tcfg.compile, config["balance"]["name"], tcfg.diagnose)
    check_optimizer(tcfg.optimizer, config["balance"]["name"])
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file is in the way; name a folder for the run")
    if resume:  # checked on rank 0, raised on every rank (none is left in a collective)
        _refuse_changes(out, "configuration", lambda: _resume_changes(out, config), main)
    if main:
        make_dir(out, "--out")
    else:
        echo = lambda *_: None  # noqa: E731
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    dist.local_batch_size(tcfg.batch_size)  # the global batch must split evenly over ranks
    seed_everything(tcfg.seed)
    model_name, model_options = split_named(config["model"], "model")
    balance_name, balance_options = split_named(config["balance"], "balance")

    started = time.perf_counter()
    stream_path = _stream_path(config, tcfg)
    train: TensorTable | BatchSource
    if stream_path is not None:
        from mtlrec.data.stream import ParquetStream, fit_encoder_stream

        schema, valid_frame, test_frame = _eval_frames(config)
        max_rows = (config["dataset"] or {}).get("max_rows")
        encoder = dist.main_then_broadcast(
            lambda: fit_encoder_stream(schema, stream_path, max_rows=max_rows, seed=tcfg.seed)
        )
        train = ParquetStream(
            stream_path,
            encoder,
            rank=dist.rank(),
            world=dist.world(),
            buffer_rows=tcfg.shuffle_buffer,
            max_rows=max_rows,
        )
        echo(f"streaming {stream_path}: {len(train):,} rows, {tcfg.shuffle_buffer:,}-row buffer")
    else:
        splits = load_splits(config)
        schema, valid_frame, test_frame = splits.schema, splits.valid, splits.test
        encoder = dist.main_then_broadcast(
            lambda: Encoder(schema).fit(splits.train, where=_where(splits.train, "train"))
        )
        train = encoder.transform(splits.train, where=_where(splits.train, "train"))
    if resume:  # the schema file may have changed under an unchanged config
        _refuse_changes(out, "schema", lambda: _resume_schema_changes(out, schema), main)
    valid_where = _where(valid_frame, "valid")
    valid = encoder.transform(valid_frame, where=valid_where)
    if len(valid) == 0:
        raise DataError(f"{valid_where}: the validation split has no rows")
    for line in undefined_auc_warnings(schema, valid.labels, valid_where):
        echo(line)
    in_memory = train if isinstance(train, TensorTable) else None
    for line in unseen_value_warnings(encoder, valid, valid_frame, valid_where, in_memory):
        echo(line)
    if stream_path is None:
        for line in sequence_warnings(encoder, splits.train, _where(splits.train, "train")):
            echo(line)
    load_seconds = time.perf_counter() - started

    device = tcfg.torch_device()
    model = build_model(model_name, schema, encoder.layout(), model_options).to(device)
    balancer = build_balancer(balance_name, model, balance_options)
    valid = valid.to(device)
    if isinstance(train, TensorTable):
        train = train.to(device)
    if main:
        # Starting over: nothing of an earlier run here may be read as this one's. Not before
        # the data, model and balancer are known good: a failed start keeps the earlier run.
        if not resume:
            for name in RUN_OUTPUTS:
                (out / name).unlink(missing_ok=True)
        encoder.save(out / "encoder.json")
        schema.save(out / "schema.json")
        save_text(yaml.safe_dump(config, sort_keys=False), out / "config.yaml")
    monitor = GradientMonitor.from_config(model, tcfg)  # None unless train.diagnose

    def report(rec: EpochRecord) -> None:
        parts = " ".join(
            f"{t}:{m.get('auc', m.get('mse', float('nan'))):.4f}" for t, m in rec.valid.items()
        )
        echo(
            f"epoch {rec.epoch}: valid {parts}  ({rec.seconds:.1f}s, "
            f"{rec.samples_per_second:,.0f} samples/s)"
        )
        if monitor is not None and main:  # every epoch: a crashed run keeps its diagnostics
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
    if resume:
        # Rank 0 reads the checkpoint and hands it to every rank (no shared filesystem needed).
        state = dist.broadcast_object(
            read_checkpoint(ckpt, device) if main and ckpt.exists() else None
        )
        if state is not None:
            try:
                trainer.load_state(state)
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # another model's
                raise MTLRecError(
                    f"{ckpt}: does not fit this run ({type(exc).__name__}: {first_line(exc)}); "
                    "use a new --out, or drop --resume to start over"
                ) from exc
            echo(f"resumed from {ckpt} at epoch {trainer.start_epoch + 1}")
            if monitor is not None and state.get("diagnostics") is None:  # an older checkpoint
                monitor.restore(out / DIAGNOSTICS_FILE, trainer.start_epoch)
    try:
        result = trainer.fit(train, valid)
    except BaseException:
        if monitor is not None and main:  # the steps before a divergence are the telling ones
            monitor.save(out / DIAGNOSTICS_FILE)
        raise

    if main:
        save_torch(
            {"model": model_name, "options": model_options, "state_dict": model.state_dict()},
            out / "model.pt",
        )
    # The test split is encoded and read exactly once, here, after model selection.
    test = encoder.transform(test_frame, where=_where(test_frame, "test")).to(device)
    metrics = {
        "valid": evaluate(model, valid, tcfg.eval_batch_size),
        "test": evaluate(model, test, tcfg.eval_batch_size) if len(test) else {},
    }
    metrics = _clean(metrics)
    if not main:
        return metrics
    if not len(test):
        echo("note: no test split (--test FILE or dataset.test_fraction): metrics.json holds "
             "validation metrics only")  # fmt: skip
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


def _refuse_changes(out: Path, what: str, changes_of: Callable[[], list[str]], main: bool) -> None:
    """A ConfigError listing ``changes_of()`` (computed on rank 0, raised on every rank) when
    the checkpoint in ``out`` was trained with another ``what``."""
    changes = dist.broadcast_object(changes_of() if main else [])
    if changes:
        raise ConfigError(
            f"{out}: cannot resume a run trained with another {what} ("
            + "; ".join(changes[:6])
            + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
            + "); use a new --out, or drop --resume to start over"
        )


def _resume_changes(out: Path, config: dict[str, Any]) -> list[str]:
    """What differs between the config a checkpoint in ``out`` was trained with and ``config``
    (keys that only change how long or where it runs, like train.epochs, may differ)."""
    saved = out / "config.yaml"
    if not (out / "checkpoint.pt").exists() or not saved.exists():
        return []
    return config_changes(read_run_config(saved), config)


def _resume_schema_changes(out: Path, schema: Schema) -> list[str]:
    """What differs between the schema a checkpoint in ``out`` was trained with and ``schema``."""
    saved = out / "schema.json"
    if not (out / "checkpoint.pt").exists() or not saved.exists():
        return []
    return schema_changes(Schema.load(saved), schema)


def read_run_config(path: Path) -> dict[str, Any]:
    """A run's saved config.yaml; a broken or hand-edited one is one error line naming it."""
    config = read_yaml(path, "a run's configuration")
    if not isinstance(config, dict) or not isinstance(config.get("train"), dict):
        raise ConfigError(f"{path}: not a run's configuration (no train section)")
    return config


SAVED_FROM_PYTHON = "python"  # dataset.name of a run folder written by save_run


def save_run(
    out_dir: str | Path, model: MTLModel, encoder: Encoder, train: TrainConfig | None = None
) -> Path:
    """A run folder for a model trained from Python (``Trainer``): ``load_run``,
    ``mtlrec evaluate RUN --data FILE``, ``mtlrec predict``, ``export`` and ``serve`` read it as
    they read a folder of ``mtlrec train``. It records no dataset, so evaluate a labelled file
    with ``--data``; ``train`` (optional) is recorded in its config.yaml."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: a file is in the way; name a folder for the run")
    out.mkdir(parents=True, exist_ok=True)
    options = json.loads(json.dumps(asdict(model.config)))  # tuples -> lists, as YAML holds them
    config = {
        "dataset": {"name": SAVED_FROM_PYTHON},
        "model": {"name": model.name, **options},
        "train": asdict(train or TrainConfig()),
    }
    save_torch(
        {"model": model.name, "options": options, "state_dict": model.state_dict()},
        out / "model.pt",
    )
    encoder.save(out / "encoder.json")
    encoder.schema.save(out / "schema.json")
    save_text(yaml.safe_dump(config, sort_keys=False), out / "config.yaml")
    return out


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], Encoder, MTLModel]:
    """Config, encoder and best model of a finished run."""
    run = Path(run_dir)
    for name in ("config.yaml", "encoder.json", "model.pt"):
        if not (run / name).exists():
            raise MTLRecError(f"{run}: not a finished run directory ({name} is missing)")
    config = read_run_config(run / "config.yaml")
    encoder = Encoder.load(run / "encoder.json")
    try:
        saved = torch.load(run / "model.pt", weights_only=False, map_location="cpu")
        model = build_model(saved["model"], encoder.schema, encoder.layout(), saved["options"])
        model.load_state_dict(saved["state_dict"])
    except MTLRecError:
        raise
    except Exception as exc:  # truncated copy, another file under that name, other weights
        raise MTLRecError(
            f"{run / 'model.pt'}: cannot load the model (truncated or corrupt? {first_line(exc)})"
        ) from None
    model.eval()
    return config, encoder, model


def csv_separator(config: dict[str, Any]) -> str:
    """The separator of a run's CSV files (``dataset.sep``), for files scored or evaluated with
    it later: a run trained on TSV files reads TSV files."""
    return str((config.get("dataset") or {}).get("sep") or ",")


def eval_batch_size(config: dict[str, Any]) -> int:
    """A saved run's evaluation batch (runs saved before the key existed get the default)."""
    return int(config["train"].get("eval_batch_size", TrainConfig.eval_batch_size))


def evaluate_run(
    run_dir: str | Path,
    data: str | None = None,
    warn: Callable[[str], None] | None = None,
    sep: str | None = None,
) -> dict[str, Any]:
    """Metrics of a finished run on its dataset's test split, or on a given file (a Parquet file
    or folder is read a record batch at a time; only the predictions and labels are kept).
    ``warn``: called with each warning about the file (mostly unseen categorical values)."""
    config, encoder, model = load_run(run_dir)
    batch = eval_batch_size(config)
    if data:
        sep = separator_option(sep) or csv_separator(config)
        return _clean({Path(data).name: _evaluate_file(model, encoder, data, batch, warn, sep)})
    splits = load_splits(config)
    if len(splits.test) == 0:
        raise MTLRecError(
            f"{run_dir}: this run has no test split (no --test file or dataset.test_fraction); "
            "evaluate a labelled file with --data FILE"
        )
    table = encoder.transform(splits.test, where=_where(splits.test, "test"))
    return _clean({"test": evaluate(model, table, batch)})


def _evaluate_file(
    model: MTLModel,
    encoder: Encoder,
    data: str,
    batch: int,
    warn: Callable[[str], None] | None,
    sep: str = ",",
) -> dict[str, dict[str, float]]:
    from mtlrec.data.stream import file_chunks, training_only_columns

    optional = training_only_columns(encoder.schema, model.training_only_features())
    rows, chunks = file_chunks(data, encoder.schema.required_columns(), sep=sep, optional=optional)
    if rows == 0:
        raise DataError(f"{data}: no rows to evaluate")
    labels, cond, joint = [], [], []
    for where, first_row, frame in chunks:
        table = encoder.transform(frame, where=where, first_row=first_row)
        if not labels and warn is not None:
            for line in unseen_value_warnings(encoder, table, frame, where):
                warn(line)
        c, j = predict(model, table, batch)
        labels.append(table.labels)
        cond.append(c)
        joint.append(j)
    return task_metrics(encoder.schema, torch.cat(labels), torch.cat(cond), torch.cat(joint))


def _stream_path(config: dict[str, Any], tcfg: TrainConfig) -> str | None:
    """The training Parquet file or folder to stream, or None to load the split in memory:
    with ``train.stream``, or automatically above ``train.stream_threshold_mb``."""
    from mtlrec.data.readers import is_parquet
    from mtlrec.data.stream import data_size_mb

    name, options = split_named(config["dataset"], "dataset")
    path = options.get("train") if name == "files" else None
    if name == "files" and any(options.get(k) for k in SPLIT_KEYS):
        if tcfg.stream:
            raise ConfigError(
                "train.stream: dataset.valid_fraction / test_fraction / split_by cut the "
                "training file in memory; give separate dataset.valid / dataset.test files to "
                "stream dataset.train"
            )
        return None  # the split needs the whole file in memory, whatever its size
    if tcfg.stream:
        if not path or not is_parquet(path):
            raise ConfigError(
                "train.stream: streaming reads a Parquet training split; use dataset.name: files "
                "with dataset.train set to a .parquet file or a folder of them"
                + (f" (got {path})" if path else f" (dataset is {name!r})")
            )
        return str(path)
    if path and is_parquet(path) and data_size_mb(path) > tcfg.stream_threshold_mb:
        return str(path)
    return None


SPLIT_KEYS = ("valid_fraction", "test_fraction", "split_by")


def _eval_frames(config: dict[str, Any]):
    """Schema, validation and test frames of a 'files' dataset whose training split streams."""
    from mtlrec.data.readers import read_frame

    _, options = split_named(config["dataset"], "dataset")
    allowed = {"train", "valid", "test", "schema", "sep", "max_rows"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key(s) dataset.{', dataset.'.join(unknown)} for dataset 'files'; "
            f"allowed: {', '.join(['name', *sorted(allowed)])}"
        )
    if not options.get("valid") or not options.get("schema"):
        raise ConfigError("dataset 'files' needs dataset.train, dataset.valid and dataset.schema")
    schema = Schema.load(options["schema"])
    cols = schema.required_columns()
    sep, max_rows = options.get("sep", ","), options.get("max_rows")
    valid = read_frame(options["valid"], columns=cols, sep=sep, max_rows=max_rows)
    test = (
        read_frame(options["test"], columns=cols, sep=sep, max_rows=max_rows)
        if options.get("test")
        else valid.iloc[:0]
    )
    return schema, valid, test


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
