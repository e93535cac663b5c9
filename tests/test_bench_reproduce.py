"""benchmarks/reproduce/run.py: fingerprints every finished run, replays them (or, --quick, the
lowest seed of each configuration) from the committed file and reports which no longer match."""

import importlib.util
import json
from pathlib import Path

from tests.conftest import copy_run

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_records_every_seed_and_replays_them(finished_run, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "reproduce_benchmark", REPO / "benchmarks" / "reproduce" / "run.py"
    )
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    runs = tmp_path / "bench" / "runs"
    copy_run(finished_run, runs / "mmoe-seed1")
    copy_run(finished_run, runs / "mmoe-seed2")
    drifted = copy_run(finished_run, runs / "other-seed3")
    history = json.loads((drifted / "history.json").read_text())
    task = next(iter(history["epochs"][0]["train_loss"]))
    history["epochs"][0]["train_loss"][task] += 1e-6
    (drifted / "history.json").write_text(json.dumps(history))
    (runs / "unfinished_run-seed1").mkdir()

    prints_file, results = tmp_path / "fingerprints.json", tmp_path / "results"
    common = ["--benchmarks", "bench", "--fingerprints", str(prints_file)]
    assert reproduce.main([*common, "--record", "--runs-root", str(tmp_path)]) == 0
    prints = json.loads(prints_file.read_text())
    assert [p["run"] for p in prints] == ["mmoe-seed1", "mmoe-seed2", "other-seed3"]
    assert {p["epochs"] for p in prints} == {2}  # a first-epoch check once missed an epoch-2 drift
    assert reproduce.main([*common, "--parallel", "2", "--results-dir", str(results)]) == 0
    rows = {r["run"]: r for r in json.loads((results / "results.json").read_text())}
    assert rows["mmoe-seed1"]["status"] == rows["mmoe-seed2"]["status"] == "identical"
    assert rows["other-seed3"]["status"] == "training differs"
    markdown = (results / "RESULTS.md").read_text()
    assert "2 identical, 1 training differs" in markdown
    assert "for each of its first 2 epoch(s)" in markdown
    assert reproduce.main([*common, "--quick", "--results-dir", str(results)]) == 0
    quick = [r["run"] for r in json.loads((results / "results.json").read_text())]
    assert quick == ["mmoe-seed1", "other-seed3"]  # the lowest seed of each configuration
    # after re-running one run: replay just it and update its row, keeping the others
    assert (
        reproduce.main(
            [*common, "--runs", "bench/other-*", "--merge", "--results-dir", str(results)]
        )
        == 0
    )
    merged = {r["run"]: r["status"] for r in json.loads((results / "results.json").read_text())}
    assert merged == {"mmoe-seed1": "identical", "other-seed3": "training differs"}
