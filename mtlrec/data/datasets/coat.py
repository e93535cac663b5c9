"""Coat (Schnabel et al., "Recommendations as Treatments: Debiasing Learning and Evaluation",
ICML 2016): 290 users x 300 coats, a self-selected (MNAR) training set and a random-exposure test
set. It is the standard small benchmark for selection-bias methods because its test ratings were
collected on items chosen at random, so test metrics are unbiased.

Two-task view (a selection step, then the outcome it gates):

* ``exposed``: the user rated the item in ``train.ascii`` (their own choice: 24 per user). Read over
  *all* 290 x 300 = 87,000 user-item pairs, like a click over all impressions.
* ``liked``: rating >= 4, ``depends_on: exposed`` (only known where the user chose to rate).

Splits. Train and validation come from the 87,000 pairs of the training matrix: a fixed 10 % of the
pairs (``valid_fraction``, permutation seeded with 2016, independent of the run seed) are held out
for validation, so validation has the same self-selected distribution as train. Test is the
4,640 random-exposure ratings of ``test.ascii`` (exactly 16 per user): ``exposed = 1`` on every test
row and ``liked`` = rating >= 4 there; ``liked``'s test AUC is the unbiased number, ``exposed``'s is
undefined (one class) by construction.

Features: ``user``, ``item`` and the four categorical attributes of each side decoded from the
one-hot ``user_item_features/`` matrices (exactly one 1 per attribute group; the ``*_map.txt`` files
name the columns ``group:value``): user gender, age, location, fashion interest; item gender, jacket
type, colour, on-front-page. The authors' learned propensities (``propensities.ascii``) are not
used: the models here estimate their own.

Files are looked up in ``$MTLREC_DATA_DIR/coat/``, then the cache; if missing, the authors'
``coat.zip`` is downloaded once into the cache and the needed members are extracted, each checked
against the SHA-256 below (the zip itself has no published checksum).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mtlrec.data.datasets.download import (
    RemoteFile,
    cache_dir,
    download,
    extract_checked,
    locate,
)
from mtlrec.data.datasets.registry import DatasetSplits, register_dataset
from mtlrec.errors import ConfigError, DataError
from mtlrec.schema import Feature, Schema, Task

COAT_URL = "https://www.cs.cornell.edu/~schnabts/mnar/coat.zip"
FOLDER = "coat"
N_USERS, N_ITEMS = 290, 300
LIKED_AT = 4
SHA256 = {
    "train.ascii": "a87bd9e7eaf3b89f976df3f25d4aa5d5d871be8a00b58947df9e6e015559bd37",
    "test.ascii": "de6714ab105a5e0be8166be7fd313901b29f9a09c3bea307901457d1d71847e6",
    "user_item_features/user_features.ascii": (
        "d8f9531b601c54a7272602f8b21fa6cb4652cbf122e35d8615ea9645ebbf1b1f"
    ),
    "user_item_features/user_features_map.txt": (
        "86dfa86c468f2213b0a7acab072cc8e4bd66d05ed050d1e1f2f452c1e9fd195b"
    ),
    "user_item_features/item_features.ascii": (
        "edea8217ec5606779b4d3bf819f7591dc63bcd5194d619e8048c2322d07630b1"
    ),
    "user_item_features/item_features_map.txt": (
        "70f97e53b6469a08ba76d259e92de9a4931f97693d2669f8e8836330d30fc109"
    ),
}


def coat_files() -> dict[str, Path]:
    """Local paths of the files the loader reads, fetching the authors' zip if any is missing."""
    try:
        return {name: locate(RemoteFile(FOLDER, name, None, sha)) for name, sha in SHA256.items()}
    except DataError:
        pass
    archive = download(RemoteFile(FOLDER, "coat.zip", COAT_URL), cache_dir() / FOLDER / "coat.zip")
    extract_members(archive, cache_dir() / FOLDER)
    return {name: locate(RemoteFile(FOLDER, name, None, sha)) for name, sha in SHA256.items()}


def extract_members(archive: Path, target: Path) -> None:
    """Write each needed file of the Coat zip to ``target/<name>``, SHA-256 checked."""
    extract_checked(archive, target, SHA256, "Coat")


def _matrix(path: Path, shape: tuple[int, int]) -> np.ndarray:
    values = np.loadtxt(path)
    if values.shape != shape:
        raise DataError(f"{path}: expected a {shape[0]} x {shape[1]} matrix, got {values.shape}")
    return values


def _attributes(matrix_path: Path, map_path: Path, rows: int, prefix: str) -> pd.DataFrame:
    """One-hot attribute matrix + ``group:value`` column names -> one categorical column per
    group (``{prefix}_{group}``); every row must have exactly one 1 per group."""
    names = [line.strip() for line in map_path.read_text().splitlines() if line.strip()]
    onehot = _matrix(matrix_path, (rows, len(names)))
    groups = [n.split(":", 1) for n in names]
    out = {}
    for group in dict.fromkeys(g for g, _ in groups):
        cols = [j for j, (g, _) in enumerate(groups) if g == group]
        block = onehot[:, cols]
        if not np.all(block.sum(1) == 1):
            bad = int(np.flatnonzero(block.sum(1) != 1)[0])
            raise DataError(f"{matrix_path}: row {bad} has not exactly one {group!r} value")
        values = np.array([groups[j][1] for j in cols], dtype=object)
        out[f"{prefix}_{group}"] = values[block.argmax(1)]
    return pd.DataFrame(out)


def _pairs(rows: np.ndarray, cols: np.ndarray, users: pd.DataFrame, items: pd.DataFrame):
    frame = pd.DataFrame({"user": rows, "item": cols})
    frame = pd.concat(
        [
            frame,
            users.iloc[rows].reset_index(drop=True),
            items.iloc[cols].reset_index(drop=True),
        ],
        axis=1,
    )
    return frame


@register_dataset("coat")
def coat(
    max_rows: int | None = None, seed: int = 2024, valid_fraction: float = 0.1,
) -> DatasetSplits:  # fmt: skip
    """Coat (Schnabel et al., ICML 2016): exposed (self-selected) -> liked; random-exposure test."""
    if not 0.0 < valid_fraction < 1.0:
        raise ConfigError(f"dataset.valid_fraction: {valid_fraction} is not in (0, 1)")
    files = coat_files()
    train_r = _matrix(files["train.ascii"], (N_USERS, N_ITEMS))
    test_r = _matrix(files["test.ascii"], (N_USERS, N_ITEMS))
    users = _attributes(
        files["user_item_features/user_features.ascii"],
        files["user_item_features/user_features_map.txt"],
        N_USERS,
        "user",
    )
    items = _attributes(
        files["user_item_features/item_features.ascii"],
        files["user_item_features/item_features_map.txt"],
        N_ITEMS,
        "item",
    )
    rows, cols = np.divmod(np.arange(N_USERS * N_ITEMS), N_ITEMS)
    full = _pairs(rows, cols, users, items)
    rating = train_r[rows, cols]
    full["exposed"] = (rating > 0).astype(np.int64)
    full["liked"] = (rating >= LIKED_AT).astype(np.int64)
    full["rating"] = rating.astype(np.int64)

    t_rows, t_cols = np.nonzero(test_r)
    test = _pairs(t_rows, t_cols, users, items)
    t_rating = test_r[t_rows, t_cols]
    test["exposed"] = 1
    test["liked"] = (t_rating >= LIKED_AT).astype(np.int64)
    test["rating"] = t_rating.astype(np.int64)

    order = np.random.default_rng(2016).permutation(len(full))
    n_valid = int(round(len(full) * valid_fraction))
    valid = full.iloc[np.sort(order[:n_valid])].reset_index(drop=True)
    train = full.iloc[np.sort(order[n_valid:])].reset_index(drop=True)
    if max_rows is not None:
        train, valid, test = (
            f.iloc[:max_rows].reset_index(drop=True) for f in (train, valid, test)
        )
    schema = Schema(
        features=[Feature("user"), Feature("item")]
        + [Feature(c) for c in (*users.columns, *items.columns)],
        tasks=[Task("exposed"), Task("liked", depends_on="exposed")],
    )
    return DatasetSplits(schema, train, valid, test, source=str(files["train.ascii"].parent))
