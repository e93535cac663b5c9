"""Run configuration: YAML files mapped onto sections, CLI overrides, errors that name the key.

A run config has four sections::

    dataset: {name: census-income, max_rows: null, ...dataset options}   # or train/valid/test/schema files
    model:   {name: mmoe, embed_dim: 16, num_experts: 8, ...model options}
    train:   {epochs: 15, batch_size: 1024, lr: 0.001, ...}               # TrainConfig
    balance: {name: fixed, ...balancer options}

Resolution order, later wins: built-in defaults < the dataset's preset (``mtlrec/presets``) < the
user's ``--config`` file < ``--set section.key=value`` and the dedicated flags.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mtlrec.errors import ConfigError

SECTIONS = ("dataset", "model", "train", "balance")
FILE_KEYS = ("train", "valid", "test", "schema")  # the paths of dataset 'files'


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 1024
    eval_batch_size: int = 16384
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_decay: float = 1.0  # learning rate multiplied by this after every epoch
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: at each epoch only)
    patience: int = 3
    monitor: str = "auc"  # "auc" (mean over binary tasks) or "loss"
    seed: int = 2024
    threads: int = 0  # 0: leave torch's default
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto" (CUDA when available)
    progress: bool = True
    diagnose: bool = False  # record per-task gradient norms / cosines (diagnostics.json)
    diagnose_every: int = 1  # record every N-th training step when diagnosing
    optimizer: str = "adam"  # "adam" or "sgd" (plain SGD: exact comparisons, ablations)
    compile: bool = False  # torch.compile the training forward (pays a compile warm-up once)
    precision: str = "fp32"  # "bf16": forward under bfloat16 autocast (weights stay fp32)
    stream: bool = False  # stream the training Parquet from disk instead of loading it
    stream_threshold_mb: float = 2048.0  # stream automatically above this training-file size
    shuffle_buffer: int = 65536  # rows held by the streaming reader's shuffle buffer
    # Meta-training over scenarios (mtlrec.train.meta; a model with a scenario feature: metaheac)
    meta: bool = False  # episodes of support/query splits per scenario instead of plain steps
    meta_tasks: int = 5  # scenarios per episode (0: every scenario in the batch)
    meta_support: float = 0.5  # fraction of a scenario's rows in the episode used as support
    inner_lr: float = 0.01  # SGD step size of the inner (per-scenario) update
    inner_steps: int = 1  # inner SGD steps per scenario

    def torch_device(self):
        """The device to train on; an unknown or unavailable one is a ConfigError."""
        import torch

        name = "cuda" if self.device == "auto" and torch.cuda.is_available() else self.device
        name = "cpu" if name == "auto" else name
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise ConfigError(f"train.device: {self.device!r} is not a device") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"train.device: {self.device!r} requested but CUDA is not available")
        return device

    def __post_init__(self) -> None:
        if self.monitor not in ("auc", "loss"):
            raise ConfigError(f"train.monitor: {self.monitor!r} is not 'auc' or 'loss'")
        for key in ("epochs", "batch_size", "eval_batch_size", "diagnose_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1")
        for key in ("patience", "checkpoint_every", "threads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0")
        if not self.lr > 0:  # also NaN
            raise ConfigError(f"train.lr must be > 0 (got {self.lr})")
        if not self.weight_decay >= 0:  # also NaN
            raise ConfigError(f"train.weight_decay must be >= 0 (got {self.weight_decay})")
        self.torch_device()  # fail early on a bad or unavailable device
        if not 0 < self.lr_decay <= 1:
            raise ConfigError("train.lr_decay must be in (0, 1]")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"train.optimizer: {self.optimizer!r} is not 'adam' or 'sgd'")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision: {self.precision!r} is not 'fp32' or 'bf16'")
        if self.shuffle_buffer < 1:
            raise ConfigError("train.shuffle_buffer must be >= 1")
        if self.stream_threshold_mb < 0:
            raise ConfigError("train.stream_threshold_mb must be >= 0")
        if not self.inner_lr > 0:
            raise ConfigError(f"train.inner_lr must be > 0 (got {self.inner_lr})")
        if self.inner_steps < 1:
            raise ConfigError("train.inner_steps must be >= 1")
        if self.meta_tasks < 0:
            raise ConfigError("train.meta_tasks must be >= 0 (0: every scenario in the batch)")
        if not 0 < self.meta_support < 1:
            raise ConfigError(f"train.meta_support must be in (0, 1) (got {self.meta_support})")


def default_config() -> dict[str, Any]:
    return {
        "dataset": {"name": "synthetic-mmoe"},
        "model": {"name": "mmoe"},
        "train": asdict(TrainConfig()),
        "balance": {"name": "fixed"},
    }


def preset(dataset: str | None) -> dict[str, Any]:
    """The dataset's tuned defaults (``mtlrec/presets/<dataset>.yaml``), if it has one."""
    if not dataset:
        return {}
    ref = resources.files("mtlrec.presets").joinpath(f"{dataset}.yaml")
    if not ref.is_file():
        return {}
    return yaml.safe_load(ref.read_text()) or {}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections")
    check_sections(data, str(path))
    return data


def check_sections(data: dict[str, Any], where: str) -> None:
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown config section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}"
        )
    for name, section in data.items():
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{where}: section {name!r} must be a mapping")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "weights":
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``section.key=value`` (value parsed as YAML) -> nested mapping."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or parts[0] not in SECTIONS or not all(parts):
        raise ConfigError(
            f"--set {text!r}: key must start with one of {', '.join(SECTIONS)} (e.g. train.lr=0.01)"
        )
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: cannot parse value ({exc})") from exc
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def resolve(
    user: dict[str, Any] | None = None, overrides: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Defaults < dataset preset < user file < overrides. Model-specific preset entries live under
    ``models: {name: {...}}`` in the preset and are applied for the chosen model only."""
    user = user or {}
    layered = merge(default_config(), {})
    stack = [user, *(overrides or [])]
    dataset = None
    model = None
    for layer in stack:
        dataset = (layer.get("dataset") or {}).get("name", dataset)
        model = (layer.get("model") or {}).get("name", model)
    dataset = dataset or layered["dataset"]["name"]
    model = model or layered["model"]["name"]
    p = preset(dataset)
    per_model = (p.pop("models", None) or {}).get(model, {})
    check_sections(p, f"preset {dataset}")
    layered = merge(layered, p)
    layered = merge(layered, per_model)
    for layer in stack:
        layered = merge(layered, layer)
    if layered["dataset"].get("name") == "files":
        # Absolute, so that evaluate / reproduce / export find the files from any directory.
        layered["dataset"] = _absolute_files(layered["dataset"])
    return layered


def _absolute_files(dataset: dict[str, Any]) -> dict[str, Any]:
    """``dataset`` with its file paths (FILE_KEYS) made absolute, relative to this directory."""
    return {
        key: str(Path(value).expanduser().absolute())
        if key in FILE_KEYS and isinstance(value, str) and value
        else value
        for key, value in dataset.items()
    }


def train_config(section: dict[str, Any]) -> TrainConfig:
    allowed = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown key(s) train.{', train.'.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    values = {}
    for key, value in section.items():
        default = allowed[key].default
        try:
            values[key] = type(default)(value) if not isinstance(default, bool) else bool(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"train.{key}: expected {type(default).__name__}, got {value!r}"
            ) from exc
    return TrainConfig(**values)


def split_named(section: dict[str, Any], what: str) -> tuple[str, dict[str, Any]]:
    """``{name: x, ...options}`` -> (x, options)."""
    options = dict(section or {})
    name = options.pop("name", None)
    if not name:
        raise ConfigError(f"{what}.name is not set")
    return str(name), options


# Keys a resumed or reused run may change: how long and how it runs, not what it learns.
RESUMABLE_KEYS = frozenset(
    {
        "train.epochs",
        "train.patience",
        "train.progress",
        "train.threads",
        "train.checkpoint_every",
        "train.eval_batch_size",
        "train.device",
    }
)

# A finished run read back as a result: its epochs and patience shaped that result too.
REUSABLE_KEYS = RESUMABLE_KEYS - {"train.epochs", "train.patience"}


def config_changes(
    old: dict[str, Any], new: dict[str, Any], ignore: frozenset[str] = RESUMABLE_KEYS
) -> list[str]:
    """``section.key: old -> new`` for every resolved key that differs, outside ``ignore``.
    ``new`` goes through a YAML round trip first, as the saved ``config.yaml`` did."""
    flat_old = _flatten(old)
    flat_new = _flatten(yaml.safe_load(yaml.safe_dump(new)))
    missing = object()

    def show(flat: dict[str, Any], key: str) -> str:
        return repr(flat[key]) if key in flat else "(unset)"

    return [
        f"{key}: {show(flat_old, key)} -> {show(flat_new, key)}"
        for key in sorted(set(flat_old) | set(flat_new))
        if key not in ignore and flat_old.get(key, missing) != flat_new.get(key, missing)
    ]


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    config = dict(config or {})
    # A run saved with a relative path (older versions) names the same file.
    config["dataset"] = _absolute_files(config.get("dataset") or {})
    return {
        f"{section}.{key}": value
        for section, values in config.items()
        for key, value in (values or {}).items()
    }
