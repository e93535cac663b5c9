"""Loaders on the real shared files (MTLREC_DATA_DIR) and the synthetic generator."""

import numpy as np
import pandas as pd
import pytest

from mtlrec.data.datasets import load_dataset
from mtlrec.data.datasets.census import census_halves, read_census
from mtlrec.data.datasets.download import RemoteFile, locate
from mtlrec.data.datasets.synthetic import generate_mmoe
from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError, DataError


def test_census_income_follows_the_mmoe_setup(data_dir):
    splits = load_dataset("census-income", max_rows=3000)
    names = [f.name for f in splits.schema.features]
    assert splits.schema.task_names == ["income", "marital"]
    for leaked in ("income_50k", "marital_stat", "instance_weight"):
        assert leaked not in names
    assert len(names) == 39
    assert len(splits.train) == 3000
    # labels are derived from the raw columns, not guessed
    assert set(splits.train["income"].unique()) <= {0, 1}
    never = splits.train["marital_stat"].str.strip() == "Never married"
    assert (splits.train["marital"] == never.astype(int)).all()
    # categorical 'hisp_origin' keeps its real 'NA' category
    assert "NA" in set(splits.train["hisp_origin"].str.strip())


def test_census_full_split_sizes_and_rates(data_dir):
    splits = load_dataset("census-income")
    assert len(splits.train) == 199_523
    assert len(splits.valid) == 49_881 and len(splits.test) == 49_881
    assert splits.train["income"].mean() == pytest.approx(0.0621, abs=5e-4)
    assert splits.train["marital"].mean() == pytest.approx(0.4335, abs=5e-4)
    # the validation/test halves do not depend on the run's seed
    again = load_dataset("census-income", seed=99)
    assert again.valid["age"].equals(splits.valid["age"])
    # the halves are census_halves' row positions of the labelled test file, which
    # benchmarks/census/halves.py relies on to rescore exactly this test half
    whole = read_census("test")
    valid_rows, test_rows = census_halves(len(whole))
    assert sorted(np.concatenate([valid_rows, test_rows]).tolist()) == list(range(len(whole)))
    assert whole.iloc[test_rows].reset_index(drop=True).equals(splits.test)


def test_adult_tasks_and_rates(data_dir):
    splits = load_dataset("adult")
    assert len(splits.train) == 32_561
    assert len(splits.valid) + len(splits.test) == 16_281
    assert splits.train["income"].mean() == pytest.approx(0.2408, abs=5e-4)
    assert splits.train["marital"].mean() == pytest.approx(0.3281, abs=5e-4)
    assert "marital_status" not in [f.name for f in splits.schema.features]


def test_ali_ccp_sample_is_a_click_purchase_funnel(data_dir, caplog):
    splits = load_dataset("ali-ccp")  # no full files here: falls back to the sample, with a warning
    assert "sample" in caplog.text
    assert splits.schema.task("purchase").depends_on == "click"
    assert len(splits.train) == 100 and len(splits.valid) == 50 and len(splits.test) == 50
    kinds = {f.name: f.type for f in splits.schema.features}
    assert kinds["D109_14"] == "numeric" and kinds["101"] == "categorical"
    Encoder(splits.schema).fit(splits.train).transform(splits.test)


def test_aliexpress_sample_layout(data_dir):
    splits = load_dataset("aliexpress", sample=True)
    kinds = [f.type for f in splits.schema.features]
    assert kinds.count("categorical") == 16 and kinds.count("numeric") == 63
    assert splits.schema.task("conversion").depends_on == "click"
    assert len(splits.train) + len(splits.valid) == 100 and len(splits.test) == 20
    with pytest.raises(ConfigError, match="country"):
        load_dataset("aliexpress", country="XX")


def test_full_files_are_preferred_when_present(tmp_path, monkeypatch, data_dir):
    sample = data_dir / "ali_ccp_samples"
    full = tmp_path / "ali_ccp"
    full.mkdir()
    for split in ("train", "val", "test"):
        part = pd.read_csv(sample / f"torch_rechub_ali_ccp_{split}_sample.csv", dtype=str)
        pd.concat([part, part]).to_csv(full / f"ali_ccp_{split}.csv", index=False)  # doubled
    monkeypatch.setenv("MTLREC_DATA_DIR", str(tmp_path))
    assert len(load_dataset("ali-ccp").train) == 200


def test_unknown_dataset_option_is_named():
    with pytest.raises(ConfigError, match="dataset.colour"):
        load_dataset("synthetic-mmoe", colour="red")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n": "abc"}, "dataset.n must be an integer, got 'abc'"),
        ({"n": 1.5}, "dataset.n must be an integer"),
        ({"p": "0.5x"}, "dataset.p must be a number"),
        ({"noise": True}, "dataset.noise must be a number"),
        ({"noise": -1}, "dataset.noise: the variance of eps must be >= 0"),
    ],
)
def test_option_values_of_the_wrong_type_name_the_key(options, message):
    """--set passes text the YAML reader could not type: each option takes its default's type,
    or the error names it (these were tracebacks deep inside the generator)."""
    with pytest.raises(ConfigError, match=message):
        load_dataset("synthetic-mmoe", **options)


def test_option_values_take_their_defaults_type():
    typed = load_dataset("synthetic-mmoe", n=300.0, d=4.0, noise="1e-2", max_rows=None)
    plain = load_dataset("synthetic-mmoe", n=300, d=4, noise=0.01, max_rows=None)
    pd.testing.assert_frame_equal(typed.train, plain.train)
    assert typed.train.shape[1] == plain.train.shape[1]


def test_missing_file_without_url_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLREC_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="place the file there"):
        locate(RemoteFile("nowhere", "x.csv"))


@pytest.mark.parametrize("p", [-0.5, 0.0, 0.9])
def test_synthetic_task_correlation_is_p(p):
    frame = generate_mmoe(20000, d=50, m=0, p=p, noise=1e-6, seed=3)  # m=0: linear parts only
    r = np.corrcoef(frame["y1"], frame["y2"])[0, 1]
    assert r == pytest.approx(p, abs=0.03)


def test_synthetic_dataset_is_repeatable_and_split(tmp_path):
    a = load_dataset("synthetic-mmoe", n=500, d=10)
    b = load_dataset("synthetic-mmoe", n=500, d=10)
    assert a.train.equals(b.train)
    assert (len(a.train), len(a.valid), len(a.test)) == (500, 100, 100)
    assert [t.type for t in a.schema.tasks] == ["regression", "regression"]
    with pytest.raises(ConfigError, match="correlation"):
        load_dataset("synthetic-mmoe", p=1.5)


def _served(tmp_path, content: bytes) -> str:
    """A file:// URL serving ``content`` (downloads are tested without a network)."""
    path = tmp_path / "served.bin"
    path.write_bytes(content)
    return path.as_uri()


def test_a_cut_off_or_short_download_is_an_error_and_is_not_cached(tmp_path, monkeypatch):
    import gzip

    from mtlrec.data.datasets.download import download

    cache = tmp_path / "cache"
    whole = gzip.compress(b"a,b\n" * 1000)
    cut = RemoteFile("f", "x.gz", _served(tmp_path, whole[: len(whole) // 2]), None, "0" * 64)
    with pytest.raises(DataError, match="cannot download .*served.bin"):
        download(cut, cache / "f" / "x.gz")
    lines = "|1x3 Cross validator\n" + "row\n" * 10
    short = RemoteFile("f", "adult.test", _served(tmp_path, lines.encode()), data_lines=16_281)
    with pytest.raises(DataError, match="10 data lines downloaded, a complete file has 16,281"):
        download(short, cache / "f" / "adult.test")
    assert not any(p.is_file() for p in cache.rglob("*"))  # nothing trusted next time
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(DataError, match="cannot write the download cache"):
        download(short, blocked / "f" / "adult.test")


def test_aliexpress_validation_fraction_is_checked():
    with pytest.raises(ConfigError, match=r"dataset.valid_fraction: 1.0 is not in \(0, 1\)"):
        load_dataset("aliexpress", valid_fraction=1.0)
