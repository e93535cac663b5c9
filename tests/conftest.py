"""Shared fixtures: a planted-signal funnel dataset and the shared public data folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtlrec.data.encoder import Encoder
from mtlrec.data.table import TensorTable
from mtlrec.schema import Feature, Schema, Task

REPO = Path(__file__).resolve().parents[1]
_default = REPO.parent / "shared" / "data"
if "MTLREC_DATA_DIR" not in os.environ and _default.is_dir():
    os.environ["MTLREC_DATA_DIR"] = str(_default)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never download into the user's cache from a test."""
    monkeypatch.setenv("MTLREC_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: more threads only add overhead (and spin
    on a busy machine). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    value = os.environ.get("MTLREC_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("MTLREC_DATA_DIR is not set to the shared datasets folder")
    return Path(value)


def resume_matches_straight_run(configure, tmp_path: Path, epochs: int, stop_after: int) -> dict:
    """Train ``epochs`` epochs in one go, and ``stop_after`` epochs then ``--resume`` to
    ``epochs`` in another folder; assert both end with the same metrics and return them.
    ``configure(epochs=, patience=)`` gives the resolved config (patience high enough that early
    stopping never cuts the run short)."""
    import json

    from mtlrec.train.run import train_run

    def echo(*_):
        return None

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_run(configure(epochs=epochs, patience=10), straight, echo=echo)
    train_run(configure(epochs=stop_after, patience=10), resumed, echo=echo)
    train_run(configure(epochs=epochs, patience=10), resumed, resume=True, echo=echo)
    a = json.loads((straight / "metrics.json").read_text())
    assert a == json.loads((resumed / "metrics.json").read_text())
    return a


def files_dataset(folder: Path, frames: dict[str, pd.DataFrame], schema: dict) -> dict:
    """Write ``frames`` ({split: frame}) as CSV and ``schema`` as YAML into ``folder``; return
    the ``dataset`` config section of the ``files`` dataset that reads them."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    for split, frame in frames.items():
        frame.to_csv(folder / f"{split}.csv", index=False)
    (folder / "schema.yaml").write_text(yaml.safe_dump(schema))
    return {
        "name": "files",
        **{split: str(folder / f"{split}.csv") for split in frames},
        "schema": str(folder / "schema.yaml"),
    }


def funnel_frame(n: int, seed: int = 0) -> pd.DataFrame:
    """Impressions with a planted signal: click depends on user group and item, purchase (only
    after a click) on price and a tag; ``score`` is a regression target."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 20, n)
    item = rng.integers(0, 30, n)
    price = rng.normal(0, 1, n)
    tags = [
        "|".join(f"t{t}" for t in rng.choice(6, rng.integers(0, 4), replace=False))
        for _ in range(n)
    ]
    has_t0 = np.array(["t0" in t.split("|") for t in tags])
    click_logit = 1.5 * (user % 2 == 0) + 1.0 * (item < 10) - 1.0
    click = rng.random(n) < 1 / (1 + np.exp(-click_logit * 2))
    buy_logit = -1.5 * price + 1.5 * has_t0 - 0.5
    purchase = click & (rng.random(n) < 1 / (1 + np.exp(-buy_logit * 2)))
    price_txt = price.round(4).astype(str).astype(object)
    price_txt[rng.random(n) < 0.02] = ""  # some missing numerics
    return pd.DataFrame(
        {
            "user": [f"u{u}" for u in user],
            "item": [f"i{i}" for i in item],
            "price": price_txt,
            "tags": tags,
            "click": click.astype(int),
            "purchase": purchase.astype(int),
            "score": (2.0 * price + (user % 3)).round(4),
        }
    )


FUNNEL_SCHEMA = {
    "features": [
        {"name": "user"},
        {"name": "item", "min_freq": 2},
        {"name": "price", "type": "numeric"},
        {"name": "tags", "type": "sequence", "sep": "|", "max_len": 4},
    ],
    "tasks": [
        {"name": "click"},
        {"name": "purchase", "depends_on": "click"},
    ],
}


@pytest.fixture
def funnel_schema() -> Schema:
    return Schema.from_dict(FUNNEL_SCHEMA)


@pytest.fixture
def funnel_tables(funnel_schema):
    """(encoder, train, valid) on 3,000 + 1,000 planted-signal rows."""
    train_df, valid_df = funnel_frame(3000, seed=1), funnel_frame(1000, seed=2)
    enc = Encoder(funnel_schema).fit(train_df)
    return enc, enc.transform(train_df), enc.transform(valid_df)


@pytest.fixture
def parallel_schema() -> Schema:
    """Two parallel tasks, one binary and one regression (no funnel)."""
    return Schema(
        features=[Feature("user"), Feature("item"), Feature("price", "numeric")],
        tasks=[Task("click"), Task("score", "regression")],
    )


def encoded_funnel(rows: int, seed: int = 3) -> tuple[Encoder, TensorTable]:
    """(encoder, table) of ``rows`` planted-funnel rows, the encoder fitted on them."""
    frame = funnel_frame(rows, seed=seed)
    enc = Encoder(Schema.from_dict(FUNNEL_SCHEMA)).fit(frame)
    return enc, enc.transform(frame)


@pytest.fixture(scope="module")
def small():
    """(encoder, table) of 600 planted-funnel rows (click -> purchase), for structural checks."""
    return encoded_funnel(600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-epoch MMoE run folder on small funnel files (one torch thread, seed 4)."""
    from mtlrec import config as cfg
    from mtlrec.train.run import train_run

    root = tmp_path_factory.mktemp("finished")
    frames = {
        "train": funnel_frame(1200, 1),
        "valid": funnel_frame(400, 2),
        "test": funnel_frame(300, 3),
    }
    config = cfg.resolve(
        {
            "dataset": files_dataset(root / "data", frames, FUNNEL_SCHEMA),
            "model": {"name": "mmoe", "num_experts": 3},
            "train": {"epochs": 2, "batch_size": 256, "seed": 4, "threads": 1},
        }
    )
    train_run(config, root / "run", echo=lambda *_: None)
    return root / "run"


def copy_run(run: Path, to: Path) -> Path:
    """The files a replay reads (config.yaml, history.json) of ``run``, copied to ``to``."""
    to.mkdir(parents=True)
    for name in ("config.yaml", "history.json"):
        (to / name).write_text((run / name).read_text())
    return to
