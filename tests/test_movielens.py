"""MovieLens-100K loader: chronological split, leak-free user histories, labels, errors, training."""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtlrec.data.datasets import load_dataset
from mtlrec.data.datasets import movielens as ml
from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError, DataError

FOLDER = ml.FOLDER


@pytest.fixture(scope="module")
def full(data_dir):
    """All 100,000 ratings (about half a second to load)."""
    if not (data_dir / FOLDER).is_dir():
        pytest.skip(f"MTLREC_DATA_DIR has no {FOLDER}/ folder")
    return ml.movielens_100k()


def _tokens(cell: str) -> list[str]:
    return cell.split("|") if cell else []


def _reference(frame: pd.DataFrame, row: pd.Series, keep, history_len: int) -> list[str]:
    """The history of ``row`` by its definition, one row at a time."""
    mine = frame[(frame["user"] == row["user"]) & (frame["timestamp"] < row["timestamp"])]
    mine = mine[keep(mine["rating"])].sort_values(["timestamp", "movie"], key=_numeric_movie)
    return mine["movie"].tolist()[-history_len:]


def _numeric_movie(col: pd.Series) -> pd.Series:
    return col.astype(int) if col.name == "movie" else col


# --- the real data --------------------------------------------------------------------------------
def test_split_sizes_labels_and_chronology(full):
    s = full
    assert (len(s.train), len(s.valid), len(s.test)) == (79_999, 10_001, 10_000)
    assert s.train["timestamp"].max() < s.valid["timestamp"].min()
    assert s.valid["timestamp"].max() < s.test["timestamp"].min()
    for part in (s.train, s.valid, s.test):
        assert part["timestamp"].is_monotonic_increasing
        assert (part["like"] == (part["rating"] >= 4).astype(int)).all()
        assert part["rating"].between(1, 5).all()
    both = pd.concat([s.train, s.valid, s.test])
    assert both["like"].mean() == pytest.approx(0.5537, abs=1e-4)  # 55,375 of 100,000
    assert both["rating"].value_counts().sort_index().tolist() == [
        6_110, 11_370, 27_145, 34_174, 21_201,
    ]  # fmt: skip
    assert both["user"].nunique() == 943 and both["movie"].nunique() == 1_682
    assert not both.duplicated(["user", "movie"]).any()


def test_schema_features_and_tasks(full):
    schema = full.schema
    assert [(t.name, t.type) for t in schema.tasks] == [
        ("like", "binary"),
        ("rating", "regression"),
    ]
    kinds = {f.name: f.type for f in schema.features}
    assert kinds == {
        "user": "categorical", "movie": "categorical", "age": "numeric", "gender": "categorical",
        "occupation": "categorical", "zip_region": "categorical", "year": "numeric",
        "genres": "sequence", "liked_history": "sequence", "other_history": "sequence",
    }  # fmt: skip
    assert {f.name: f.max_len for f in schema.features_of("sequence")}["liked_history"] == 20
    t = full.train
    assert set(t["zip_region"]) <= {*"0123456789", "non-us"}
    assert t.loc[t["movie"] == "1", "genres"].iloc[0] == "Animation|Children's|Comedy"  # Toy Story
    assert t.loc[t["movie"] == "1", "year"].iloc[0] == 1995
    both = pd.concat([full.train, full.valid, full.test])
    assert both.loc[both["movie"] == "267", "year"].isna().all()  # the one undated movie


def test_histories_match_their_definition(full):
    both = pd.concat([full.train, full.valid, full.test], ignore_index=True)
    rng = np.random.default_rng(0)
    rows = both.iloc[rng.choice(len(both), 150, replace=False)]
    for _, row in rows.iterrows():
        liked = _tokens(row["liked_history"])
        other = _tokens(row["other_history"])
        assert liked == _reference(both, row, lambda r: r >= 4, 20)
        assert other == _reference(both, row, lambda r: r <= 3, 20)
        assert len(liked) <= 20 and len(other) <= 20 and not set(liked) & set(other)
        assert row["movie"] not in liked + other  # never itself
    # the histories of test rows reach back into the training period
    hist = full.test.assign(h=full.test["liked_history"].str.split("|")).explode("h")
    pairs = pd.MultiIndex.from_arrays([hist["user"], hist["h"]])
    assert pairs.isin(pd.MultiIndex.from_frame(full.train[["user", "movie"]])).sum() > 1000


def test_max_rows_keeps_the_earliest_rows_of_each_split_and_their_histories(full):
    small = ml.movielens_100k(max_rows=500, full_history=True)
    for name in ("train", "valid", "test"):
        part, whole = getattr(small, name), getattr(full, name)
        assert len(part) == 500
        cols = ["user", "movie", "timestamp", "liked_history", "other_history"]
        assert part[cols].equals(whole[cols].iloc[:500])
    assert small.schema.features[-1].name == "history"
    row = small.test.iloc[-1]
    merged = _tokens(row["liked_history"]) + _tokens(row["other_history"])
    assert set(_tokens(row["history"])) <= set(merged) and len(_tokens(row["history"])) <= 20


def test_registered_under_its_name_and_options_named(data_dir):
    splits = load_dataset("movielens-100k", max_rows=50, history_len=5)
    assert {f.max_len for f in splits.schema.features if f.name.endswith("history")} == {5}
    assert splits.train["liked_history"].str.count(r"\|").max() <= 4
    with pytest.raises(ConfigError, match="dataset.colour"):
        load_dataset("movielens-100k", colour="red")


# --- hand-built files -----------------------------------------------------------------------------
GENRES = "unknown|0\nAction|1\nDrama|2\n\n"
ITEMS = [
    "1|A (1995)|01-Jan-1995||http://x|0|1|0",
    "2|B (1990)|01-Jan-1990||http://x|0|0|1",
    "3|C|||http://x|1|0|0",
    "4|D (1980)|05-May-1980||http://x|0|1|1",
    "5|E (1970)|01-Jan-1970||http://x|0|1|0",
]
USERS = ["1|24|M|technician|85711", "2|53|F|other|T8H1N"]
# user movie rating timestamp. User 1 rates movies 1 and 2 in the same second (100), then 3 at
# 200 and 4, 5 together at 300; user 2 rates 1 and 2 in one second too.
RATINGS = [
    (1, 1, 5, 100), (1, 2, 2, 100), (2, 1, 4, 150), (2, 2, 1, 150),
    (1, 3, 4, 200), (2, 3, 3, 250), (1, 4, 1, 300), (1, 5, 5, 300),
    (2, 4, 5, 350), (1, 2, 3, 400),
]  # fmt: skip


def _write(root: Path, ratings=RATINGS, **override: str) -> Path:
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    texts = {
        "u.genre": GENRES,
        "u.item": "\n".join(ITEMS) + "\n",
        "u.user": "\n".join(USERS) + "\n",
        "u.data": "".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in ratings),
    }
    texts.update(override)
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="latin-1")
    return folder


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    _write(tmp_path)
    monkeypatch.setenv("MTLREC_DATA_DIR", str(tmp_path))
    return tmp_path


def _all(splits) -> pd.DataFrame:
    return pd.concat([splits.train, splits.valid, splits.test], ignore_index=True)


def test_same_second_ratings_do_not_see_each_other(tiny):
    rows = _all(ml.movielens_100k(valid_fraction=0.2, test_fraction=0.2, full_history=True))
    by = {(r.user, r.movie, r.timestamp): r for r in rows.itertuples()}
    cell = {k: (r.liked_history, r.other_history, r.history) for k, r in by.items()}
    assert cell[("1", "1", 100)] == ("", "", "")
    assert cell[("1", "2", 100)] == ("", "", "")  # rated in the same second as movie 1
    assert cell[("2", "2", 150)] == ("", "", "")
    assert cell[("1", "3", 200)] == ("1", "2", "1|2")
    assert cell[("1", "4", 300)] == ("1|3", "2", "1|2|3")  # not 5, of the same second
    assert cell[("1", "5", 300)] == ("1|3", "2", "1|2|3")
    assert cell[("1", "2", 400)] == ("1|3|5", "2|4", "1|2|3|4|5")  # oldest first
    assert cell[("2", "4", 350)] == ("1", "2|3", "1|2|3")
    # the other columns
    toy = by[("1", "4", 300)]
    assert (toy.genres, toy.year, toy.age, toy.zip_region) == ("Action|Drama", 1980, 24, "8")
    assert by[("2", "1", 150)].zip_region == "non-us"
    assert math.isnan(by[("1", "3", 200)].year) and by[("1", "3", 200)].genres == "unknown"
    assert (rows["like"] == (rows["rating"] >= 4)).all()


def test_history_len_keeps_the_most_recent(tiny):
    rows = _all(ml.movielens_100k(history_len=1, valid_fraction=0.2, test_fraction=0.2))
    last = rows[(rows["user"] == "1") & (rows["timestamp"] == 400)].iloc[0]
    assert (last["liked_history"], last["other_history"]) == ("5", "4")


def test_split_never_cuts_a_second(tiny):
    # 10 ratings, 30 % + 30 %: test would start at row 7, the second rating of second 300 (rows
    # 6-7 in time order), so it starts at row 6 instead
    s = ml.movielens_100k(valid_fraction=0.3, test_fraction=0.3)
    assert (len(s.train), len(s.valid), len(s.test)) == (4, 2, 4)
    assert s.train["timestamp"].max() < s.valid["timestamp"].min()
    assert s.valid["timestamp"].max() < s.test["timestamp"].min()


def test_a_split_left_empty_is_named(tmp_path, monkeypatch):
    _write(tmp_path, ratings=[(1, m, 4, 100) for m in (1, 2, 3, 4, 5)])  # one second only
    monkeypatch.setenv("MTLREC_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"u\.data: 5 ratings leave the train split empty"):
        ml.movielens_100k()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"history_len": 0}, "dataset.history_len"),
        ({"history_len": True}, "dataset.history_len"),
        ({"history_len": 2.5}, "dataset.history_len"),
        ({"valid_fraction": 0.0}, "dataset.valid_fraction"),
        ({"test_fraction": 1.0}, "dataset.test_fraction"),
        ({"test_fraction": "0.1"}, "dataset.test_fraction"),
        ({"valid_fraction": 0.5, "test_fraction": 0.5}, "leaves no training rows"),
        ({"full_history": "yes"}, "dataset.full_history"),
    ],
)
def test_bad_options_are_named(options, named, tiny):
    with pytest.raises(ConfigError, match=named):
        ml.movielens_100k(**options)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("u.data", "1\t1\t5\t100\n1\t2\tfive\t100\n", r"u\.data: line 2: rating 'five' is not"),
        ("u.data", "1\t1\t5\t100\n1\t2\t7\t100\n", r"u\.data: line 2: rating 7 is not in 1\.\.5"),
        ("u.data", "1\t1\t5\t100\n1\t2\t100\n", r"u\.data: line 2: timestamp is missing"),
        ("u.data", "1\t1\t5\t100\n3\t2\t4\t100\n", r"u\.data: line 2: user id 3 is not in u\.user"),
        ("u.data", "1\t9\t5\t100\n", r"u\.data: line 1: movie id 9 is not in u\.item"),
        ("u.data", "", r"u\.data: the file is empty"),
        ("u.data", "1\t1\t5\n", r"u\.data: expected 4 tab-separated fields, got 3"),
        ("u.user", "1|24|M|x|1\n1|30|F|y|2\n", r"u\.user: line 2: id 1 is listed twice"),
        ("u.item", "1|A|1995-01-01||u|0|1|0\n", r"u\.item: line 1: release date '1995-01-01'"),
        ("u.item", "1|A|||u|0|2|0\n", r"u\.item: line 1: genre flags must be 0 or 1"),
        ("u.item", "1|A|||u|0|1\n", r"u\.item: expected 8 '\|'-separated fields, got 7"),
        ("u.genre", "Action|1\n", r"u\.genre: line 1: expected 'name\|0'"),
    ],
)
def test_a_damaged_file_is_named_in_one_line(tmp_path, monkeypatch, name, text, message):
    folder = _write(tmp_path, **{name: text})
    monkeypatch.setenv("MTLREC_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=message) as info:
        ml.movielens_100k()
    assert str(folder) in str(info.value) and "\n" not in str(info.value)


def test_a_missing_file_names_itself_when_the_download_fails(tmp_path, monkeypatch):
    folder = _write(tmp_path)
    (folder / "u.item").unlink()
    monkeypatch.setenv("MTLREC_DATA_DIR", str(tmp_path))

    def offline(remote, target):
        raise DataError(f"cannot download {remote.url} (no network)")

    monkeypatch.setattr(ml, "download", offline)
    with pytest.raises(DataError, match=r"movielens_100k/u\.item not found .*no network") as info:
        ml.movielens_100k()
    assert "\n" not in str(info.value)


# --- the GroupLens archive ------------------------------------------------------------------------
def _zip_of(source: Path, path: Path, corrupt: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-100k/", b"")
        for name in (*ml.SHA256, "README"):
            data = (source / name).read_bytes()
            if name == corrupt:
                data = data[:-2] + b"9\n"
            zf.writestr(f"ml-100k/{name}", data)
    return path


def test_files_are_extracted_from_the_grouplens_zip_when_missing(data_dir, tmp_path, monkeypatch):
    source = data_dir / FOLDER
    if not source.is_dir():
        pytest.skip(f"no {FOLDER}/ folder to build the archive from")
    archive = _zip_of(source, tmp_path / "ml-100k.zip")
    seen = {}

    def fake_download(remote, target):
        seen["url"] = remote.url
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(archive, target)
        return target

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MTLREC_DATA_DIR", str(empty))
    monkeypatch.setattr(ml, "download", fake_download)
    files = ml.movielens_files()
    assert seen["url"] == ml.ML100K_URL
    assert files["u.data"].read_bytes() == (source / "u.data").read_bytes()
    assert set(files) == {"u.data", "u.item", "u.user", "u.genre"}


def test_a_corrupt_or_unreadable_archive_is_rejected(data_dir, tmp_path):
    source = data_dir / FOLDER
    if not source.is_dir():
        pytest.skip(f"no {FOLDER}/ folder to build the archive from")
    archive = _zip_of(source, tmp_path / "bad.zip", corrupt="u.user")
    with pytest.raises(DataError, match="member 'u.user' fails its sha256 check"):
        ml.extract_members(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "u.user").exists()
    assert not list((tmp_path / "out").glob(".u.user*"))
    html = tmp_path / "page.zip"
    html.write_bytes(b"<html>not a zip</html>")
    with pytest.raises(DataError, match="page.zip: not a readable zip archive"):
        ml.extract_members(html, tmp_path / "out")


# --- end to end -----------------------------------------------------------------------------------
def test_encodes_and_trains_mmoe_for_one_epoch(data_dir, tmp_path):
    from mtlrec import config as cfg
    from mtlrec.train.run import train_run

    splits = ml.movielens_100k(max_rows=3000)
    enc = Encoder(splits.schema).fit(splits.train)
    table = enc.transform(splits.test)
    assert table.labels.shape == (3000, 2)
    assert table.seq.shape == (3000, 6 + 20 + 20)  # genres, liked_history, other_history
    assert int((table.seq[:, 6:] > 0).sum()) > 0  # histories are encoded, not all padding
    # history tokens share the movie's vocabulary and embedding rows (vocab_of: movie)
    assert {f.vocab_of for f in splits.schema.features if f.name.endswith("history")} == {"movie"}
    movie_col = [f.name for f in splits.schema.features_of("categorical")].index("movie")
    row = splits.test[splits.test["liked_history"] != ""].tail(1)
    as_candidate = row.assign(movie=row["liked_history"].str.split("|").str[0])
    movie_id = enc.transform(as_candidate).cat[0, movie_col]
    assert int(movie_id) > 0 and int(movie_id) == int(enc.transform(row).seq[0, 6])

    config = cfg.resolve(
        {
            "dataset": {"name": "movielens-100k", "max_rows": 3000},
            "model": {"name": "mmoe", "num_experts": 3, "embed_dim": 8},
            "train": {"epochs": 1, "batch_size": 512, "seed": 1, "threads": 1, "progress": False},
        }
    )
    train_run(config, tmp_path / "run", echo=lambda *_: None)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())

    def numbers(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from numbers(v)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield float(value)

    found = list(numbers(metrics))
    assert found and all(math.isfinite(v) for v in found)
    assert "like" in json.dumps(metrics) and "rating" in json.dumps(metrics)


@pytest.mark.parametrize("model", ["dmt", "mose"])
def test_the_preset_trains_each_sequence_model(model, data_dir, tmp_path):
    """The preset picks DMT's facets (the two histories, not the genres) and MoSE's stream (the
    whole history in time order, which its default of every sequence feature would refuse)."""
    from mtlrec import config as cfg
    from mtlrec.train.run import train_run

    config = cfg.resolve(
        {
            "dataset": {"name": "movielens-100k", "max_rows": 600},
            "model": {"name": model},
            "train": {"epochs": 1, "threads": 1, "progress": False},
        }
    )
    lines: list[str] = []
    train_run(config, tmp_path / "run", echo=lambda *a, **_: lines.append(" ".join(map(str, a))))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert math.isfinite(metrics["test"]["like"]["auc"])
    assert math.isfinite(metrics["test"]["rating"]["mse"])
    assert not [line for line in lines if "max_len" in line or "vocab_of" in line]
