"""Name -> dataset loader. A loader takes ``max_rows``, ``seed`` and its own keyword options."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from mtlrec.config import like_default
from mtlrec.errors import ConfigError
from mtlrec.schema import Schema
from mtlrec.text import summary


@dataclass
class DatasetSplits:
    schema: Schema
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    source: str = ""  # where the files came from, for the run log


Loader = Callable[..., DatasetSplits]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str):
    def wrap(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn

    return wrap


def load_dataset(name: str, *, max_rows: int | None = None, seed: int = 2024, **options: Any):
    _load_all()
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    fn = DATASETS[name]
    params = inspect.signature(fn).parameters
    allowed = [p for p in params if p not in ("max_rows", "seed")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown key(s) dataset.{', dataset.'.join(unknown)} for dataset {name!r}; "
            f"allowed: {', '.join(['name', 'max_rows', *allowed])}"
        )
    return fn(max_rows=max_rows, seed=seed, **typed_options(options, params))


def typed_options(options: dict[str, Any], params: Mapping[str, inspect.Parameter]) -> dict:
    """Each option converted to the type of the loader's default (an int, float, bool or str
    default; ``None`` defaults such as paths are left alone), so ``--set dataset.n=abc`` is an
    error naming ``dataset.n`` and ``dataset.valid_fraction=1e-1`` (text to YAML) is 0.1."""
    return {k: like_default(params[k].default, v, f"dataset.{k}") for k, v in options.items()}


def describe_datasets() -> dict[str, str]:
    _load_all()
    return {n: summary(fn.__doc__) for n, fn in sorted(DATASETS.items())}


def _load_all() -> None:
    from mtlrec.data.datasets import (  # noqa: F401
        alibaba,
        census,
        coat,
        files,
        funnel,
        movielens,
        synthetic,
    )
