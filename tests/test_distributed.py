"""Data parallelism: 2 ranks x batch B/2 follow the same trajectory as 1 process x batch B.

The torchrun tests start two real CPU processes (Gloo over loopback) running the unchanged
``mtlrec train`` command, and compare the weights and metrics with a single process. Plain SGD
makes the comparison tight: with Adam, a coordinate whose gradient is ~0 takes a step of size
``lr`` in the direction of its rounding noise, so float-summation differences between one and
two processes would be amplified far beyond the tolerance (the update is still the same).
The funnel fixture has a conversion task observed only on clicked rows, and the ranks see
different numbers of clicks, so the tight match also checks that the masked means are exact.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mtlrec.data.source import InMemorySource
from mtlrec.errors import ConfigError
from mtlrec.train import distributed as dist
from mtlrec.train.run import train_run
from tests.conftest import FUNNEL_SCHEMA, REPO, files_dataset, funnel_frame


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path: Path, train_rows: int, balance: str) -> Path:
    frames = {"train": funnel_frame(train_rows, seed=1), "valid": funnel_frame(401, seed=2)}
    frames["test"] = funnel_frame(301, seed=3)
    config = {
        "dataset": files_dataset(tmp_path, frames, FUNNEL_SCHEMA),
        "model": {"name": "mmoe", "embed_dim": 4, "dropout": 0.0, "num_experts": 3},
        "train": {
            "epochs": 2,
            "batch_size": 200,
            "optimizer": "sgd",
            "lr": 0.5,
            "patience": 10,
            "threads": 1,
            "progress": False,
            "seed": 7,
        },
        "balance": {"name": balance},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _torchrun(config: Path, out: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "mtlrec.cli", "train", "--config", str(config), "--out", str(out), "--quiet",
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def _compare_runs(single: Path, multi: Path, atol: float) -> None:
    a = torch.load(single / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(multi / "model.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=atol, rtol=1e-5, msg=key)
    ma = json.loads((single / "metrics.json").read_text())
    mb = json.loads((multi / "metrics.json").read_text())
    for split in ("valid", "test"):
        for task, values in ma[split].items():
            for name, value in values.items():
                # AUC counts ordered pairs: scores of ~300 rows from a barely trained model hold
                # near-ties that float rounding (per-rank GEMM sizes) may order either way, and
                # one pair that ties or flips moves the AUC by 2.5e-5 to 5e-5. A wrong shard or
                # gather moves it by far more; log loss and MSE have no ties and stay at 1e-5.
                tol = 1e-4 if name == "auc" else 1e-5
                assert mb[split][task][name] == pytest.approx(value, abs=tol), (split, task, name)
    ha = json.loads((single / "history.json").read_text())["epochs"]
    hb = json.loads((multi / "history.json").read_text())["epochs"]
    for ea, eb in zip(ha, hb, strict=True):
        for task, loss in ea["train_loss"].items():
            assert eb["train_loss"][task] == pytest.approx(loss, rel=1e-5), task


@pytest.mark.parametrize(
    ("balance", "train_rows"),
    [
        ("ew", 1201),  # the last global batch has 1 row: rank 1's part is empty
        ("pcgrad", 1203),  # last batch of 3 rows split 2 + 1
    ],
)
def test_two_ranks_match_one_process(tmp_path, balance, train_rows):
    config = _config(tmp_path, train_rows, balance)
    proc = _torchrun(config, tmp_path / "multi")
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = yaml.safe_load(config.read_text())
    train_run(single, tmp_path / "single", echo=lambda *_: None)
    _compare_runs(tmp_path / "single", tmp_path / "multi", atol=1e-6)
    # rank 0 alone wrote the run directory; nothing half-written was left behind
    names = sorted(p.name for p in (tmp_path / "multi").iterdir())
    assert names == sorted(
        [
            "checkpoint.pt",
            "config.yaml",
            "encoder.json",
            "history.json",
            "metrics.json",
            "model.pt",
            "schema.json",
        ]
    )


def test_global_batch_must_split_evenly():
    assert dist.local_batch_size(256, 2) == 128
    with pytest.raises(ConfigError, match="global batch.*divisible by the number of processes"):
        dist.local_batch_size(255, 2)


def test_shards_of_each_global_batch_cover_the_single_process_batch(funnel_tables):
    _, train, _ = funnel_tables
    table = train.head(1001)
    single = [
        b.labels
        for b in InMemorySource(table).epoch_batches(0, 200, torch.Generator().manual_seed(3))
    ]
    parts = [
        list(InMemorySource(table, r, 2).epoch_batches(0, 200, torch.Generator().manual_seed(3)))
        for r in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == len(single) == 6
    for k, whole in enumerate(single):
        joined = torch.cat([parts[0][k].labels, parts[1][k].labels])
        assert torch.equal(joined, whole)
    assert [len(b) for b in parts[1]] == [100] * 5 + [0]  # the last batch (1 row) went to rank 0


def test_single_process_helpers_are_no_ops():
    assert not dist.active() and dist.world() == 1 and dist.is_main()
    x = torch.arange(5.0)
    assert dist.all_gather_tensor(x) is x
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    assert dist.main_then_broadcast(lambda: 3) == 3
    assert dist.shard_bounds(5, 0, 2) == (0, 3) and dist.shard_bounds(5, 1, 2) == (3, 5)


def test_streamed_parquet_trains_on_two_ranks(tmp_path):
    """--stream under torchrun: row groups dealt unevenly (8 + 7 of 100 rows), so one rank ends
    its epoch with empty steps; every step still runs on both ranks and the run completes."""
    config = _config(tmp_path, 1500, "ew")
    frame = funnel_frame(1500, seed=1)
    frame.to_parquet(tmp_path / "train.parquet", row_group_size=100, index=False)
    resolved = yaml.safe_load(config.read_text())
    resolved["dataset"]["train"] = str(tmp_path / "train.parquet")
    resolved["train"].update(
        {"stream": True, "shuffle_buffer": 300, "batch_size": 128, "optimizer": "adam", "lr": 0.02}
    )
    config.write_text(yaml.safe_dump(resolved))
    proc = _torchrun(config, tmp_path / "multi")
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((tmp_path / "multi" / "metrics.json").read_text())
    assert metrics["test"]["click"]["rows"] == 301
    assert metrics["valid"]["click"]["auc"] > 0.65  # it learned
    history = json.loads((tmp_path / "multi" / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]


def test_stream_needs_a_parquet_training_split(tmp_path):
    config = yaml.safe_load(_config(tmp_path, 300, "ew").read_text())
    config["train"]["stream"] = True
    with pytest.raises(ConfigError, match="train.stream: streaming reads a Parquet"):
        train_run(config, tmp_path / "run", echo=lambda *_: None)
