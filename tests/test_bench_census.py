"""benchmarks/census/halves.py: rescoring trained runs on other halves of the Census test file."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_halves_rescores_the_runs_test_half_exactly(data_dir, tmp_path):
    """The AUC halves.py computes on mtlrec's test half must be the run's own test AUC: same
    model, same rows. It would differ if the loader's halves and census_halves parted ways."""
    run = tmp_path / "runs" / "mmoe-seed1"
    subprocess.run(
        [sys.executable, "-m", "mtlrec.cli", "train", "--dataset", "census-income",
         "--model", "mmoe", "--epochs", "1", "--seed", "1", "--out", str(run),
         "--set", "train.progress=false"],
        check=True, capture_output=True,
    )  # fmt: skip
    halves = _load("census_halves_script", ROOT / "benchmarks" / "census" / "halves.py")
    out = tmp_path / "halves.json"
    halves.main(["--runs", str(tmp_path / "runs"), "--draws", "4", "--out", str(out)])
    data = json.loads(out.read_text())
    test = json.loads((run / "metrics.json").read_text())["test"]
    mmoe = data["models"]["mmoe"]
    assert mmoe["seeds"] == 1
    for task in ("income", "marital"):
        assert mmoe["named halves"]["mtlrec test half"][task] == pytest.approx(
            test[task]["auc"], abs=1e-9
        )
        spread = mmoe["random halves"][task]
        assert spread["min"] <= spread["mean"] <= spread["max"]
        assert 0.0 <= spread["share at or above bar"] <= 1.0
    # and the report renders the section from that file
    report = _load("census_run_script", ROOT / "benchmarks" / "census" / "run.py")
    report.HERE = tmp_path
    lines = report.split_sensitivity()
    assert any(line.startswith("| mmoe | never-married |") for line in lines)


def test_rerunning_some_models_keeps_the_other_rows():
    report = _load("census_run_script_merge", ROOT / "benchmarks" / "census" / "run.py")
    old = [
        {"model": "mmoe", "seed": 1.0, "income_auc": 0.1},
        {"model": "single-task", "seed": 1.0, "income_auc": 0.2},
        {"model": "mmoe", "seed": 2.0, "income_auc": 0.3},
    ]
    new = [{"model": "mmoe", "seed": 2, "income_auc": 0.9}]
    rows = report.merged(old, new)
    assert [(r["model"], int(r["seed"]), r["income_auc"]) for r in rows] == [
        ("single-task", 1, 0.2), ("mmoe", 1, 0.1), ("mmoe", 2, 0.9)
    ]  # fmt: skip
