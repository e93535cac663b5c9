"""MovieLens-100K with chronological user-history sequences, for sequence-aware MTL models.

Data: F. Maxwell Harper and Joseph A. Konstan, "The MovieLens Datasets: History and Context",
ACM Transactions on Interactive Intelligent Systems (TiiS) 5(4), article 19, 2015. 100,000 ratings
(1-5) by 943 users of 1,682 movies, September 1997 - April 1998.

One row per rating. Tasks (both derived from the rating, as the data holds one behaviour only):

* ``like``: binary, rating >= 4 (55.4 % of all ratings);
* ``rating``: regression on the 1-5 rating itself.

Features: ``user`` and ``movie`` ids; the user's ``age`` (numeric, also quantile-bucketed),
``gender``, ``occupation`` and ``zip_region`` (first digit of the US ZIP code, one of the ten
national ZIP regions, or ``non-us`` for the 18 Canadian postal codes: the 3-digit prefix has 382
values for 943 users, so it is nearly a second user id, while the first digit is a well-populated
geography); the movie's release ``year`` (numeric, bucketed; NaN for the one movie without a date)
and ``genres`` (a sequence of genre names from the 19 flags, at most 6 per movie).

Behaviour sequences (two facets, as DMT's several behaviour sequences): ``liked_history`` holds the
movies the same user rated >= 4 *strictly before* this rating's timestamp, ``other_history`` those
rated <= 3; with ``full_history: true`` a third column ``history`` holds both. Tokens are movie
ids written as the ``movie`` column writes them, oldest first and most recent last, cut to the most
recent ``history_len`` (the encoder keeps the first ``max_len`` tokens, so the cut is made here and
``max_len`` = ``history_len``); they declare ``vocab_of: movie``, so they share the ``movie``
vocabulary and embedding rows. The split into liked/other by the earlier ratings' values is what
makes the two facets informative and keeps them disjoint.

Leak rule: a rating never sees itself or any rating the user gave in the same second. MovieLens
saved ratings in batches, so about half of all ratings share their second with another rating of
the same user; their order inside the second is unknown, so none of them may see another.
Histories are built from *all* earlier ratings, whichever split they fall in (a test row sees the
user's training ratings), which is what a deployed model would see.

Split: global and chronological, so nothing from the future reaches training. Ratings are ordered
by (timestamp, user, movie); the first 80 % are train, the next ``valid_fraction`` (10 %) are
validation and the last ``test_fraction`` (10 %) are test. Each boundary is moved back to the start
of its second, so every training timestamp is strictly before every validation one (sizes differ
from the exact fractions by a few rows). ``max_rows`` keeps the first (earliest) ``max_rows`` rows
of each split, like every loader's per-split cap; histories are computed before the cap, so they
are the same as in the full data. The split does not depend on ``seed``. Most test users are new:
86 % of test ratings come from users with no training rating (users kept joining), so their
``user`` id is out of vocabulary and their own earlier ratings, in the histories, are what a model
knows about them.

Files are looked up in ``$MTLREC_DATA_DIR/movielens_100k/``, then the cache; if one is missing,
GroupLens' ``ml-100k.zip`` is downloaded once into the cache and the four members read here are
extracted, each checked against the SHA-256 below. Terms: GroupLens does not allow redistribution
of the data (nor commercial use) without permission, so only this download code ships; cite the
paper above when you publish results on it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from mtlrec.data.datasets.download import (
    RemoteFile,
    cache_dir,
    data_dir,
    download,
    extract_checked,
    locate,
)
from mtlrec.data.datasets.registry import DatasetSplits, register_dataset
from mtlrec.errors import ConfigError, DataError, first_line
from mtlrec.schema import Feature, Schema, Task

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
FOLDER = "movielens_100k"
LIKED_AT = 4  # like = rating >= 4; the liked/other history facets use the same threshold
AGE_BUCKETS = 6
YEAR_BUCKETS = 8
MAX_GENRES = 6  # the most genre flags any movie has
SHA256 = {
    "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
    "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
    "u.genre": "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb",
}


# --- files ---------------------------------------------------------------------------------------
def movielens_files() -> dict[str, Path]:
    """Local paths of the four files the loader reads, fetching GroupLens' zip if any is missing.

    A failed download is one line naming the missing file and where to put it."""
    remotes = {name: RemoteFile(FOLDER, name, None, sha) for name, sha in SHA256.items()}
    missing = []
    for name, remote in remotes.items():
        try:
            locate(remote)
        except DataError:
            missing.append(name)
    if missing:
        try:
            archive = download(
                RemoteFile(FOLDER, "ml-100k.zip", ML100K_URL), cache_dir() / FOLDER / "ml-100k.zip"
            )
        except DataError as exc:
            raise DataError(
                f"{FOLDER}/{missing[0]} not found in MTLREC_DATA_DIR ({data_dir()}) or the cache "
                f"({cache_dir()}), and the download failed ({first_line(exc)}); put "
                f"{', '.join(SHA256)} from ml-100k.zip into $MTLREC_DATA_DIR/{FOLDER}/"
            ) from None
        extract_members(archive, cache_dir() / FOLDER)
    return {name: locate(remote) for name, remote in remotes.items()}


def extract_members(archive: Path, target: Path) -> None:
    """Write each needed file of the MovieLens-100K zip to ``target/<name>``, SHA-256 checked."""
    extract_checked(archive, target, SHA256, "MovieLens-100K")


def _table(path: Path, sep: str, columns: int) -> pd.DataFrame:
    """A headerless text table as strings; a wrong field count or an empty file names the file."""
    try:
        frame = pd.read_csv(
            path,
            sep=sep,
            header=None,
            dtype=str,
            keep_default_na=False,
            quoting=csv.QUOTE_NONE,  # titles hold quotes
            encoding="latin-1",  # u.item's titles are latin-1; every byte decodes
        )
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"{path}: cannot be read ({first_line(exc)})") from None
    if frame.shape[1] != columns:
        kind = "tab" if sep == "\t" else repr(sep)
        raise DataError(f"{path}: expected {columns} {kind}-separated fields, got {frame.shape[1]}")
    return frame


def _ints(column: pd.Series, path: Path, what: str) -> np.ndarray:
    """Integers of a text column; the first cell that is not one is named by its line."""
    values = pd.to_numeric(column.str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        cell = column.iloc[row]
        if pd.isna(cell) or not str(cell).strip():
            raise DataError(f"{path}: line {row + 1}: {what} is missing")
        raise DataError(f"{path}: line {row + 1}: {what} {cell!r} is not an integer")
    return values.astype(np.int64)


def _unique_ids(ids: np.ndarray, path: Path) -> pd.Index:
    index = pd.Index(ids)
    if not index.is_unique:
        row = int(np.flatnonzero(index.duplicated())[0])
        raise DataError(f"{path}: line {row + 1}: id {ids[row]} is listed twice")
    return index


def read_genres(path: Path) -> list[str]:
    """Genre names of ``u.genre`` (``name|index`` lines) in flag order."""
    lines = [line for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]
    names = []
    for i, line in enumerate(lines):
        name, _, index = line.rpartition("|")
        if not name or index.strip() != str(i):
            raise DataError(f"{path}: line {i + 1}: expected 'name|{i}', got {line!r}")
        names.append(name)
    if not names:
        raise DataError(f"{path}: the file is empty")
    return names


def read_items(path: Path, genres: list[str]) -> pd.DataFrame:
    """Movies indexed by id: release ``year`` (NaN when undated) and ``|``-joined ``genres``."""
    raw = _table(path, "|", 5 + len(genres))
    ids = _unique_ids(_ints(raw[0], path, "movie id"), path)
    dates = raw[2].str.strip()
    parsed = pd.to_datetime(dates, format="%d-%b-%Y", errors="coerce")
    bad = parsed.isna() & (dates != "")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{path}: line {row + 1}: release date {dates.iloc[row]!r} is not DD-Mon-YYYY"
        )
    flags = np.stack([_ints(raw[5 + j], path, "genre flag") for j in range(len(genres))], axis=1)
    if not np.isin(flags, (0, 1)).all():
        row = int(np.flatnonzero(~np.isin(flags, (0, 1)).all(axis=1))[0])
        raise DataError(f"{path}: line {row + 1}: genre flags must be 0 or 1")
    joined = np.full(len(raw), "", dtype=object)
    for j, name in enumerate(genres):  # 19 vectorised passes over the movies
        joined = joined + np.where(flags[:, j] == 1, name + "|", "")
    return pd.DataFrame(
        {
            "year": parsed.dt.year.to_numpy(dtype=np.float64, na_value=np.nan),
            "genres": pd.Series(joined).str.rstrip("|").to_numpy(),
        },
        index=ids,
    )


def zip_region(zips: pd.Series) -> np.ndarray:
    """First digit of a US ZIP code (its national area), or ``non-us`` (Canadian postal codes)."""
    first = zips.str.strip().str[:1]
    return np.where(first.str.isdigit(), first, "non-us").astype(object)


def read_users(path: Path) -> pd.DataFrame:
    """Users indexed by id: age, gender, occupation and ZIP region."""
    raw = _table(path, "|", 5)
    ids = _unique_ids(_ints(raw[0], path, "user id"), path)
    return pd.DataFrame(
        {
            "age": _ints(raw[1], path, "age"),
            "gender": raw[2].str.strip().to_numpy(dtype=object),
            "occupation": raw[3].str.strip().to_numpy(dtype=object),
            "zip_region": zip_region(raw[4]),
        },
        index=ids,
    )


def read_ratings(path: Path) -> dict[str, np.ndarray]:
    """``u.data``: user, movie, rating (1-5) and timestamp columns as int64 arrays."""
    raw = _table(path, "\t", 4)
    out = {
        key: _ints(raw[j], path, key)
        for j, key in enumerate(("user", "movie", "rating", "timestamp"))
    }
    bad = (out["rating"] < 1) | (out["rating"] > 5)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: line {row + 1}: rating {out['rating'][row]} is not in 1..5")
    return out


# --- histories -----------------------------------------------------------------------------------
def history_column(
    user: np.ndarray, timestamp: np.ndarray, movie: np.ndarray, keep: np.ndarray, history_len: int
) -> np.ndarray:
    """For every rating, the ``|``-joined movies of the same user's ratings with ``keep`` True and
    a timestamp strictly before its own: oldest first, the most recent ``history_len`` only.

    Vectorised: ratings are sorted by (user, timestamp, movie); a rating's history is then the
    kept ratings between its user's first row and the first row of its own (user, second) group,
    which is a contiguous slice of the kept ratings in that order. Cumulative counts give each
    slice's bounds, one gather builds all slices, and Arrow joins them into strings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(user)
    if n == 0:
        return np.zeros(0, dtype=object)
    order = np.lexsort((movie, timestamp, user))
    u, t, m, k = user[order], timestamp[order], movie[order], keep[order]
    pos = np.arange(n)
    new_user = np.r_[True, u[1:] != u[:-1]]
    new_second = new_user | np.r_[True, t[1:] != t[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, pos, 0))
    second_start = np.maximum.accumulate(np.where(new_second, pos, 0))
    kept_before = np.r_[0, np.cumsum(k)]  # kept rows among sorted positions < i
    hi = kept_before[second_start]  # end (exclusive) of the slice of kept movies
    lo = np.maximum(kept_before[user_start], hi - history_len)
    lengths = hi - lo
    offsets = np.r_[0, np.cumsum(lengths)]
    gather = np.repeat(lo - offsets[:-1], lengths) + np.arange(offsets[-1])
    tokens = pa.array(m[k][gather]).cast(pa.string())
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int64()), tokens)
    joined = pc.binary_join(lists, "|").to_numpy(zero_copy_only=False)
    out = np.empty(n, dtype=object)
    out[order] = joined
    return out


# --- the loader ----------------------------------------------------------------------------------
def _check_options(history_len: int, valid_fraction: float, test_fraction: float) -> None:
    if isinstance(history_len, bool) or not isinstance(history_len, int | np.integer):
        raise ConfigError(f"dataset.history_len: expected an integer >= 1, got {history_len!r}")
    if history_len < 1:
        raise ConfigError(f"dataset.history_len: expected an integer >= 1, got {history_len}")
    for key, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            raise ConfigError(f"dataset.{key}: {value!r} is not in (0, 1)")
    if valid_fraction + test_fraction >= 1:
        raise ConfigError(
            f"dataset.valid_fraction + dataset.test_fraction: {valid_fraction} + {test_fraction} "
            "leaves no training rows (it must be < 1)"
        )


def split_points(timestamp: np.ndarray, valid_fraction: float, test_fraction: float) -> list[int]:
    """Row positions where validation and test start in chronologically sorted ``timestamp``,
    each moved back to the first rating of its second so no second spans two splits."""
    n = len(timestamp)
    cuts = [n - round(n * (valid_fraction + test_fraction)), n - round(n * test_fraction)]
    return [
        int(np.searchsorted(timestamp, timestamp[c], side="left")) if c < n else n for c in cuts
    ]


def movielens_schema(history_len: int = 20, full_history: bool = False) -> Schema:
    """The features and tasks of ``movielens-100k`` (see the module docstring)."""
    facets = ["liked_history", "other_history"] + (["history"] if full_history else [])
    return Schema(
        features=[
            Feature("user"),
            Feature("movie"),
            Feature("age", "numeric", buckets=AGE_BUCKETS),
            Feature("gender"),
            Feature("occupation"),
            Feature("zip_region"),
            Feature("year", "numeric", buckets=YEAR_BUCKETS),
            Feature("genres", "sequence", max_len=MAX_GENRES),
        ]
        # vocab_of: a history token is the same embedding row as the candidate movie, so target
        # attention (DMT) can match them
        + [Feature(name, "sequence", max_len=history_len, vocab_of="movie") for name in facets],
        tasks=[Task("like"), Task("rating", "regression")],
    )


@register_dataset("movielens-100k")
def movielens_100k(
    max_rows: int | None = None,
    seed: int = 2024,
    history_len: int = 20,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    full_history: bool = False,
) -> DatasetSplits:
    """MovieLens-100K (Harper & Konstan, TiiS 2015): like + rating, liked/other user histories.

    ``history_len``: most recent earlier movies kept per history facet; ``valid_fraction`` /
    ``test_fraction``: the last shares of ratings in time; ``full_history``: also a ``history``
    column with both facets. The chronological split ignores ``seed``."""
    _check_options(history_len, valid_fraction, test_fraction)
    if not isinstance(full_history, bool):
        raise ConfigError(f"dataset.full_history: expected true or false, got {full_history!r}")
    files = movielens_files()
    genres = read_genres(files["u.genre"])
    items = read_items(files["u.item"], genres)
    users = read_users(files["u.user"])
    r = read_ratings(files["u.data"])
    if len(r["user"]) == 0:
        raise DataError(f"{files['u.data']}: no ratings")

    for key, known, name in (("user", users.index, "u.user"), ("movie", items.index, "u.item")):
        unknown = ~np.isin(r[key], known)
        if unknown.any():
            i = int(np.flatnonzero(unknown)[0])
            raise DataError(
                f"{files['u.data']}: line {i + 1}: {key} id {r[key][i]} is not in {name}"
            )

    order = np.lexsort((r["movie"], r["user"], r["timestamp"]))  # chronological, deterministic
    r = {key: values[order] for key, values in r.items()}
    u_row = users.index.get_indexer(r["user"])
    m_row = items.index.get_indexer(r["movie"])

    liked = r["rating"] >= LIKED_AT
    hist = {
        "liked_history": liked,
        "other_history": ~liked,
        **({"history": np.ones_like(liked)} if full_history else {}),
    }
    frame = pd.DataFrame(
        {
            "user": r["user"].astype(str).astype(object),
            "movie": r["movie"].astype(str).astype(object),
            **{c: users[c].to_numpy()[u_row] for c in users.columns},
            **{c: items[c].to_numpy()[m_row] for c in items.columns},
            **{
                name: history_column(r["user"], r["timestamp"], r["movie"], keep, history_len)
                for name, keep in hist.items()
            },
            "like": liked.astype(np.int64),
            "rating": r["rating"],
            "timestamp": r["timestamp"],
        }
    )
    valid_at, test_at = split_points(r["timestamp"], valid_fraction, test_fraction)
    parts = {"train": (0, valid_at), "valid": (valid_at, test_at), "test": (test_at, len(frame))}
    splits = {}
    for split, (start, stop) in parts.items():
        if stop <= start:
            raise DataError(
                f"{files['u.data']}: {len(frame)} ratings leave the {split} split empty "
                "(too few ratings, or too many in one second at the boundary)"
            )
        if max_rows is not None:
            stop = min(stop, start + max_rows)
        splits[split] = frame.iloc[start:stop].reset_index(drop=True)
    return DatasetSplits(
        movielens_schema(history_len, full_history),
        splits["train"],
        splits["valid"],
        splits["test"],
        source=str(files["u.data"].parent),
    )
