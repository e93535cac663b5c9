"""The benchmark run helpers: reuse of finished runs, failure rows, fail-fast, job order."""

import json
import sys
import time
from pathlib import Path

from mtlrec.bench.runs import run_all, train_or_reuse


def _fake_train(out: Path, auc: float) -> list[str]:
    """A command that writes what ``mtlrec train`` writes, without training."""
    metrics = {"valid": {"a": {"auc": auc}}, "test": {"a": {"auc": auc - 0.01}}}
    history = {"epochs": [{"seconds": 2.0}, {"seconds": 4.0}], "best_epoch": 1, "parameters": 7}
    code = (
        f"import json, pathlib; p = pathlib.Path(r'{out}'); "
        f"(p / 'metrics.json').write_text(json.dumps({metrics!r})); "
        f"(p / 'history.json').write_text(json.dumps({history!r}))"
    )
    return [sys.executable, "-c", code]


def test_train_or_reuse_reads_the_run_and_reuses_it(tmp_path):
    out = tmp_path / "run"
    row = train_or_reuse(out, _fake_train(out, 0.8), {"model": "m"})
    assert row["status"] == "ok" and row["split"] == "test"
    assert row["auc"] == {"a": 0.8 - 0.01}
    assert (row["parameters"], row["epochs_run"], row["seconds_per_epoch"]) == (7, 2, 3.0)
    assert row["wall_seconds"] is not None
    # Finished: a second call does not run the (now failing) command and reads the same run.
    again = train_or_reuse(out, [sys.executable, "-c", "raise SystemExit(3)"], {"model": "m"})
    assert again["auc"] == row["auc"] and again["wall_seconds"] is None
    # --force retrains.
    forced = train_or_reuse(out, _fake_train(out, 0.6), {"model": "m"}, force=True)
    assert forced["auc"] == {"a": 0.6 - 0.01}


def test_a_failed_run_reports_its_exit_status_and_last_log_line(tmp_path):
    command = [sys.executable, "-c", "print('first'); print('bad option x'); raise SystemExit(2)"]
    row = train_or_reuse(tmp_path / "run", command, {"model": "m"})
    assert row["status"] == "failed (exit 2): bad option x"


def test_run_all_keeps_job_order_and_stops_when_everything_fails():
    rows = run_all([(3,), (1,), (2,)], lambda n: {"n": n, "status": "ok"}, parallel=2)
    assert [r["n"] for r in rows] == [3, 1, 2]
    calls: list[int] = []

    def failing(n: int) -> dict:
        calls.append(n)
        time.sleep(0.1)  # long enough for the loop to cancel the queued jobs
        return {"n": n, "status": "failed"}

    rows = run_all([(i,) for i in range(20)], failing, parallel=1)
    assert len(rows) == 2 and len(calls) < 20
    assert json.dumps(rows)  # rows stay JSON-serialisable for runs.json


def test_report_only_reads_finished_runs_and_trains_nothing(tmp_path):
    marker = tmp_path / "ran"
    command = [sys.executable, "-c", f"open(r'{marker}', 'w')"]
    row = train_or_reuse(tmp_path / "run", command, {"model": "m"}, train=False)
    assert row["status"] == "not run" and not marker.exists()


def test_rechub_columns_are_each_fields_own_index_and_the_same_numerics(small):
    """torch-rechub must see the very values mtlrec trains on: field-local categorical indices
    (global index minus the field's offset, inside the field's size) and identical numerics."""
    import numpy as np

    from mtlrec.bench.rechub import rechub_columns

    encoder, table = small
    layout = encoder.layout()
    columns = rechub_columns(layout, table)
    assert len(columns) == layout.num_categorical + layout.num_numeric
    for i in range(layout.num_categorical):
        local = columns[f"c{i}"]
        assert local.min() >= 0 and local.max() < layout.field_sizes[i]
        np.testing.assert_array_equal(local + layout.field_offsets[i], table.cat.numpy()[:, i])
    for i in range(layout.num_numeric):
        np.testing.assert_array_equal(columns[f"n{i}"], table.num.numpy()[:, i])


def test_the_printed_command_keeps_result_options_and_drops_paths_and_notes():
    from mtlrec.bench.runs import shown_arguments

    argv = [
        "--parallel", "2", "--results-dir", "/tmp/x", "--note", "a b", "--seeds", "1", "2",
        "--runs-dir=/tmp/r", "--report-only", "--note=c", "--epochs", "3",
    ]  # fmt: skip
    assert shown_arguments(argv) == ["--parallel", "2", "--seeds", "1", "2", "--epochs", "3"]


def test_train_command_is_one_quiet_resumable_single_thread_run_with_the_caps_last(tmp_path):
    from mtlrec.bench.runs import train_command

    cmd = train_command("movielens-100k", "dmt", 3, tmp_path / "r", 2, 500, ["--balance", "uw"])
    assert cmd[1:4] == ["-m", "mtlrec.cli", "train"]
    args = cmd[4:]
    assert args[:6] == ["--dataset", "movielens-100k", "--model", "dmt", "--seed", "3"]
    assert {"--quiet", "--resume"} <= set(args) and "train.threads=1" in args
    assert args[-6:] == ["--balance", "uw", "--epochs", "2", "--max-rows", "500"]
    assert "--epochs" not in train_command("d", "m", 1, tmp_path / "r")
