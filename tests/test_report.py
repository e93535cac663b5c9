"""``mtlrec report``: figures that are real PNGs, a verdict that names negative transfer plainly,
and one-line errors for a folder that is not a run."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mtlrec.cli import app
from tests.conftest import FUNNEL_SCHEMA, funnel_frame

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG


def test_report_on_a_small_diagnosed_run_writes_every_figure(tmp_path):
    funnel_frame(600, seed=1).to_csv(tmp_path / "train.csv", index=False)
    funnel_frame(300, seed=2).to_csv(tmp_path / "valid.csv", index=False)
    funnel_frame(300, seed=3).to_csv(tmp_path / "test.csv", index=False)
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(FUNNEL_SCHEMA))
    run = tmp_path / "run"
    trained = runner.invoke(
        app,
        [
            "train", "--train", str(tmp_path / "train.csv"), "--valid", str(tmp_path / "valid.csv"),
            "--test", str(tmp_path / "test.csv"), "--schema", str(tmp_path / "schema.yaml"),
            "--model", "mmoe", "--epochs", "2", "--out", str(run), "--quiet", "--diagnose",
            "--set", "train.threads=1", "--set", "train.batch_size=128",
            "--set", "model.embed_dim=4",
        ],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output

    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    figures = ["valid_metric", "train_loss", "grad_norm", "cosine", "gates", "gates_by_epoch"]
    for name in figures:
        path = run / "report" / f"{name}.png"
        assert path.is_file() and _is_png(path), name
    verdict = (run / "report" / "verdict.md").read_text()
    assert "click / purchase" in verdict and "recorded steps" in verdict
    assert "No baseline was given" in verdict and "--model single-task" in verdict
    assert "Gradient conflict" in result.output  # the verdict is printed too


def _fake_run(path, model: str, test: dict, dataset: str = "toy") -> None:
    """A run directory written by hand, so the comparison's outcome is fixed."""
    path.mkdir(parents=True)
    tasks = list(test)
    metrics = {"valid": test, "test": test}
    epochs = [
        {
            "epoch": e,
            "train_loss": {t: 0.5 / e for t in tasks},
            "valid": test,
            "monitor": 0.7,
            "seconds": 1.0,
            "samples_per_second": 100.0,
        }
        for e in (1, 2)
    ]
    history = {"model": model, "balancer": "ew", "best_epoch": 2, "epochs": epochs}
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "history.json").write_text(json.dumps(history))
    config = {"dataset": {"name": dataset}, "model": {"name": model}, "balance": {"name": "ew"}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))


def _verdict_against_baseline(tmp_path) -> str:
    """``mtlrec report tmp_path/mtl --baseline tmp_path/single``; the verdict.md it writes."""
    result = runner.invoke(
        app, ["report", str(tmp_path / "mtl"), "--baseline", str(tmp_path / "single")]
    )
    assert result.exit_code == 0, result.output
    return (tmp_path / "mtl" / "report" / "verdict.md").read_text()


def test_verdict_names_negative_transfer_when_the_baseline_is_better(tmp_path):
    _fake_run(
        tmp_path / "mtl",
        "mmoe",
        {"click": {"auc": 0.70, "logloss": 0.5}, "buy": {"auc": 0.80}, "score": {"mse": 0.50}},
    )
    _fake_run(
        tmp_path / "single",
        "single-task",
        {"click": {"auc": 0.72, "logloss": 0.4}, "buy": {"auc": 0.78}, "score": {"mse": 0.40}},
    )
    verdict = _verdict_against_baseline(tmp_path)
    assert "negative transfer on task click (\u22120.0200 AUC)" in verdict
    assert "positive transfer on task buy (+0.0200 AUC)" in verdict
    assert "negative transfer on task score (+0.1000 mse)" in verdict  # MSE: lower is better
    assert "Negative transfer on 2 of 3 task(s): click, score" in verdict
    assert "train with `--diagnose`" in verdict  # no diagnostics.json in this run
    for name in ("valid_metric", "train_loss"):
        assert _is_png(tmp_path / "mtl" / "report" / f"{name}.png")
    assert not (tmp_path / "mtl" / "report" / "cosine.png").exists()


def test_verdict_without_negative_transfer(tmp_path):
    _fake_run(tmp_path / "mtl", "ple", {"click": {"auc": 0.75}})
    _fake_run(tmp_path / "single", "single-task", {"click": {"auc": 0.72}})
    result = runner.invoke(
        app, ["report", str(tmp_path / "mtl"), "--baseline", str(tmp_path / "single")]
    )
    assert result.exit_code == 0, result.output
    assert "positive transfer on task click (+0.0300 AUC)" in result.output
    assert "No negative transfer" in result.output


@pytest.mark.parametrize("where", ["run", "baseline"])
def test_a_folder_that_is_not_a_run_is_one_line_exit_2(tmp_path, where):
    _fake_run(tmp_path / "mtl", "mmoe", {"click": {"auc": 0.75}})
    (tmp_path / "empty").mkdir()
    args = (
        ["report", str(tmp_path / "empty")]
        if where == "run"
        else ["report", str(tmp_path / "mtl"), "--baseline", str(tmp_path / "empty")]
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "not a finished run" in lines[0], result.output


def test_run_files_of_the_wrong_shape_are_one_line_exit_2(tmp_path):
    """Valid JSON of another shape (hand-edited) was a traceback in report and compare."""
    run = tmp_path / "mtl"
    _fake_run(run, "mmoe", {"click": {"auc": 0.75}})
    (run / "history.json").write_text('{"epochs": "x", "best_epoch": 1}')
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 2 and "not shaped as 'mtlrec train' writes it" in result.output
    (run / "diagnostics.json").write_text("[]")
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 2 and "diagnostics.json: must be a JSON object" in result.output
    (run / "metrics.json").write_text('{"valid": [], "test": 5}')
    result = runner.invoke(app, ["compare", str(run)])
    assert result.exit_code == 2 and "metrics.json: not a metrics file" in result.output


def test_baseline_on_other_data_or_rows_is_warned_and_partial_coverage_said(tmp_path):
    _fake_run(tmp_path / "mtl", "mmoe", {"click": {"auc": 0.75, "rows": 3000}, "dwell": {"mse": 1}})
    _fake_run(tmp_path / "single", "single-task", {"click": {"auc": 0.72, "rows": 1000}})
    config = yaml.safe_load((tmp_path / "single" / "config.yaml").read_text())
    config["dataset"]["max_rows"] = 1000
    (tmp_path / "single" / "config.yaml").write_text(yaml.safe_dump(config))
    verdict = _verdict_against_baseline(tmp_path)
    assert "other data settings (dataset.max_rows: None vs 1000)" in verdict
    assert "the test split has other rows in the two runs (click 3000 vs 1000)" in verdict
    assert "at least as good on the 1 tasks compared" in verdict


def test_the_suggested_baseline_command_repeats_the_runs_data_flags():
    from mtlrec.report import data_arguments

    config = {"dataset": {"name": "census-income", "max_rows": 3000}, "train": {"seed": 7}}
    assert data_arguments(config) == "--dataset census-income --max-rows 3000 --seed 7"
    files = {
        "dataset": {
            "name": "files",
            "train": "/d/t.csv",
            "valid": "/d/v.csv",
            "schema": "/d/s.yaml",
        }
    }
    assert data_arguments(files) == "--train /d/t.csv --valid /d/v.csv --schema /d/s.yaml"
