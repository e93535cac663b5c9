"""Replaying a finished run's first epochs: identical when nothing changed, and it says what moved
when the training or the evaluation did."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from mtlrec.cli import app
from mtlrec.errors import MTLRecError
from mtlrec.train.replay import replay_run
from tests.conftest import copy_run


def test_unchanged_run_replays_bit_for_bit(finished_run):
    one = replay_run(finished_run, epochs=1)
    assert one.identical, one.differences
    # 2 tasks x (training loss, validation AUC, validation log loss)
    assert one.compared == 6
    two = replay_run(finished_run, epochs=2)
    assert two.identical and two.compared == 12


def test_changed_training_is_reported(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["lr"] *= 1.01  # what a changed default or kernel does to training
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    result = replay_run(run, epochs=1)
    assert not result.identical and not result.training_identical
    assert any("train_loss" in d for d in result.differences)
    assert result.summary().startswith("training differs")


def test_evaluation_only_change_is_told_apart(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    history = json.loads((run / "history.json").read_text())
    task = next(iter(history["epochs"][0]["valid"]))
    history["epochs"][0]["valid"][task]["auc"] += 1e-9
    (run / "history.json").write_text(json.dumps(history))
    result = replay_run(run, epochs=1)
    assert result.training_identical and not result.identical
    assert len(result.differences) == 1
    assert result.differences[0].startswith(f"epoch 1 valid {task} auc: ")
    assert result.max_abs_diff == pytest.approx(1e-9, rel=1e-3)


def test_unusable_run_directories_raise_naming_the_file(finished_run, tmp_path):
    with pytest.raises(MTLRecError, match="history.json"):
        replay_run(tmp_path, epochs=1)
    with pytest.raises(MTLRecError, match="fewer than the 5"):
        replay_run(finished_run, epochs=5)
    with pytest.raises(MTLRecError, match=">= 1"):
        replay_run(finished_run, epochs=0)
    run = copy_run(finished_run, tmp_path / "shaped")
    (run / "history.json").write_text('{"epochs": "x"}')  # valid JSON, wrong shape: a traceback
    with pytest.raises(MTLRecError, match="history.json: 'epochs' is not a list"):
        replay_run(run, epochs=1)


def test_cli_exit_status(finished_run, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["reproduce", str(finished_run)])
    assert ok.exit_code == 0, ok.output
    assert "identical" in ok.output
    run = copy_run(finished_run, tmp_path / "run")
    history = json.loads((run / "history.json").read_text())
    task = next(iter(history["epochs"][0]["train_loss"]))
    history["epochs"][0]["train_loss"][task] += 1e-6
    (run / "history.json").write_text(json.dumps(history))
    bad = runner.invoke(app, ["reproduce", str(finished_run), str(run)])
    assert bad.exit_code == 1 and "DIFFERS" in bad.output and "train_loss" in bad.output
    missing = runner.invoke(app, ["reproduce", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "history.json" in missing.output
