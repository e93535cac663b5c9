"""synthetic-funnel (rates, ground truth, the bias knob) and Coat (shapes, labels, download path)."""

import zipfile

import numpy as np
import pytest

from mtlrec.data.datasets import coat as coat_module
from mtlrec.data.datasets import load_dataset
from mtlrec.data.datasets.funnel import generate_funnel
from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError, DataError
from mtlrec.train.metrics import auc


@pytest.fixture(scope="module")
def worlds():
    """The same 60,000 impressions' world at three bias strengths."""
    return {b: generate_funnel(60_000, bias=b, seed=0) for b in (0.0, 0.5, 1.0)}


def test_funnel_rates_are_in_the_intended_ranges(worlds):
    for bias, frame in worlds.items():
        clicked = frame["click"] == 1
        assert 0.02 < frame["click"].mean() < 0.07, bias
        assert 0.1 < frame.loc[clicked, "cart"].mean() < 0.45, bias
        assert 0.04 < frame.loc[clicked, "purchase"].mean() < 0.25, bias
        assert 0.05 < frame["true_cvr"].mean() < 0.12, bias
        # dependent labels only where clicked; truth columns are probabilities
        assert (frame.loc[~clicked, ["cart", "purchase"]] == 0).all().all()
        assert frame[["true_ctr", "true_cvr"]].apply(lambda c: c.between(0, 1).all()).all()


def test_true_cvr_predicts_purchase_among_clicks(worlds):
    for bias, frame in worlds.items():
        clicked = frame["click"] == 1
        assert (
            auc(
                frame.loc[clicked, "purchase"].to_numpy(), frame.loc[clicked, "true_cvr"].to_numpy()
            )
            > 0.7
        ), bias
        assert auc(frame["click"].to_numpy(), frame["true_ctr"].to_numpy()) > 0.7, bias


def test_bias_widens_the_gap_between_clicked_and_all_impressions(worlds):
    gaps = {}
    for bias, frame in worlds.items():
        clicked = frame["click"] == 1
        gaps[bias] = frame.loc[clicked, "true_cvr"].mean() - frame["true_cvr"].mean()
    assert abs(gaps[0.0]) < 0.01  # clicks independent of conversion affinity
    assert gaps[0.0] < gaps[0.5] < gaps[1.0]
    assert gaps[1.0] > 0.05
    # the conversion side of the world does not depend on the bias knob
    assert np.allclose(worlds[0.0]["true_cvr"], worlds[1.0]["true_cvr"])


def test_synthetic_funnel_loader_splits_schema_and_options():
    splits = load_dataset(
        "synthetic-funnel", n_train=3000, n_valid=500, n_test=700, bias=0.3, data_seed=5
    )
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (3000, 500, 700)
    schema = splits.schema
    assert schema.task_names == ["click", "cart", "purchase"]
    assert [t.depends_on for t in schema.tasks] == [None, "click", "click"]
    columns = {f.source for f in schema.features} | {t.source for t in schema.tasks}
    assert {"true_ctr", "true_cvr"}.isdisjoint(columns)
    assert {"true_ctr", "true_cvr"} <= set(splits.test.columns)
    again = load_dataset(
        "synthetic-funnel", n_train=3000, n_valid=500, n_test=700, bias=0.3, data_seed=5
    )
    assert splits.test.equals(again.test)
    enc = Encoder(schema).fit(splits.train)  # extra columns are carried, not encoded
    table = enc.transform(splits.test)
    assert table.labels.shape == (700, 3)
    capped = load_dataset("synthetic-funnel", max_rows=50, n_train=300, n_valid=100, n_test=100)
    assert len(capped.train) == len(capped.valid) == len(capped.test) == 50
    with pytest.raises(ConfigError, match="bias"):
        load_dataset("synthetic-funnel", bias=1.5, n_train=10, n_valid=10, n_test=10)


# --- Coat ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coat_splits():
    import os

    if not os.path.isdir(os.path.join(os.environ.get("MTLREC_DATA_DIR", "/nonexistent"), "coat")):
        pytest.skip("MTLREC_DATA_DIR has no coat/ folder")
    return load_dataset("coat")


def test_coat_shapes_and_label_rates(coat_splits):
    s = coat_splits
    assert len(s.train) + len(s.valid) == 290 * 300 == 87_000
    assert len(s.valid) == 8_700
    assert len(s.test) == 4_640
    both = np.concatenate([s.train["exposed"], s.valid["exposed"]])
    assert both.sum() == 6_960  # 24 self-selected ratings per user
    liked = np.concatenate([s.train["liked"], s.valid["liked"]]).sum()
    assert liked / 6_960 == pytest.approx(0.274, abs=0.001)  # rating >= 4: 1,275 + 630
    assert (s.test["exposed"] == 1).all()
    assert s.test["liked"].mean() == pytest.approx(0.185, abs=0.001)  # 641 + 219 of 4,640
    assert (s.test.groupby("user").size() == 16).all()
    # a dependent label is never positive where its upstream is 0
    assert (s.train.loc[s.train["exposed"] == 0, "liked"] == 0).all()


def test_coat_schema_and_features(coat_splits):
    s = coat_splits
    assert s.schema.task_names == ["exposed", "liked"]
    assert s.schema.task("liked").depends_on == "exposed"
    names = [f.name for f in s.schema.features]
    assert names[:2] == ["user", "item"]
    assert {"user_gender", "user_age", "item_jackettype", "item_color"} <= set(names)
    assert set(s.test["user_gender"]) <= {"men", "women"}
    assert s.train["item_onfrontpage"].isin(["yes", "no"]).all()
    enc = Encoder(s.schema).fit(s.train)
    assert enc.transform(s.test).labels.shape == (4_640, 2)


def test_coat_options(coat_splits):
    small = load_dataset("coat", max_rows=100, valid_fraction=0.2)
    assert len(small.train) == len(small.valid) == len(small.test) == 100
    with pytest.raises(ConfigError, match="valid_fraction"):
        load_dataset("coat", valid_fraction=1.0)


def _zip_of(data_dir, path, corrupt: str | None = None):
    with zipfile.ZipFile(path, "w") as zf:
        for name in coat_module.SHA256:
            data = (data_dir / "coat" / name).read_bytes()
            if name == corrupt:
                data = data[:-2] + b"9\n"
            zf.writestr(f"coat/{name}", data)
    return path


def test_coat_is_fetched_from_the_authors_zip_when_missing(data_dir, tmp_path, monkeypatch):
    if not (data_dir / "coat").is_dir():
        pytest.skip("no coat/ folder to build the archive from")
    archive = _zip_of(data_dir, tmp_path / "coat.zip")
    seen = {}

    def fake_download(remote, target):
        seen["url"] = remote.url
        return archive

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MTLREC_DATA_DIR", str(empty))
    monkeypatch.setattr(coat_module, "download", fake_download)
    files = coat_module.coat_files()
    assert seen["url"] == coat_module.COAT_URL
    assert files["train.ascii"].read_bytes() == (data_dir / "coat" / "train.ascii").read_bytes()
    assert len(load_dataset("coat").test) == 4_640


def test_a_corrupt_archive_member_is_rejected_and_not_kept(data_dir, tmp_path):
    if not (data_dir / "coat").is_dir():
        pytest.skip("no coat/ folder to build the archive from")
    archive = _zip_of(data_dir, tmp_path / "bad.zip", corrupt="test.ascii")
    with pytest.raises(DataError, match="test.ascii"):
        coat_module.extract_members(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "test.ascii").exists()
    assert not [p for p in (tmp_path / "out").glob(".test.ascii*")]


def test_a_damaged_coat_archive_is_named(tmp_path):
    archive = tmp_path / "coat.zip"
    archive.write_bytes(b"<html>not a zip</html>")
    with pytest.raises(DataError, match="coat.zip: not a readable zip archive"):
        coat_module.extract_members(archive, tmp_path / "out")
