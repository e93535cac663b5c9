"""benchmarks/sequence/run.py: per-model aggregation, the constant baseline, the report."""

import argparse
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_sequence", ROOT / "benchmarks/sequence/run.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(model: str, seed: int, auc: float, mse: float) -> dict:
    return {
        "model": model,
        "seed": seed,
        "status": "ok",
        "split": "test",
        "parameters": 10,
        "epochs_run": 4,
        "seconds_per_epoch": 2.0,
        "metrics": {"like": {"auc": auc, "logloss": 0.6}, "rating": {"mse": mse}},
        "valid_like_auc": auc + 0.01,
    }


def test_aggregate_averages_every_metric_over_seeds_per_model():
    bench = _bench()
    runs = [_run("dmt", 1, 0.70, 1.1), _run("dmt", 2, 0.72, 1.3), _run("mmoe", 1, 0.69, 1.2)]
    runs.append({"model": "mose", "seed": 1, "status": "failed (exit 2): boom"})
    rows = {r["model"]: r for r in bench.aggregate(runs)}
    assert set(rows) == {"dmt", "mmoe"}
    assert rows["dmt"]["like_auc_mean"] == pytest.approx(0.71)
    assert rows["dmt"]["like_auc_std"] == pytest.approx(np.std([0.70, 0.72], ddof=1))
    assert rows["dmt"]["rating_mse_mean"] == pytest.approx(1.2)
    assert rows["dmt"]["seeds"] == [1, 2]
    assert rows["dmt"]["valid_like_auc_mean"] == pytest.approx(0.72)
    assert rows["mmoe"]["rating_mse_std"] is None  # one seed: no spread


def test_constant_baseline_is_the_training_rate_and_mean_scored_on_test(data_dir):
    from mtlrec.data.datasets import load_dataset

    bench = _bench()
    got = bench.constant_baseline(max_rows=2000)
    splits = load_dataset("movielens-100k", max_rows=2000)
    mean = splits.train["rating"].mean()
    assert got["rating_mse"] == pytest.approx(((splits.test["rating"] - mean) ** 2).mean())
    rate, like = splits.train["like"].mean(), splits.test["like"]
    expected = -(like * math.log(rate) + (1 - like) * math.log(1 - rate)).mean()
    assert got["like_logloss"] == pytest.approx(expected)


def test_report_ranks_models_and_lists_failures(tmp_path):
    bench = _bench()
    runs = [_run("mmoe", 1, 0.69, 1.2), _run("dmt", 1, 0.71, 1.1)]
    runs.append({"model": "mose", "seed": 1, "status": "failed (exit 2): boom"})
    args = argparse.Namespace(parallel=2, epochs=None, max_rows=None, note=["a note"])
    path = tmp_path / "RESULTS.md"
    bench.write_markdown(
        path, bench.aggregate(runs), runs, {"like_logloss": 0.69, "rating_mse": 1.3}, args
    )
    text = path.read_text()
    assert text.index("| dmt |") < text.index("| mmoe |")  # best like AUC first
    assert "| constant (training like rate, mean rating) | 0.5 | 0.6900 | 1.3000 | 0.5 |" in text
    assert "mose / seed 1: failed (exit 2): boom" in text and "- a note" in text
