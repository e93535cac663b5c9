"""The command-line contract: names, files written, exit status 2 with one line on user errors."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from mtlrec.cli import app
from tests.conftest import FUNNEL_SCHEMA, funnel_frame

runner = CliRunner()
MODELS = ["aitm", "cgc", "esmm", "mmoe", "omoe", "ple", "shared-bottom", "single-task"]


def _names(output: str) -> list[str]:
    return [line.split("\t")[0] for line in output.splitlines() if line.strip()]


def test_list_models_and_datasets():
    result = runner.invoke(app, ["list", "models"])
    assert result.exit_code == 0
    assert set(MODELS) <= set(_names(result.output))
    result = runner.invoke(app, ["list", "datasets"])
    names = _names(result.output)
    for name in ("census-income", "synthetic-mmoe", "adult", "ali-ccp", "aliexpress"):
        assert name in names


@pytest.mark.parametrize("kind", ["models", "datasets", "balancers"])
def test_list_descriptions_are_whole_sentences(kind):
    """A description is the docstring's first paragraph, not its first source line, which cut
    some mid-sentence."""
    result = runner.invoke(app, ["list", kind])
    for line in result.output.splitlines():
        name, description = line.split("\t")
        assert description.endswith((".", ")")), line


@pytest.fixture
def own_files(tmp_path):
    funnel_frame(1500, seed=1).to_csv(tmp_path / "train.csv", index=False)
    funnel_frame(500, seed=2).to_parquet(tmp_path / "valid.parquet")
    funnel_frame(500, seed=3).to_csv(tmp_path / "test.csv", index=False)
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(FUNNEL_SCHEMA))
    return tmp_path


def _train_own(d, out, *extra):
    return runner.invoke(
        app,
        [
            "train", "--train", str(d / "train.csv"), "--valid", str(d / "valid.parquet"),
            "--test", str(d / "test.csv"), "--schema", str(d / "schema.yaml"),
            "--model", "mmoe", "--epochs", "2", "--out", str(out), "--quiet", *extra,
        ],
    )  # fmt: skip


def test_train_own_csv_and_parquet_files_then_evaluate(own_files):
    out = own_files / "run"
    result = _train_own(own_files, out)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"valid", "test"}
    assert set(metrics["test"]) == {"click", "purchase"}
    assert {"auc", "logloss", "joint_auc", "joint_logloss"} <= set(metrics["test"]["purchase"])
    clicked = int(pd.read_csv(own_files / "test.csv")["click"].sum())
    assert metrics["test"]["purchase"]["rows"] == clicked  # CVR metrics on clicked rows only
    assert metrics["test"]["click"]["rows"] == 500
    for name in ("config.yaml", "encoder.json", "schema.json", "model.pt", "history.json"):
        assert (out / name).exists(), name
    # evaluate reuses the saved encoder and config and reproduces the test metrics
    result = runner.invoke(app, ["evaluate", str(out)])
    assert result.exit_code == 0, result.output
    again = json.loads(result.output.strip().splitlines()[-1])
    assert again["test"]["click"]["auc"] == pytest.approx(metrics["test"]["click"]["auc"])
    # and on an arbitrary file with unseen values
    other = funnel_frame(200, seed=11)
    other.loc[:5, "user"] = "brand-new-user"
    other.to_csv(own_files / "other.csv", index=False)
    result = runner.invoke(app, ["evaluate", str(out), "--data", str(own_files / "other.csv")])
    assert result.exit_code == 0, result.output


def test_a_run_on_relative_paths_evaluates_from_any_directory(own_files, monkeypatch):
    """The run stores absolute file paths: evaluate (and reproduce, export) work elsewhere."""
    monkeypatch.chdir(own_files)
    args = ["train", "--train", "train.csv", "--valid", "valid.parquet", "--test", "test.csv"]
    args += ["--schema", "schema.yaml", "--model", "shared-bottom", "--epochs", "1"]
    assert runner.invoke(app, [*args, "--out", "run", "--quiet"]).exit_code == 0
    saved = yaml.safe_load((own_files / "run" / "config.yaml").read_text())["dataset"]
    assert Path(saved["train"]).is_absolute()
    assert Path(saved["train"]).resolve() == (own_files / "train.csv").resolve()
    assert Path(saved["schema"]).resolve() == (own_files / "schema.yaml").resolve()
    elsewhere = own_files / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["evaluate", str(own_files / "run")])
    assert result.exit_code == 0, result.output


def test_same_seed_same_metrics(own_files):
    a, b = own_files / "a", own_files / "b"
    assert _train_own(own_files, a, "--seed", "5").exit_code == 0
    assert _train_own(own_files, b, "--seed", "5").exit_code == 0
    assert (a / "metrics.json").read_text() == (b / "metrics.json").read_text()


def test_quiet_keeps_the_data_warnings(own_files):
    """--quiet (and so every sweep run) drops progress lines, not the warnings about the data:
    validation user ids written as "u5.0" while training has "u5" are all out of vocabulary."""
    valid = pd.read_parquet(own_files / "valid.parquet")
    valid["user"] = valid["user"] + ".0"
    valid.to_parquet(own_files / "valid.parquet")
    result = _train_own(own_files, own_files / "run", "--epochs", "1")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "column 'user': 100% of its values were never seen" in warned[0]
    assert "epoch 1" not in result.output


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_unknown_model_exits_2_with_one_line(own_files):
    line = _error_line(_train_own(own_files, own_files / "r", "--model", "mmeo"))
    assert "unknown model 'mmeo'" in line


def test_unknown_config_key_exits_2(own_files):
    line = _error_line(_train_own(own_files, own_files / "r", "--set", "model.experts=4"))
    assert "model.experts" in line
    line = _error_line(_train_own(own_files, own_files / "r", "--set", "train.lrate=4"))
    assert "train.lrate" in line


def test_missing_column_exits_2_naming_file_and_column(own_files):
    frame = pd.read_csv(own_files / "train.csv").drop(columns=["price"])
    frame.to_csv(own_files / "train.csv", index=False)
    line = _error_line(_train_own(own_files, own_files / "r"))
    assert "train.csv" in line and "'price'" in line


def test_bad_label_exits_2_naming_row_and_column(own_files):
    frame = pd.read_csv(own_files / "train.csv")
    frame.loc[7, "click"] = 3
    frame.to_csv(own_files / "train.csv", index=False)
    line = _error_line(_train_own(own_files, own_files / "r"))
    assert "'click' row 7" in line and "train.csv" in line


def test_unreadable_file_exits_2(own_files):
    (own_files / "train.csv").write_bytes(b"\x1f\x8b\x08garbage")
    (own_files / "train.csv").rename(own_files / "train.csv.gz")
    result = runner.invoke(
        app,
        [
            "train", "--train", str(own_files / "train.csv.gz"), "--valid",
            str(own_files / "valid.parquet"), "--schema", str(own_files / "schema.yaml"),
            "--out", str(own_files / "r"), "--quiet",
        ],
    )  # fmt: skip
    assert "train.csv.gz" in _error_line(result)


def test_missing_file_and_unknown_dataset(own_files):
    line = _error_line(runner.invoke(app, ["train", "--dataset", "nope", "--out", "x", "--quiet"]))
    assert "unknown dataset 'nope'" in line
    result = runner.invoke(
        app,
        ["train", "--train", "missing.csv", "--valid", "v.csv", "--schema",
         str(own_files / "schema.yaml"), "--out", "x", "--quiet"],
    )  # fmt: skip
    assert "missing.csv" in _error_line(result)


def test_evaluate_on_a_non_run_dir_exits_2(tmp_path):
    assert "not a finished run" in _error_line(runner.invoke(app, ["evaluate", str(tmp_path)]))


def test_damaged_or_incomplete_runs_exit_2_with_one_line(own_files, tmp_path):
    run = own_files / "run"
    assert _train_own(own_files, run, "--epochs", "1").exit_code == 0
    data = ["--data", str(own_files / "test.csv"), "--out", str(tmp_path / "s.csv")]
    model = (run / "model.pt").read_bytes()
    (run / "model.pt").write_bytes(model[: len(model) // 2])
    assert "model.pt: cannot load the model" in _error_line(
        runner.invoke(app, ["predict", str(run), *data])
    )
    (run / "model.pt").write_bytes(b"")
    assert "model.pt: cannot load" in _error_line(runner.invoke(app, ["evaluate", str(run)]))
    (run / "model.pt").write_bytes(model)
    (run / "config.yaml").write_text("train: [1,\n")
    line = _error_line(runner.invoke(app, ["evaluate", str(run)]))
    assert "config.yaml line 2 column 1: not valid YAML" in line
    (run / "config.yaml").write_text("- 1\n")
    assert "not a run's configuration" in _error_line(runner.invoke(app, ["evaluate", str(run)]))
    (run / "metrics.json").write_text('{"test": {"click": {"auc": 0.7')
    assert "not a metrics file" in _error_line(runner.invoke(app, ["compare", str(run)]))
    line = _error_line(runner.invoke(app, ["compare", str(run), "--split", "validation"]))
    assert "--split 'validation': choose valid or test" in line


def test_a_run_without_test_split_says_so(own_files):
    args = [
        "train", "--train", str(own_files / "train.csv"), "--valid",
        str(own_files / "valid.parquet"), "--schema", str(own_files / "schema.yaml"),
        "--epochs", "1", "--out", str(own_files / "run"),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "note: no test split" in result.output
    line = _error_line(runner.invoke(app, ["evaluate", str(own_files / "run")]))
    assert "has no test split" in line and "--data FILE" in line


def test_out_that_is_a_file_and_an_empty_validation_file_are_named(own_files):
    line = _error_line(_train_own(own_files, own_files / "train.csv"))
    assert "train.csv: a file is in the way" in line
    pd.read_parquet(own_files / "valid.parquet").head(0).to_parquet(own_files / "valid.parquet")
    line = _error_line(_train_own(own_files, own_files / "run"))
    assert "valid.parquet: the validation split has no rows" in line


def test_run_files_get_the_umask_mode_not_owner_only(own_files):
    """Files are written through a temporary file (mkstemp: mode 0600) and renamed; they must
    end with the mode any new file gets, so e.g. a serving account can read model.pt."""
    import os

    mask = os.umask(0o022)
    try:
        assert _train_own(own_files, own_files / "run", "--epochs", "1").exit_code == 0
    finally:
        os.umask(mask)
    for name in ("model.pt", "checkpoint.pt", "metrics.json", "history.json", "config.yaml"):
        assert (own_files / "run" / name).stat().st_mode & 0o777 == 0o644, name


def test_compile_with_a_per_task_balancer_fails_before_reading_data(own_files):
    line = _error_line(
        _train_own(
            own_files, own_files / "run", "--balance", "pcgrad", "--set", "train.compile=true"
        )
    )
    assert "train.compile: balancer 'pcgrad'" in line
    assert not (own_files / "run").exists()


def test_adatask_with_another_optimizer_fails_before_reading_data(own_files):
    """AdaTask is an optimizer; train.optimizer=sgd with it was silently replaced by its Adam."""
    line = _error_line(
        _train_own(
            own_files, own_files / "run", "--balance", "adatask", "--set", "train.optimizer=sgd"
        )
    )
    assert "train.optimizer: 'sgd' cannot be used with balancer 'adatask'" in line
    assert not (own_files / "run").exists()


def test_help_paragraphs_are_not_broken_at_source_line_ends():
    """Typer prints a docstring's newlines; each paragraph must reach it as one line."""
    from mtlrec.cli import app as the_app

    for info in the_app.registered_commands:
        for paragraph in (info.callback.__doc__ or "").split("\n\n"):
            assert "\n" not in paragraph.strip(), (info.callback.__name__, paragraph)


def test_a_run_trained_on_tsv_files_scores_and_evaluates_tsv_files(tmp_path):
    for name, (n, seed) in {"train": (600, 1), "valid": (200, 2)}.items():
        funnel_frame(n, seed).to_csv(tmp_path / f"{name}.tsv", sep="\t", index=False)
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(FUNNEL_SCHEMA))
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train", "--train", str(tmp_path / "train.tsv"), "--valid", str(tmp_path / "valid.tsv"),
            "--schema", str(tmp_path / "schema.yaml"), "--epochs", "1", "--out", str(run),
            "--quiet", "--set", "dataset.sep=tab",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = tmp_path / "scores.csv"
    args = ["predict", str(run), "--data", str(tmp_path / "valid.tsv"), "--out", str(out)]
    assert runner.invoke(app, [*args, "--keep", "user"]).exit_code == 0
    assert len(pd.read_csv(out)) == 200
    result = runner.invoke(app, ["evaluate", str(run), "--data", str(tmp_path / "valid.tsv")])
    valid = json.loads((run / "metrics.json").read_text())["valid"]
    shown = json.loads(result.output.strip().splitlines()[-1])["valid.tsv"]
    assert shown["click"]["auc"] == pytest.approx(valid["click"]["auc"], abs=1e-9)
