"""Raw candidates (JSON objects) -> a pandas frame the fitted encoder can read, with checks.

Field policy (documented in the README of the service and in ``GET /metadata``):

* A candidate's keys are the schema's raw column names (``feature.column``, else its name).
  **Unknown keys are rejected**: a misspelt field would otherwise be silently scored as missing.
* **No field is required** unless the fusion file lists it in ``serve.required_fields``. A missing
  key and an explicit ``null`` mean what an empty cell meant in training, so a candidate scores
  as ``mtlrec predict`` scores the same row of a file: a numeric field gets the training mean, a
  categorical field the empty string (its own embedding when training saw enough empty cells,
  else the out-of-vocabulary bucket; for a hashed feature the bucket of the empty string), a
  sequence field is empty.
* Types: numeric fields take JSON numbers only (not strings, not booleans) and they must be
  finite (Python's JSON reader accepts ``NaN`` and ``Infinity``, so this is checked);
  categorical fields take strings, integers or booleans (integers are read as their decimal
  text, as training read them from CSV); sequence fields take a list of such values or one
  string joined with the feature's separator. A column read by a numeric and a categorical
  feature also takes a string holding a number, such as ``"44.0"``: the categorical feature
  matches the training file's text exactly, which a JSON number (read back as ``"44"``) cannot.

Every problem names the candidate index and the field, e.g. ``candidates[3].age: 'abc' is not a
number``; all problems of a request are collected (up to :data:`MAX_PROBLEMS`) so a client can fix
a batch in one round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mtlrec.data.readers import NA_TOKENS
from mtlrec.errors import MTLRecError
from mtlrec.schema import Schema

#: A missing categorical value, as the encoder reads an empty CSV cell or a null string.
MISSING = ""
MAX_PROBLEMS = 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request; ``index`` is the candidate's position, if any."""

    message: str
    field: str | None = None
    index: int | None = None

    @property
    def location(self) -> str:
        loc = "candidates" if self.index is not None or self.field is None else ""
        if self.index is not None:
            loc += f"[{self.index}]"
        if self.field is not None:
            loc = f"{loc}.{self.field}" if loc else self.field
        return loc

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class RequestError(MTLRecError):
    """A request a client must fix; carries every :class:`Problem` found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{problems[0]}{more}")


@dataclass(frozen=True)
class FieldSpec:
    """One raw input field (a column) and how it is checked."""

    name: str
    kind: str  # numeric | categorical | sequence (numeric wins when features share a column)
    sep: str = "|"
    as_text: bool = False  # shared by a numeric and a text feature: keep it as text


def field_specs(schema: Schema) -> list[FieldSpec]:
    """The request fields of a schema, in schema order (one per distinct source column)."""
    by_source: dict[str, list] = {}
    for feat in schema.features:
        by_source.setdefault(feat.source, []).append(feat)
    specs = []
    for source, feats in by_source.items():
        kinds = {f.type for f in feats}
        kind = (
            "numeric"
            if "numeric" in kinds
            else "sequence"
            if "sequence" in kinds
            else "categorical"
        )
        sep = next((f.sep for f in feats if f.type == "sequence"), "|")
        specs.append(FieldSpec(source, kind, sep, as_text=kind == "numeric" and len(kinds) > 1))
    return specs


def build_frame(
    candidates: list[dict[str, Any]], specs: list[FieldSpec], required: set[str] | frozenset = ()
) -> pd.DataFrame:
    """Check every candidate and build the frame; raises :class:`RequestError` listing problems."""
    problems: list[Problem] = []
    known = {s.name for s in specs}
    for i, cand in enumerate(candidates):
        extra = cand.keys() - known
        for key in sorted(extra):
            problems.append(Problem("unknown field (not in the model's schema)", key, i))
    if len(problems) >= MAX_PROBLEMS:
        raise RequestError(problems[:MAX_PROBLEMS])
    columns = {}
    for spec in specs:
        values = [c.get(spec.name) for c in candidates]
        check = _CHECKS[spec.kind]
        columns[spec.name] = check(values, spec, spec.name in required, problems)
        if len(problems) >= MAX_PROBLEMS:
            break
    if problems:
        problems.sort(key=lambda p: p.index if p.index is not None else -1)
        raise RequestError(problems[:MAX_PROBLEMS])
    return pd.DataFrame(columns, index=pd.RangeIndex(len(candidates)))


def _missing(values: list[Any], spec: FieldSpec, required: bool, problems: list[Problem]) -> None:
    if required:
        for i, v in enumerate(values):
            if v is None:
                problems.append(Problem("required field is missing or null", spec.name, i))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _numeric(values: list[Any], spec: FieldSpec, required: bool, problems: list[Problem]):
    _missing(values, spec, required, problems)
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        t = type(v)
        if t is float:
            if not math.isfinite(v):
                problems.append(Problem(f"{v!r} is not a finite number", spec.name, i))
            out[i] = v
        elif t is int:
            try:
                out[i] = float(v)
            except OverflowError:
                problems.append(Problem("integer is too large for a float", spec.name, i))
        elif v is None:
            out[i] = np.nan
        elif t is str and spec.as_text:
            out[i] = _number_in_text(v, spec, i, problems)
        else:
            problems.append(Problem(f"expected a number, got {_describe(v)}", spec.name, i))
    if spec.as_text:  # the other feature on this column reads text; the encoder parses numbers
        return np.array(
            [
                v if type(v) is str else None if np.isnan(x) else _number_text(x)
                for v, x in zip(values, out, strict=True)
            ],
            dtype=object,
        )
    return out


def _number_in_text(text: str, spec: FieldSpec, index: int, problems: list[Problem]) -> float:
    """The number a string holds, as the encoder parses a CSV cell (NA tokens: missing)."""
    if text.strip() in NA_TOKENS:
        return np.nan
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        problems.append(Problem(f"{_describe(text)} is not a finite number", spec.name, index))
    return value


def _number_text(x: float) -> str:
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def _text(v: Any) -> str | None:
    """A categorical value as training saw it; None when the type is not allowed."""
    t = type(v)
    if t is str:
        return v
    if t is int or t is bool:
        return str(v)  # may raise ValueError for an int beyond Python's digit limit
    return None


def _categorical(values: list[Any], spec: FieldSpec, required: bool, problems: list[Problem]):
    _missing(values, spec, required, problems)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if v is None:
            out[i] = MISSING
            continue
        try:
            text = _text(v)
        except ValueError:
            text = None
        if text is None:
            problems.append(
                Problem(f"expected a string or an integer, got {_describe(v)}", spec.name, i)
            )
        out[i] = text
    return out


def _sequence(values: list[Any], spec: FieldSpec, required: bool, problems: list[Problem]):
    _missing(values, spec, required, problems)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if v is None:
            out[i] = ""
        elif type(v) is str:
            out[i] = v
        elif type(v) is list:
            items = []
            for j, item in enumerate(v):
                try:
                    text = _text(item)
                except ValueError:
                    text = None
                if text is None:
                    problems.append(
                        Problem(
                            f"item {j}: expected a string or an integer, got {_describe(item)}",
                            spec.name,
                            i,
                        )
                    )
                    break
                if spec.sep in text:
                    problems.append(
                        Problem(f"item {j} contains the separator {spec.sep!r}", spec.name, i)
                    )
                    break
                items.append(text)
            out[i] = spec.sep.join(items)
        else:
            problems.append(
                Problem(f"expected a list or a string, got {_describe(v)}", spec.name, i)
            )
    return out


_CHECKS = {"numeric": _numeric, "categorical": _categorical, "sequence": _sequence}
