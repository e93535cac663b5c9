"""`mtlrec sweep`: the plan, the statistics by hand, and a real sweep of training processes."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import yaml
from typer.testing import CliRunner

from mtlrec.cli import app
from mtlrec.errors import ConfigError
from mtlrec.train.sweep import markdown, plan, run_warnings, summarise
from tests.conftest import FUNNEL_SCHEMA, files_dataset, funnel_frame

runner = CliRunner()


def _fake_run(folder, valid_auc: dict, test_auc: dict, monitor: str = "auc") -> None:
    folder.mkdir(parents=True)
    metrics = {
        "valid": {t: {"auc": v, "logloss": 0.5} for t, v in valid_auc.items()},
        "test": {t: {"auc": v, "logloss": 0.5} for t, v in test_auc.items()},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "history.json").write_text(json.dumps({"epochs": [{}, {}, {}]}))
    (folder / "config.yaml").write_text(yaml.safe_dump({"train": {"monitor": monitor}}))


def test_ranking_is_on_validation_and_differences_are_paired_by_seed(tmp_path):
    jobs = plan(tmp_path, ["a", "b"], ["ew"], [1, 2, 3])
    # b is better on validation but worse on test: the ranking must follow validation
    valid = {"a": [0.70, 0.71, 0.72], "b": [0.80, 0.79, 0.81]}
    test = {"a": [0.60, 0.62, 0.64], "b": [0.59, 0.60, 0.65]}
    statuses = []
    for job in jobs:
        i = job.seed - 1
        v, t = valid[job.model][i], test[job.model][i]
        _fake_run(job.out, {"x": v, "y": None}, {"x": t, "y": 0.9})  # y: AUC undefined on valid
        statuses.append({"status": "ok"})
    summary = summarise(jobs, statuses)
    first, second = summary["configurations"]
    assert [first["config"], second["config"]] == ["b + ew", "a + ew"]
    assert summary["reference"] == "a + ew"
    assert first["valid_score"]["mean"] == pytest.approx(0.80)
    assert first["valid_score"]["std"] == pytest.approx(statistics.stdev([0.80, 0.79, 0.81]))
    diffs = [0.59 - 0.60, 0.60 - 0.62, 0.65 - 0.64]
    paired = first["test"]["x"]["vs_reference"]
    assert paired["n"] == 3 and paired["mean"] == pytest.approx(statistics.fmean(diffs))
    assert paired["se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(3))
    assert "vs_reference" not in second["test"]["x"]
    text = markdown(summary, "mtlrec sweep ...")
    assert "| 1 | b + ew | 3 | 0.8000 ± 0.0100 | 0.6133 ± 0.0321 | 0.9000 ± 0.0000 | 3.0 |" in text
    assert "| b + ew | -0.0067 ± 0.0088 (n=3) | +0.0000 ± 0.0000 (n=3) |" in text


def test_rank_by_one_task_uses_that_tasks_validation_metric(tmp_path):
    jobs = plan(tmp_path, ["a", "b"], ["ew"], [1])
    _fake_run(jobs[0].out, {"x": 0.70, "y": 0.90}, {"x": 0.6, "y": 0.9})  # better on y
    _fake_run(jobs[1].out, {"x": 0.85, "y": 0.80}, {"x": 0.6, "y": 0.9})  # better on x and mean
    ok = [{"status": "ok"}] * 2
    assert [r["config"] for r in summarise(jobs, ok)["configurations"]] == ["b + ew", "a + ew"]
    by_y = summarise(jobs, ok, rank_by="y")
    assert [r["config"] for r in by_y["configurations"]] == ["a + ew", "b + ew"]
    assert "validation AUC of task `y`" in markdown(by_y, "cmd")
    with pytest.raises(ConfigError, match="--rank-by 'z' is not a task .* its tasks are x, y"):
        summarise(jobs, ok, rank_by="z")


def test_failed_runs_are_listed_and_left_out_of_the_means(tmp_path):
    jobs = plan(tmp_path, ["a"], ["ew"], [1, 2])
    _fake_run(jobs[0].out, {"x": 0.7}, {"x": 0.6})
    summary = summarise(jobs, [{"status": "ok"}, {"status": "failed (exit 2): error: boom"}])
    row = summary["configurations"][0]
    assert row["seeds_ok"] == [1] and row["seeds_failed"] == [2]
    assert row["valid_score"] == {"mean": 0.7, "std": None}
    assert summary["failed"] == [
        {"run": str(jobs[1].out), "status": "failed (exit 2): error: boom"}
    ]
    assert "error: boom" in markdown(summary, "cmd")


def test_markdown_tables_stay_well_formed_when_every_run_failed(tmp_path):
    jobs = plan(tmp_path, ["a", "b"], ["ew"], [1])
    failed = {"status": "failed (exit 2): error: loss is nan"}
    text = markdown(summarise(jobs, [failed, failed]), "cmd")
    for table in [block for block in text.split("\n\n") if block.startswith("|")]:
        widths = {line.count("|") for line in table.splitlines()}
        assert len(widths) == 1, table  # header, separator and rows: the same column count
    assert "|  |" not in text and "Paired" not in text


def test_plan_rejects_repeats_and_empty_lists(tmp_path):
    with pytest.raises(ConfigError, match="--seeds lists 1 twice"):
        plan(tmp_path, ["a"], ["ew"], [1, 1])
    with pytest.raises(ConfigError, match="at least one"):
        plan(tmp_path, [], ["ew"], [1])
    folders = [j.out.relative_to(tmp_path).as_posix() for j in plan(tmp_path, ["m"], ["uw"], [7])]
    assert folders == ["m--uw/seed-7"]


def test_cli_sweep_trains_ranks_and_reuses(tmp_path):
    frames = {
        "train": funnel_frame(600, 1),
        "valid": funnel_frame(300, 2),
        "test": funnel_frame(300, 3),
    }
    files_dataset(tmp_path / "data", frames, FUNNEL_SCHEMA)
    data = [
        *("--train", str(tmp_path / "data" / "train.csv")),
        *("--valid", str(tmp_path / "data" / "valid.csv")),
        *("--test", str(tmp_path / "data" / "test.csv")),
        *("--schema", str(tmp_path / "data" / "schema.yaml")),
    ]
    out = tmp_path / "sweep"
    args = ["sweep", "--out", str(out), "--models", "shared-bottom,mmoe", "--seeds", "1,2"]
    args += ["--epochs", "1", "--parallel", "2", "--set", "model.embed_dim=4", *data]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "sweep.json").read_text())
    runs = sorted(p.parent.relative_to(out).as_posix() for p in out.glob("*/*/metrics.json"))
    assert runs == [
        "mmoe--fixed/seed-1",
        "mmoe--fixed/seed-2",
        "shared-bottom--fixed/seed-1",
        "shared-bottom--fixed/seed-2",
    ]
    for row in summary["configurations"]:  # the table reads each run's own metrics.json
        for seed in (1, 2):
            folder = out / f"{row['model']}--fixed" / f"seed-{seed}"
            saved = json.loads((folder / "metrics.json").read_text())["test"]["click"]["auc"]
            assert row["test"]["click"]["per_seed"][str(seed)] == pytest.approx(saved)
    assert (out / "SWEEP.md").read_text().startswith("# Sweep")
    assert (out / "SWEEP.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = (out / "mmoe--fixed" / "seed-1" / "train.log").stat().st_mtime_ns
    assert runner.invoke(app, args).exit_code == 0  # finished runs are read back, not retrained
    assert (out / "mmoe--fixed" / "seed-1" / "train.log").stat().st_mtime_ns == stamp
    for change in (["--set", "train.lr=0.01"], ["--epochs", "2"]):  # not these runs' results
        result = runner.invoke(app, [*args, *change])
        assert result.exit_code == 2 and "trained with another configuration" in result.output


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--models", "mmoe,nope"], "unknown model 'nope'"),
        (["--models", "mmoe", "--balancers", "pcgrd"], "unknown balancer(s) pcgrd"),
        (["--models", "mmoe", "--seeds", "1,x"], "expected comma-separated integers"),
        (["--models", "mmoe", "--set", "model.dropout=2"], "model.dropout must be in [0, 1)"),
        (["--models", "mmoe", "--set", "train.lr=-1"], "train.lr must be > 0"),
        (["--models", ""], "--models '': name at least one model"),
        (
            ["--models", "mmoe", "--balancers", "ew,pcgrad", "--set", "train.compile=true"],
            "train.compile: balancer 'pcgrad' takes one gradient per task",
        ),
    ],
)
def test_cli_sweep_checks_everything_before_training(tmp_path, extra, needle):
    result = runner.invoke(
        app, ["sweep", "--out", str(tmp_path / "s"), "--dataset", "adult", *extra]
    )
    assert result.exit_code == 2 and needle in result.output
    assert not (tmp_path / "s").exists()


def test_cli_sweep_checks_the_schema_before_training(tmp_path):
    frames = {"train": funnel_frame(100, 1), "valid": funnel_frame(50, 2)}
    schema = {
        **FUNNEL_SCHEMA,
        "tasks": [{"name": "click"}, {"name": "purchase", "depends_on": "clik"}],
    }
    files_dataset(tmp_path / "data", frames, schema)
    args = ["sweep", "--out", str(tmp_path / "s"), "--models", "mmoe", "--seeds", "1"]
    args += ["--train", str(tmp_path / "data" / "train.csv")]
    args += ["--valid", str(tmp_path / "data" / "valid.csv")]
    args += ["--schema", str(tmp_path / "data" / "schema.yaml")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "'clik'" in result.output, result.output
    assert not (tmp_path / "s").exists()
    files_dataset(tmp_path / "data", frames, FUNNEL_SCHEMA)
    result = runner.invoke(app, [*args, "--rank-by", "purchse"])
    assert result.exit_code == 2 and "--rank-by 'purchse' is not a task" in result.output
    assert not (tmp_path / "s").exists()


def test_run_warnings_are_read_once_from_the_logs(tmp_path):
    jobs = plan(tmp_path, ["mmoe", "ple"], ["ew"], [1])
    for job in jobs:
        job.out.mkdir(parents=True)
        (job.out / "train.log").write_text("epoch 1\nwarning: x: column 'u': 100% unseen\ndone\n")
    assert run_warnings(jobs) == ["warning: x: column 'u': 100% unseen"]
