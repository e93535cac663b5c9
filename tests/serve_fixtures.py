"""Tiny trained runs for the serving tests (imported by test_serve.py; tests/conftest.py is not
ours to change).

* :func:`adult_run`: UCI Adult (categorical + numeric, no sequence feature), 2,000 rows, 1 epoch;
  needs ``MTLREC_DATA_DIR`` pointing at the shared datasets folder, else the test is skipped.
* :func:`funnel_run`: a planted-signal click -> purchase funnel written as CSV files with a schema
  YAML and trained through the ``files`` dataset, so ESMM and AITM (which need ``depends_on``)
  can be exported; it has all three feature kinds, or categorical ones only with ``kinds``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mtlrec.config import resolve
from mtlrec.train.run import train_run

FUNNEL_FEATURES = {
    "user": {"name": "user"},
    "item": {"name": "item"},
    "price": {"name": "price", "type": "numeric"},
    "tags": {"name": "tags", "type": "sequence", "sep": "|", "max_len": 4},
}
FUNNEL_TASKS = [{"name": "click"}, {"name": "purchase", "depends_on": "click"}]


def data_dir() -> Path:
    """The shared datasets folder from ``MTLREC_DATA_DIR``; skips the test when it is not set."""
    value = os.environ.get("MTLREC_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("MTLREC_DATA_DIR is not set to the shared datasets folder (needed for adult)")
    return Path(value)


def _quiet(*_args) -> None:
    pass


def adult_run(out: Path, model: str = "mmoe") -> Path:
    data_dir()
    config = resolve(
        {
            "dataset": {"name": "adult", "max_rows": 2000},
            "model": {"name": model},
            "train": {"epochs": 1, "progress": False},
        }
    )
    train_run(config, out, echo=_quiet)
    return out


def funnel_frame(n: int, seed: int) -> pd.DataFrame:
    """Impressions where click depends on user and item, purchase (after a click) on price and
    tag t0; some prices are missing."""
    rng = np.random.default_rng(seed)
    user, item, price = rng.integers(0, 12, n), rng.integers(0, 20, n), rng.normal(0, 1, n)
    tags = [
        "|".join(f"t{t}" for t in rng.choice(5, rng.integers(0, 4), replace=False))
        for _ in range(n)
    ]
    has_t0 = np.array(["t0" in t.split("|") for t in tags])
    click = rng.random(n) < 1 / (1 + np.exp(-(2.0 * (user % 2 == 0) + 1.5 * (item < 8) - 1.5)))
    purchase = click & (rng.random(n) < 1 / (1 + np.exp(-(-2.0 * price + 2.0 * has_t0 - 1.0))))
    price_text = price.round(4).astype(str).astype(object)
    price_text[rng.random(n) < 0.05] = ""
    return pd.DataFrame(
        {
            "user": [f"u{u}" for u in user],
            "item": [f"i{i}" for i in item],
            "price": price_text,
            "tags": tags,
            "click": click.astype(int),
            "purchase": purchase.astype(int),
        }
    )


def funnel_run(
    out: Path, model: str = "esmm", kinds: tuple[str, ...] = ("user", "item", "price", "tags")
) -> Path:
    """Train ``model`` one epoch on 600 funnel rows with the features named in ``kinds``."""
    files = out / "data"
    files.mkdir(parents=True, exist_ok=True)
    funnel_frame(600, seed=1).to_csv(files / "train.csv", index=False)
    funnel_frame(200, seed=2).to_csv(files / "valid.csv", index=False)
    schema = {"features": [FUNNEL_FEATURES[k] for k in kinds], "tasks": FUNNEL_TASKS}
    (files / "schema.yaml").write_text(yaml.safe_dump(schema))
    config = resolve(
        {
            "dataset": {
                "name": "files",
                "train": str(files / "train.csv"),
                "valid": str(files / "valid.csv"),
                "schema": str(files / "schema.yaml"),
            },
            "model": {"name": model},
            "train": {"epochs": 1, "batch_size": 128, "progress": False},
        }
    )
    run = out / "run"
    train_run(config, run, echo=_quiet)
    return run


def free_port() -> int:
    """A loopback port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
