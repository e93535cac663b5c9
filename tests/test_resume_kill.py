"""A run killed with SIGKILL mid-epoch and resumed ends with the same metrics as one that was
never interrupted (same seed): model, optimizer, balancer, RNG and data order are restored."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import FUNNEL_SCHEMA, funnel_frame


@pytest.fixture
def command(tmp_path):
    funnel_frame(4000, seed=1).to_csv(tmp_path / "train.csv", index=False)
    funnel_frame(500, seed=2).to_csv(tmp_path / "valid.csv", index=False)
    funnel_frame(500, seed=3).to_csv(tmp_path / "test.csv", index=False)
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(FUNNEL_SCHEMA))

    def build(out, *extra):
        return [
            sys.executable, "-m", "mtlrec.cli", "train",
            "--train", str(tmp_path / "train.csv"), "--valid", str(tmp_path / "valid.csv"),
            "--test", str(tmp_path / "test.csv"), "--schema", str(tmp_path / "schema.yaml"),
            "--model", "mmoe", "--balance", "pcgrad", "--epochs", "4", "--seed", "3",
            "--set", "train.batch_size=32", "--set", "train.checkpoint_every=7",
            "--set", "train.threads=1", "--set", "train.patience=10", "--set", "model.dropout=0.1",
            "--out", str(out), "--quiet", *extra,
        ]  # fmt: skip

    return build


def test_sigkill_then_resume_matches_an_uninterrupted_run(command, tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(command(tmp_path / "straight"), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # let it get somewhere past the first checkpoint
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists(), "the run finished before it was killed"

    subprocess.run(command(killed, "--resume"), check=True, env=env, capture_output=True)
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed = json.loads((killed / "metrics.json").read_text())
    assert resumed == straight
    history = json.loads((killed / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3, 4]
