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
import math
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
    """The ``train:`` section: optimisation, early stopping, device, precision, checkpoints,
    diagnostics (values checked and converted on construction)."""

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
        # Built in code as well as from YAML: convert like train_config (1.9 epochs is an error)
        for f in fields(self):
            setattr(self, f.name, _TYPED[type(f.default)](getattr(self, f.name), f"train.{f.name}"))
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
        for key in ("lr", "weight_decay", "inner_lr"):  # inf would train to NaN weights
            if math.isinf(getattr(self, key)):
                raise ConfigError(f"train.{key} must be finite (got {getattr(self, key)})")
        self.torch_device()  # fail early on a bad or unavailable device
        if not 0 < self.lr_decay <= 1:
            raise ConfigError("train.lr_decay must be in (0, 1]")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"train.optimizer: {self.optimizer!r} is not 'adam' or 'sgd'")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision: {self.precision!r} is not 'fp32' or 'bf16'")
        if self.shuffle_buffer < 1:
            raise ConfigError("train.shuffle_buffer must be >= 1")
        if not self.stream_threshold_mb >= 0:  # also NaN; .inf: never stream automatically
            raise ConfigError(
                f"train.stream_threshold_mb must be >= 0 (got {self.stream_threshold_mb})"
            )
        if not self.inner_lr > 0:
            raise ConfigError(f"train.inner_lr must be > 0 (got {self.inner_lr})")
        if self.inner_steps < 1:
            raise ConfigError("train.inner_steps must be >= 1")
        if self.meta_tasks < 0:
            raise ConfigError("train.meta_tasks must be >= 0 (0: every scenario in the batch)")
        if not 0 < self.meta_support < 1:
            raise ConfigError(f"train.meta_support must be in (0, 1) (got {self.meta_support})")


def default_config() -> dict[str, Any]:
    """Every section with its defaults (the base that presets and your keys are merged onto)."""
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
    """A YAML config file as a mapping of sections; an unreadable file or a wrong section is a
    ConfigError."""
    path = Path(path)
    data = read_yaml(path, "config")
    if data is None:  # an empty file: nothing to change
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections")
    check_sections(data, str(path))
    return data


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML (or JSON) document in ``path``. Every way it can fail, unreadable (``what``
    names the file's role), not UTF-8 or not YAML, is one ConfigError line naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}, 0x{raw[exc.start]:02x} on line {line}); "
            "save it as UTF-8"
        ) from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML; a syntax error is one line, ``WHERE line L column C: not valid
    YAML: problem``, instead of PyYAML's multi-line dump with a caret."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(exc, text, where)) from exc


def _yaml_error(exc: yaml.YAMLError, text: str, where: str) -> str:
    """PyYAML's problem and its 0-based mark as one line with a 1-based line and column."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        line, column = mark.line + 1, mark.column + 1
        message = f"{where} line {line} column {column}: not valid YAML: {_one_line(problem)}"
        context, at = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and at is not None and (at.line, at.column) != (mark.line, mark.column):
            message += f" ({_one_line(context)} at line {at.line + 1} column {at.column + 1})"
        return message
    if isinstance(exc, yaml.reader.ReaderError):  # a control character: no mark, a position
        before = text[: exc.position]
        line, column = before.count("\n") + 1, exc.position - before.rfind("\n")
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return (
            f"{where} line {line} column {column}: not valid YAML: character {char:#06x}: "
            f"{exc.reason}"
        )
    return f"{where}: not valid YAML ({_one_line(str(exc))})"


def _one_line(text: str) -> str:
    """Whitespace runs, newlines included, as one space: the CLI prints one line."""
    return " ".join(str(text).split())


def check_sections(data: dict[str, Any], where: str) -> None:
    """Refuse a section name that is not dataset, model, train or balance (``where`` names the
    file)."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown config section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}"
        )
    for name, section in data.items():
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{where}: section {name!r} must be a mapping")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged onto ``base`` section by section (a new dict; neither is changed)."""
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
    value = parse_yaml(raw, f"--set {text!r}: value")
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
    layered["dataset"] = _checked_dataset(layered["dataset"] or {})
    if layered["dataset"].get("name") == "files":
        # Absolute, so that evaluate / reproduce / export find the files from any directory.
        layered["dataset"] = _absolute_files(layered["dataset"])
    return layered


def _checked_dataset(dataset: dict[str, Any]) -> dict[str, Any]:
    """``dataset`` with ``max_rows`` and ``sep`` checked here, where the CLI's ``--max-rows`` and
    ``--set`` land too, rather than failing deep inside pandas with a traceback."""
    dataset = dict(dataset)
    max_rows = dataset.get("max_rows")
    if max_rows is not None:
        if isinstance(max_rows, bool) or not _is_whole(max_rows) or max_rows < 1:
            raise ConfigError(
                f"dataset.max_rows: expected an integer >= 1, or null for all rows; got {max_rows!r}"
            )
        dataset["max_rows"] = int(max_rows)
    if "sep" in dataset:
        dataset["sep"] = _separator(dataset["sep"])
    return dataset


def _separator(value: Any, key: str = "dataset.sep") -> str:
    """One character; the text ``\\t`` (YAML leaves it unescaped unless double-quoted) and the word
    ``tab`` are a tab. ``key``: the option named in the error."""
    if isinstance(value, str) and (value == "\\t" or value.lower() == "tab"):
        return "\t"
    if not isinstance(value, str) or len(value) != 1 or value in "\r\n":
        raise ConfigError(
            f"{key}: expected one character (not a line break), got {value!r}; "
            f"write a tab as \\t or tab ({'--set dataset.sep' if key == 'dataset.sep' else key}=tab)"
        )
    return value


def separator_option(value: str | None) -> str | None:
    """``--sep`` of ``predict`` / ``evaluate``: None when not given, else as ``dataset.sep``."""
    return None if value is None else _separator(value, "--sep")


def _absolute_files(dataset: dict[str, Any]) -> dict[str, Any]:
    """``dataset`` with its file paths (FILE_KEYS) made absolute, relative to this directory."""
    return {
        key: str(Path(value).expanduser().absolute())
        if key in FILE_KEYS and isinstance(value, str) and value
        else value
        for key, value in dataset.items()
    }


def train_config(section: dict[str, Any]) -> TrainConfig:
    """The ``train:`` mapping as a :class:`TrainConfig`; an unknown key or a wrong type is a
    ConfigError."""
    allowed = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown key(s) train.{', train.'.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    return TrainConfig(**section)  # which converts and checks every value, naming its key


def _is_whole(value: Any) -> bool:
    """An int or an integral float (a bool is an int too: callers refuse it first)."""
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def as_int(value: Any, key: str) -> int:
    """An int, or a float with no fractional part (YAML may write 20.0); never a bool, and 1.9 is
    an error rather than 1."""
    if isinstance(value, bool) or not _is_whole(value):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return int(value)


def as_float(value: Any, key: str) -> float:
    """A number (not a bool). Numeric text is taken too: PyYAML reads ``1e-3`` (no dot) as a
    string, and float() of it is exactly what was meant."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key} must be a number, got {value!r}")


_BOOL_WORDS = {"true": True, "yes": True, "false": False, "no": False}


def as_bool(value: Any, key: str) -> bool:
    """A YAML boolean, or the quoted words true/false/yes/no; bool("false") would be True."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def as_str(value: Any, key: str) -> str:
    """Text; a number where a name is meant is an error, not its str()."""
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


_TYPED = {int: as_int, float: as_float, bool: as_bool, str: as_str}


def like_default(default: Any, value: Any, key: str) -> Any:
    """``value`` converted to the type of ``default`` when that is an int, float, bool or str
    (an error naming ``key`` otherwise); left alone for any other default (None, a tuple...)."""
    convert = _TYPED.get(type(default))
    return value if convert is None else convert(value, key)


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
