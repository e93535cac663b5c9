"""Feature and task declarations: what the columns of a table mean.

A schema is plain data (dataclasses) with a JSON/YAML round trip, so it can be written beside a
trained model and read back by ``evaluate``, ``export`` and ``serve`` without the training code.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mtlrec.config import as_bool, as_int, read_yaml
from mtlrec.errors import ConfigError

FEATURE_TYPES = ("categorical", "numeric", "sequence")
MAX_SEQUENCE_LEN = 10_000  # tokens kept per sequence cell: every row holds max_len ids
SEQUENCE_KEEP = ("first", "last")  # which tokens of a cell longer than max_len are kept
TASK_TYPES = ("binary", "regression")


@dataclass
class Feature:
    """One input column.

    ``categorical``: a vocabulary (with an out-of-vocabulary bucket and ``min_freq``), or
    ``hash_buckets`` > 0 to hash values into that many buckets for huge vocabularies.
    ``numeric``: standardised with the training mean/std; NaN becomes the training mean. With
    ``buckets`` > 0 the value is also cut at the training quantiles into that many buckets (plus a
    missing-value bucket) and embedded like a categorical field, which lets a model learn
    non-monotone effects (age, hours) without a deep network. ``log`` applies sign(x)·log1p(|x|)
    first, for heavy-tailed amounts.
    ``sequence``: a multi-value field such as ``"a|b|c"``, split on ``sep``, cut to ``max_len``
    tokens and mean-pooled over its embeddings (sequence models read the tokens one by one, in
    the order written). ``keep`` says which tokens a longer cell keeps: ``first`` (the default)
    or ``last`` -- a history written oldest first needs ``last`` to keep its most recent items.
    ``vocab_of``: the name of a categorical feature whose vocabulary and embedding rows this
    categorical or sequence feature uses, so that the same id means the same vector in both: a
    history of item ids (``vocab_of: item``) can then be matched against the candidate item, as
    target attention (DMT) needs. The shared vocabulary is fitted on the values of every
    feature that uses it; ``min_freq`` and ``hash_buckets`` are set on the feature it names.
    """

    name: str
    type: str = "categorical"
    column: str | None = None
    min_freq: int = 1
    hash_buckets: int = 0
    sep: str = "|"
    max_len: int = 20
    buckets: int = 0
    log: bool = False
    vocab_of: str | None = None
    keep: str = "first"

    def __post_init__(self) -> None:
        self.name = _name(self.name, "feature")
        what = f"feature {self.name!r}"
        if self.type not in FEATURE_TYPES:
            raise ConfigError(
                f"{what}: type {self.type!r} is not one of {', '.join(FEATURE_TYPES)}"
            )
        self.column = _column(self.column, what)
        for key in ("min_freq", "hash_buckets", "max_len", "buckets"):
            setattr(self, key, as_int(getattr(self, key), f"{what}: {key}"))
        if not isinstance(self.sep, str) or not self.sep:
            raise ConfigError(f"{what}: sep must be a non-empty string, got {self.sep!r}")
        self.log = as_bool(self.log, f"{what}: log")
        if self.min_freq < 1:
            raise ConfigError(f"feature {self.name!r}: min_freq must be >= 1")
        if self.hash_buckets < 0:
            raise ConfigError(f"feature {self.name!r}: hash_buckets must be >= 0")
        if self.buckets < 0:
            raise ConfigError(f"feature {self.name!r}: buckets must be >= 0")
        if self.buckets and self.type != "numeric":
            raise ConfigError(f"feature {self.name!r}: buckets apply to numeric features only")
        if not 1 <= self.max_len <= MAX_SEQUENCE_LEN:  # 1e8 was a MemoryError deep in encoding
            raise ConfigError(
                f"feature {self.name!r}: max_len must be between 1 and {MAX_SEQUENCE_LEN:,} "
                f"(got {self.max_len:,})"
            )
        if self.keep not in SEQUENCE_KEEP:
            raise ConfigError(f"{what}: keep must be 'first' or 'last', got {self.keep!r}")
        if self.keep != "first" and self.type != "sequence":
            raise ConfigError(f"{what}: keep applies to sequence features only")
        if self.vocab_of is not None:
            self.vocab_of = _name(self.vocab_of, f"{what}: vocab_of")
            if self.type == "numeric":
                raise ConfigError(f"{what}: vocab_of applies to categorical and sequence features")
            if self.hash_buckets or self.min_freq != 1:
                raise ConfigError(
                    f"{what}: with vocab_of, set min_freq and hash_buckets on {self.vocab_of!r}, "
                    "whose vocabulary this feature uses"
                )

    @property
    def source(self) -> str:
        """The column this feature is read from (defaults to its name)."""
        return self.column or self.name


@dataclass
class Task:
    """One prediction target.

    ``depends_on`` names an upstream binary task whose positive rows are the only rows where this
    task is observed (conversion after click). The label column is read over the entire space;
    a row with the upstream label 0 is treated as unobserved for the task's own (conditional)
    loss and metrics, and entire-space ("joint") metrics are reported as well.
    """

    name: str
    type: str = "binary"
    column: str | None = None
    weight: float = 1.0
    depends_on: str | None = None

    def __post_init__(self) -> None:
        self.name = _name(self.name, "task")
        if self.type not in TASK_TYPES:
            raise ConfigError(
                f"task {self.name!r}: type {self.type!r} is not one of {', '.join(TASK_TYPES)}"
            )
        self.column = _column(self.column, f"task {self.name!r}")
        if self.depends_on is not None:  # a task name, written like one
            self.depends_on = _name(self.depends_on, f"task {self.name!r}: depends_on")
        # A negative or NaN weight would silently turn training into loss ascent or NaN.
        try:
            if isinstance(self.weight, bool):  # float(True) is 1.0: a typo, not a weight
                raise TypeError
            self.weight = float(self.weight)
        except (TypeError, ValueError):
            raise ConfigError(
                f"task {self.name!r}: weight {self.weight!r} is not a number"
            ) from None
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ConfigError(f"task {self.name!r}: weight must be a finite number >= 0")

    @property
    def source(self) -> str:
        return self.column or self.name


@dataclass
class Schema:
    """The features and tasks of a dataset: what each column is and which task depends on which."""

    features: list[Feature] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("schema: at least one task is needed")
        if not self.features:
            raise ConfigError("schema: at least one feature is needed")
        names = [f.name for f in self.features] + [t.name for t in self.tasks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"schema: duplicate feature/task name(s): {', '.join(sorted(dup))}")
        labels = {t.source: t.name for t in self.tasks}
        for f in self.features:
            if f.source in labels:  # the label as an input: every metric would be a lie
                raise ConfigError(
                    f"feature {f.name!r} reads column {f.source!r}, the label of task "
                    f"{labels[f.source]!r}"
                )
        task_names = self.task_names
        for t in self.tasks:
            if t.depends_on is None:
                continue
            if t.depends_on == t.name:
                raise ConfigError(f"task {t.name!r}: depends_on names the task itself")
            if t.depends_on not in task_names:
                raise ConfigError(
                    f"task {t.name!r}: depends_on {t.depends_on!r} is not a task of the schema"
                )
            if task_names.index(t.depends_on) >= task_names.index(t.name):
                raise ConfigError(
                    f"task {t.name!r}: upstream task {t.depends_on!r} must be listed before it"
                )
            if self.task(t.depends_on).type != "binary":
                raise ConfigError(f"task {t.name!r}: upstream task {t.depends_on!r} must be binary")
            if f"{t.name}_joint" in task_names:  # both would be the column pred_<t>_joint
                raise ConfigError(
                    f"task {t.name + '_joint'!r}: the name of task {t.name!r}'s entire-space "
                    "prediction (pred_<task>_joint); rename it"
                )
        by_name = {f.name: f for f in self.features}
        for f in self.features:
            if f.vocab_of is None:
                continue
            owner = by_name.get(f.vocab_of)
            if owner is None or owner.type != "categorical" or owner.vocab_of is not None:
                raise ConfigError(
                    f"feature {f.name!r}: vocab_of {f.vocab_of!r} must name a categorical feature "
                    "of the schema that has its own vocabulary (no vocab_of itself)"
                )

    # --- lookups -------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> Task:
        """The task named ``name`` (a ConfigError naming the tasks otherwise)."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise ConfigError(f"unknown task {name!r}; tasks are {', '.join(self.task_names)}")

    def task_index(self, name: str) -> int:
        """Position of task ``name`` in ``tasks`` (the column of labels and predictions)."""
        return self.task_names.index(self.task(name).name)

    def vocabulary_owner(self, feat: Feature) -> Feature:
        """The feature whose vocabulary (and embedding rows) ``feat`` uses: the one it names in
        ``vocab_of``, else itself."""
        if feat.vocab_of is None:
            return feat
        return next(f for f in self.features if f.name == feat.vocab_of)

    def features_of(self, kind: str) -> list[Feature]:
        """The features of one type (categorical, numeric or sequence), in schema order."""
        return [f for f in self.features if f.type == kind]

    def embedded_fields(self) -> list[Feature]:
        """Features with a block in the fused embedding table, in table order: categorical,
        bucketised numeric, then sequence."""
        return (
            self.features_of("categorical")
            + [f for f in self.features_of("numeric") if f.buckets]
            + self.features_of("sequence")
        )

    def upstream_index(self) -> list[int]:
        """For each task, the index of the task it depends on, or -1."""
        names = self.task_names
        return [names.index(t.depends_on) if t.depends_on else -1 for t in self.tasks]

    def required_columns(self) -> list[str]:
        """Every column a frame must have to be encoded with labels: features' and tasks' sources."""
        return [f.source for f in self.features] + [t.source for t in self.tasks]

    # --- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON/YAML (the inverse of ``from_dict``)."""
        return {
            "features": [_compact(asdict(f), Feature) for f in self.features],
            "tasks": [_compact(asdict(t), Task) for t in self.tasks],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "schema") -> Schema:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping with 'features' and 'tasks'")
        unknown = set(data) - {"features", "tasks"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        for key in ("features", "tasks"):
            if not isinstance(data.get(key) or [], list):
                raise ConfigError(f"{where}: {key} must be a list of mappings")
        features = [
            _build(Feature, item, f"{where}: features[{i}]")
            for i, item in enumerate(data.get("features") or [])
        ]
        tasks = [
            _build(Task, item, f"{where}: tasks[{i}]")
            for i, item in enumerate(data.get("tasks") or [])
        ]
        try:
            return cls(features=features, tasks=tasks)
        except ConfigError as exc:
            if where == "schema":
                raise
            raise ConfigError(f"{where}: {str(exc).removeprefix('schema: ')}") from None

    def save(self, path: str | Path) -> None:
        """Write the schema as JSON (a run's ``schema.json``)."""
        from mtlrec.train.checkpoint import save_text

        save_text(json.dumps(self.to_dict(), indent=2), path)  # atomic: never half-written

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        path = Path(path)
        data = read_yaml(path, "schema")  # JSON is YAML too
        return cls.from_dict(data, where=str(path))


def _name(value: Any, what: str) -> str:
    """A feature/task name as text. A YAML int (``name: 0``) is the CSV header ``0``, since a
    header is text; any other type (``1.5``, a list, a bool) would never match one."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None or value == "":
        raise ConfigError(f"{what} name is missing")
    if not isinstance(value, str):
        hint = f" (quote it: '{value}')" if isinstance(value, float) else ""
        raise ConfigError(f"{what} name must be a string, got {value!r}{hint}")
    return value


def _column(value: Any, what: str) -> str | None:
    """The column to read, as text like a name; null reads the column of the feature's name."""
    if value is None:
        return None
    if value == "":
        raise ConfigError(f"{what}: column must be a column name or null, got ''")
    return _name(value, f"{what}: column")


def schema_changes(old: Schema, new: Schema) -> list[str]:
    """What differs between two schemas, one line per feature or task option ("feature 'tags'
    max_len: 5 -> 7", "task 'ctr' added"), in schema order."""
    changes: list[str] = []
    for kind, before, after in (
        ("feature", [asdict(f) for f in old.features], [asdict(f) for f in new.features]),
        ("task", [asdict(t) for t in old.tasks], [asdict(t) for t in new.tasks]),
    ):
        was = {item["name"]: item for item in before}
        now = {item["name"]: item for item in after}
        for name in [*was, *(n for n in now if n not in was)]:
            if name not in now:
                changes.append(f"{kind} {name!r} removed")
            elif name not in was:
                changes.append(f"{kind} {name!r} added")
            else:
                for key in dict.fromkeys([*was[name], *now[name]]):
                    if was[name].get(key) != now[name].get(key):
                        changes.append(
                            f"{kind} {name!r} {key}: {was[name].get(key)} -> {now[name].get(key)}"
                        )
        if not changes and [i["name"] for i in before] != [i["name"] for i in after]:
            changes.append(f"the order of the {kind}s")
    return changes


def _compact(values: dict[str, Any], kind: type) -> dict[str, Any]:
    """Drop keys that hold their default so saved schemas stay readable."""
    defaults = {f.name: f.default for f in fields(kind)}
    return {k: v for k, v in values.items() if k == "name" or v != defaults.get(k)}


def _build(kind: type, item: Any, where: str) -> Any:
    if not isinstance(item, dict) or "name" not in item:
        raise ConfigError(f"{where}: expected a mapping with a 'name'")
    allowed = {f.name for f in fields(kind)}
    unknown = set(item) - allowed
    if unknown:
        raise ConfigError(
            f"{where} ({item['name']}): unknown key(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    try:
        return kind(**item)
    except TypeError as exc:
        raise ConfigError(f"{where} ({item['name']}): {exc}") from exc
    except ConfigError as exc:  # from __post_init__: it names the feature/task, add the place
        raise ConfigError(f"{where}: {exc}") from None
