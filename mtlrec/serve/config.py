"""The ``serve:`` mapping: how candidates are scored and fused, and what a request may do.

It lives in its own YAML file (``mtlrec serve RUN --fusion FILE``, ``mtlrec export --fusion``)
rather than in the run config, because one trained model is typically served under several
business formulas; the run stays the same, the fusion file changes. Example::

    serve:
      kind: weighted_product        # weighted_product | weighted_sum | expression
      weights: {click: 1.0, purchase: 0.5}
      weight_bounds: {purchase: [0, 2]}   # a request may override a weight within these bounds
      probabilities: conditional    # fuse P(task | upstream) or the joint P(task and upstream)
      max_candidates: 1000
      required_fields: [user]       # fields every candidate must carry (default: none)

or, with ``kind: expression``, ``expression: "click * purchase ** 0.5 + 0.1 * like"``.
Every key is optional; the defaults are a weighted product with weight 1 for every binary task
and 0 for every regression task (its value is on its own scale, seconds or stars, and may be
negative: a product with it would mean nothing until the user chooses its weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlrec.config import read_yaml
from mtlrec.errors import ConfigError
from mtlrec.schema import Schema

KINDS = ("weighted_product", "weighted_sum", "expression")
PROBABILITIES = ("conditional", "joint")
#: Bounds for a task's weight override when the file gives none (widened to take in the task's
#: configured weight): wide enough for re-weighting experiments, narrow enough that a typo
#: (1000 instead of 1.0) is refused.
DEFAULT_BOUNDS = (0.0, 10.0)
DEFAULT_MAX_CANDIDATES = 1000
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
KEYS = (
    "kind",
    "weights",
    "expression",
    "weight_bounds",
    "probabilities",
    "max_candidates",
    "required_fields",
    "max_body_bytes",
)


@dataclass
class ServeConfig:
    """Resolved ``serve:`` section for one schema: every task has a weight and bounds."""

    kind: str = "weighted_product"
    weights: dict[str, float] = field(default_factory=dict)
    expression: str | None = None
    weight_bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    probabilities: str = "conditional"
    max_candidates: int = DEFAULT_MAX_CANDIDATES
    required_fields: list[str] = field(default_factory=list)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def to_dict(self) -> dict[str, Any]:
        """The ``serve:`` mapping that reproduces this config (written into export folders)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "expression":
            out["expression"] = self.expression
        else:
            out["weights"] = dict(self.weights)
            out["weight_bounds"] = {t: list(b) for t, b in self.weight_bounds.items()}
        out.update(
            probabilities=self.probabilities,
            max_candidates=self.max_candidates,
            required_fields=list(self.required_fields),
            max_body_bytes=self.max_body_bytes,
        )
        return {"serve": out}


def load_serve_config(path: str | Path | None, schema: Schema) -> ServeConfig:
    """Read a fusion file (a mapping with one ``serve:`` key) or return the defaults."""
    if path is None:
        return serve_config({}, schema)
    path = Path(path)
    data = read_yaml(path, "fusion file")
    if not isinstance(data, dict) or set(data) != {"serve"}:
        found = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{path}: expected a mapping with a single 'serve' key, found {found}")
    return serve_config(data["serve"] or {}, schema, where=str(path))


def serve_config(section: dict[str, Any], schema: Schema, where: str = "serve") -> ServeConfig:
    """Check a ``serve:`` mapping against the schema; every error names the key at fault."""
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: 'serve' must be a mapping")
    unknown = sorted(set(section) - set(KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) serve.{', serve.'.join(unknown)}; allowed: {', '.join(KEYS)}"
        )
    tasks = schema.task_names
    kind = section.get("kind", "weighted_product")
    if kind not in KINDS:
        raise ConfigError(f"{where}: serve.kind {kind!r} is not one of {', '.join(KINDS)}")
    probabilities = section.get("probabilities", "conditional")
    if probabilities not in PROBABILITIES:
        raise ConfigError(
            f"{where}: serve.probabilities {probabilities!r} is not one of "
            f"{', '.join(PROBABILITIES)}"
        )
    cfg = ServeConfig(kind=kind, probabilities=probabilities)
    cfg.max_candidates = _positive_int(section, "max_candidates", DEFAULT_MAX_CANDIDATES, where)
    cfg.max_body_bytes = _positive_int(section, "max_body_bytes", DEFAULT_MAX_BODY_BYTES, where)

    fields = {f.source for f in schema.features}
    required = section.get("required_fields") or []
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ConfigError(f"{where}: serve.required_fields must be a list of field names")
    bad = [r for r in required if r not in fields]
    if bad:
        raise ConfigError(
            f"{where}: serve.required_fields: {', '.join(map(repr, bad))} is not a field of the "
            f"schema; fields are {', '.join(sorted(fields))}"
        )
    cfg.required_fields = list(dict.fromkeys(required))

    if kind == "expression":
        for key in ("weights", "weight_bounds"):
            if section.get(key):
                raise ConfigError(
                    f"{where}: serve.{key} is not used by kind 'expression'; write the weights "
                    "into the expression"
                )
        expression = section.get("expression")
        if not isinstance(expression, str) or not expression.strip():
            raise ConfigError(f"{where}: serve.kind 'expression' needs serve.expression")
        from mtlrec.serve.fusion import compile_expression

        compile_expression(expression, tasks, where=f"{where}: serve.expression")  # check now
        cfg.expression = expression
        return cfg
    if section.get("expression"):
        raise ConfigError(f"{where}: serve.expression needs serve.kind: expression (got {kind!r})")

    weights = _task_mapping(section.get("weights"), "weights", tasks, where)
    bounds = _task_mapping(section.get("weight_bounds"), "weight_bounds", tasks, where)
    for task in tasks:
        w = _finite(weights.get(task, default_weight(schema, task)), f"serve.weights.{task}", where)
        if task in bounds:
            lo, hi = _bounds(bounds[task], task, where)
        else:  # the defaults, widened to take in a weight the file sets outside them
            lo, hi = min(DEFAULT_BOUNDS[0], w), max(DEFAULT_BOUNDS[1], w)
        if not lo <= w <= hi:
            raise ConfigError(
                f"{where}: serve.weights.{task} = {w:g} is outside its weight_bounds [{lo:g}, {hi:g}]"
            )
        cfg.weights[task] = w
        cfg.weight_bounds[task] = (lo, hi)
    return cfg


def default_weight(schema: Schema, task: str) -> float:
    """1 for a probability, 0 for a regression value (see the module docstring)."""
    return 1.0 if schema.task(task).type == "binary" else 0.0


def _positive_int(section: dict[str, Any], key: str, default: int, where: str) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: serve.{key} must be a positive integer, got {value!r}")
    return value


def _task_mapping(value: Any, key: str, tasks: list[str], where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: serve.{key} must be a mapping of task -> value")
    unknown = [k for k in value if k not in tasks]
    if unknown:
        raise ConfigError(
            f"{where}: serve.{key}: unknown task(s) {', '.join(map(repr, unknown))}; "
            f"tasks are {', '.join(tasks)}"
        )
    return value


def _finite(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
    return float(value)


def _bounds(value: Any, task: str, where: str) -> tuple[float, float]:
    key = f"serve.weight_bounds.{task}"
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ConfigError(f"{where}: {key} must be [min, max], got {value!r}")
    lo, hi = (_finite(v, key, where) for v in value)
    if lo > hi:
        raise ConfigError(f"{where}: {key}: min {lo:g} is greater than max {hi:g}")
    return lo, hi
