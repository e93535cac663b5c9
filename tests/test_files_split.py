"""One training file cut into train / validation / test: at random or by time."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from mtlrec import config as cfg
from mtlrec.data.datasets.files import split_rows
from mtlrec.errors import ConfigError, DataError
from mtlrec.train.run import load_splits
from tests.conftest import FUNNEL_SCHEMA, funnel_frame


def _frame(times: list) -> pd.DataFrame:
    return pd.DataFrame({"id": range(len(times)), "t": times})


def test_by_time_the_latest_rows_are_the_test_rows():
    # Unix seconds as text: "999" < "1000" numerically, not as strings; ties keep file order
    times = ["1000", "999", "5000", "20", "3000", "3000", "100", "4000", "2000", "10"]
    train, valid, test = split_rows(_frame(times), 0.2, 0.3, "t", 0, "f.csv")
    assert train["t"].tolist() == ["10", "20", "100", "999", "1000"]
    assert valid["t"].tolist() == ["2000", "3000"] and valid["id"].tolist() == [8, 4]
    assert test["t"].tolist() == ["3000", "4000", "5000"] and test["id"].tolist()[0] == 5


def test_iso_dates_order_the_rows_too():
    times = ["2024-03-01T10:00:00", "2024-01-05", "2024-12-31T23:59:59+00:00", "2024-02-01"]
    train, valid, test = split_rows(_frame(times), 0.25, 0.25, "t", 0, "f.csv")
    assert train["id"].tolist() == [1, 3] and valid["id"].tolist() == [0]
    assert test["id"].tolist() == [2]


def test_at_random_the_split_is_fixed_by_its_own_seed():
    frame = _frame(list(range(100)))
    parts = split_rows(frame, 0.1, 0.2, None, 7, "f.csv")
    assert [len(p) for p in parts] == [70, 10, 20]
    ids = [set(p["id"]) for p in parts]
    assert set.union(*ids) == set(range(100)) and not (ids[0] & ids[1] or ids[1] & ids[2])
    assert all(p["id"].is_monotonic_increasing for p in parts)  # each part in file order
    again = split_rows(frame, 0.1, 0.2, None, 7, "f.csv")
    assert all(a.equals(b) for a, b in zip(parts, again))
    other = split_rows(frame, 0.1, 0.2, None, 8, "f.csv")
    assert set(other[2]["id"]) != ids[2]


@pytest.mark.parametrize(
    "valid, test, by, error, needle",
    [
        (0.0, 0.1, None, ConfigError, "valid_fraction must be > 0"),
        (1.2, 0.0, None, ConfigError, r"valid_fraction must be in \[0, 1\)"),
        (0.5, 0.6, None, DataError, "leave none for training"),
        (0.2, 0.2, "t", DataError, "column 't' row 2: 'soon' is neither a number nor an ISO"),
    ],
)
def test_bad_split_options_are_named(valid, test, by, error, needle):
    frame = _frame(["1", "2", "soon", "4", "5"])
    with pytest.raises(error, match=needle):
        split_rows(frame, valid, test, by, 0, "f.csv")


def test_a_single_file_run_splits_the_same_way_for_every_training_seed(tmp_path):
    frame = funnel_frame(400, seed=1)
    frame["day"] = [f"2024-01-{1 + i % 28:02d}" for i in range(400)]
    frame.to_csv(tmp_path / "all.csv", index=False)
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(FUNNEL_SCHEMA))
    dataset = {
        "name": "files",
        "train": str(tmp_path / "all.csv"),
        "schema": str(tmp_path / "schema.yaml"),
        "valid_fraction": 0.2,
        "test_fraction": 0.1,
        "split_by": "day",
    }
    splits = [load_splits(cfg.resolve({"dataset": dataset, "train": {"seed": s}})) for s in (1, 2)]
    assert [len(splits[0].train), len(splits[0].valid), len(splits[0].test)] == [280, 80, 40]
    assert splits[0].valid.equals(splits[1].valid) and splits[0].test.equals(splits[1].test)
    assert splits[0].train["day"].max() <= splits[0].valid["day"].min()
    assert splits[0].valid["day"].max() <= splits[0].test["day"].min()
    with pytest.raises(ConfigError, match="not both"):
        load_splits(cfg.resolve({"dataset": {**dataset, "valid": str(tmp_path / "all.csv")}}))


def test_streaming_refuses_a_split_of_the_training_file(tmp_path):
    from mtlrec.train.run import train_run

    funnel_frame(50).to_parquet(tmp_path / "all.parquet")
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(FUNNEL_SCHEMA))
    dataset = {"name": "files", "train": str(tmp_path / "all.parquet"), "valid_fraction": 0.2}
    dataset["schema"] = str(tmp_path / "schema.yaml")
    config = cfg.resolve({"dataset": dataset, "train": {"stream": True, "epochs": 1}})
    with pytest.raises(ConfigError, match="train.stream: dataset.valid_fraction"):
        train_run(config, tmp_path / "run", echo=lambda *_: None)
