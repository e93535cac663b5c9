"""Export parity (TorchScript, ONNX under onnxruntime), the scoring app, a real server process."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("fastapi", reason="serving extras not installed: pip install 'mtlrec[serve]'")
pytest.importorskip("onnxruntime", reason="serving extras not installed")
httpx = pytest.importorskip("httpx", reason="serving extras not installed")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's deprecation note about its httpx client
    from fastapi.testclient import TestClient

from mtlrec.errors import MTLRecError  # noqa: E402
from mtlrec.serve.app import create_app  # noqa: E402
from mtlrec.serve.export import export_run  # noqa: E402
from mtlrec.serve.predictor import load_predictor  # noqa: E402
from mtlrec.train.run import load_run, load_splits  # noqa: E402
from tests.serve_fixtures import adult_run, free_port, funnel_frame, funnel_run  # noqa: E402

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trained runs by key, made on first use: adult-mmoe, adult-ple (need MTLREC_DATA_DIR),
    funnel-esmm, funnel-aitm and funnel-mmoe-cat (categorical features only)."""
    made: dict[str, object] = {}

    def get(key: str):
        if key not in made:
            out = tmp_path_factory.mktemp(key)
            kind, model, *rest = key.split("-")
            if kind == "adult":
                made[key] = adult_run(out / "run", model)
            else:
                kinds = ("user", "item") if rest == ["cat"] else ("user", "item", "price", "tags")
                made[key] = funnel_run(out, model, kinds)
        return made[key]

    return get


def _test_batch(run):
    """A real batch: the run's own test split (adult) or fresh funnel rows, encoded."""
    config, encoder, model = load_run(run)
    if config["dataset"]["name"] == "adult":
        frame = load_splits(config).test.head(300)
    else:
        frame = funnel_frame(300, seed=3)
    return encoder.transform(frame, labels=False), model


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize(
    "key", ["adult-mmoe", "adult-ple", "funnel-esmm", "funnel-aitm", "funnel-mmoe-cat"]
)
def test_export_matches_the_eager_model(key, fmt, runs, tmp_path):
    run = runs(key)
    out = export_run(run, fmt, tmp_path / "export")
    names = {p.name for p in out.iterdir()}
    model_file = "model.ts" if fmt == "torchscript" else "model.onnx"
    assert {model_file, "encoder.json", "schema.json", "fusion.yaml", "metadata.json"} <= names
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["format"] == fmt and meta["parity"]["max_abs_diff"] <= TOLERANCE
    assert [t["name"] for t in meta["tasks"]] == load_run(run)[1].schema.task_names

    table, model = _test_batch(run)
    with torch.no_grad():
        want = [t.numpy() for t in model.predict(model(table))]
    predictor = load_predictor(out)
    assert predictor.source == fmt
    for rows in (len(table), 1):  # dynamic batch axis, traced with 4 rows
        got = predictor.predict(table.head(rows))
        for g, w in zip(got, want):
            assert g.shape == (rows, model.num_tasks)
            assert np.abs(g - w[:rows]).max() <= TOLERANCE
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(out / model_file), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [i["name"] for i in meta["inputs"]]
        if key.startswith("adult") or key.endswith("cat"):
            assert "seq" not in {i["name"] for i in meta["inputs"]}  # zero-width, pruned
    if key.endswith("cat"):
        assert table.seq.shape[1] == 0 and table.num.shape[1] == 0


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_damaged_export_graph_is_named(fmt, runs, tmp_path):
    """A truncated graph file was a torch / onnxruntime traceback in predict and serve."""
    out = export_run(runs("adult-mmoe"), fmt, tmp_path / "export")
    graph = out / ("model.ts" if fmt == "torchscript" else "model.onnx")
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    with pytest.raises(MTLRecError, match=f"{graph.name}: cannot load the"):
        load_predictor(out)


def test_export_cli(runs, tmp_path):
    from typer.testing import CliRunner

    from mtlrec.cli import app

    run = runs("funnel-esmm")
    fusion = tmp_path / "fusion.yaml"
    fusion.write_text("serve:\n  kind: weighted_sum\n  weights: {purchase: 3}\n")
    cli = CliRunner()
    result = cli.invoke(
        app,
        [
            "export",
            str(run),
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "x"),
            "--fusion",
            str(fusion),
        ],
    )
    assert result.exit_code == 0, result.output
    shipped = yaml.safe_load((tmp_path / "x" / "fusion.yaml").read_text())["serve"]
    assert shipped["kind"] == "weighted_sum" and shipped["weights"]["purchase"] == 3
    result = cli.invoke(app, ["export", str(run), "--format", "tflite"])
    assert (
        result.exit_code == 2
        and "--format 'tflite' is not one of torchscript, onnx" in result.output
    )
    result = cli.invoke(app, ["export", str(tmp_path), "--format", "onnx"])
    assert result.exit_code == 2 and "not a finished run directory" in result.output
    with pytest.raises(MTLRecError, match="must not be the run directory"):
        export_run(run, "onnx", run)


# --- the app through TestClient --------------------------------------------------------------
@pytest.fixture(scope="module")
def funnel_app(runs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fusion")
    fusion = folder / "fusion.yaml"
    fusion.write_text(
        "serve:\n  weights: {click: 1.0, purchase: 0.5}\n  weight_bounds: {purchase: [0, 2]}\n"
        "  max_candidates: 5\n  max_body_bytes: 20000\n"
    )
    run = runs("funnel-esmm")
    return run, TestClient(create_app(run, fusion))


def _score(client, candidates, **extra):
    return client.post("/score", json={"candidates": candidates, **extra})


def test_health_and_metadata(funnel_app):
    _, client = funnel_app
    assert client.get("/health").json()["status"] == "ok"
    meta = client.get("/metadata").json()
    assert meta["model"] == "esmm" and meta["source"] == "run"
    assert [t["name"] for t in meta["tasks"]] == ["click", "purchase"]
    assert meta["tasks"][1]["depends_on"] == "click"
    assert meta["fusion"]["formula"] == "click ** 1 * purchase ** 0.5"
    assert meta["max_candidates"] == 5 and meta["mtlrec_version"]
    assert {f["name"]: f["kind"] for f in meta["fields"]} == {
        "user": "categorical",
        "item": "categorical",
        "price": "numeric",
        "tags": "sequence",
    }
    assert meta["schema"]["tasks"][0]["name"] == "click"


def test_score_matches_the_model_and_fuses(funnel_app):
    run, client = funnel_app
    candidates = [
        {"user": "u1", "item": "i3", "price": 0.5, "tags": ["t0", "t2"]},
        {"user": "u2", "item": "i7", "price": -1, "tags": "t1|t3"},
        {"user": "u0", "tags": []},
    ]
    r = _score(client, candidates)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tasks"] == ["click", "purchase"] and len(body["scores"]) == 3
    _, encoder, model = load_run(run)
    frame = funnel_frame(3, seed=0).drop(columns=["click", "purchase"])
    frame[:] = [["u1", "i3", "0.5", "t0|t2"], ["u2", "i7", "-1", "t1|t3"], ["u0", "", "", ""]]
    table = encoder.transform(frame, labels=False)
    with torch.no_grad():
        cond, joint = (t.numpy() for t in model.predict(model(table)))
    for i, s in enumerate(body["scores"]):
        p = s["probabilities"]
        assert abs(p["click"] - cond[i, 0]) < 1e-6 and abs(p["purchase"] - cond[i, 1]) < 1e-6
        assert abs(s["joint"]["purchase"] - joint[i, 1]) < 1e-6
        assert math.isclose(s["score"], p["click"] * p["purchase"] ** 0.5, rel_tol=1e-6)
    # a request may re-weight within the bounds
    r = _score(client, candidates[:1], weights={"purchase": 2})
    s = r.json()["scores"][0]
    assert r.json()["fusion"] == "click ** 1 * purchase ** 2"
    assert math.isclose(
        s["score"], s["probabilities"]["click"] * s["probabilities"]["purchase"] ** 2, rel_tol=1e-6
    )
    assert _score(client, []).json()["scores"] == []


def test_missing_and_unseen_values(funnel_app):
    run, client = funnel_app
    _, encoder, _ = load_run(run)
    mean = encoder.state["price"]["mean"]
    scores = _score(
        client,
        [
            {"user": "u1", "item": "never-seen", "price": None},
            {"user": "u1", "price": mean},  # item missing -> OOV, same as unseen
            {"user": "u1", "item": "i3"},
            {"user": "u1", "item": "i3", "price": mean, "tags": None},  # price absent -> mean
        ],
    ).json()["scores"]
    same = [(0, 1), (2, 3)]
    for a, b in same:
        assert scores[a]["score"] == pytest.approx(scores[b]["score"], abs=1e-7)
        assert scores[a]["probabilities"] == pytest.approx(scores[b]["probabilities"], abs=1e-7)
    assert scores[0]["score"] != pytest.approx(scores[2]["score"], abs=1e-7)


def test_a_candidate_scores_as_the_same_row_of_a_file(tmp_path):
    """Offline (``predict_frame``, as ``mtlrec predict`` reads a CSV) and online scores agree for
    empty cells sent as null: a vocabulary holding the empty string, a hashed feature, and a
    column read both as a number and as a category, whose text the client sends as a string."""
    import pandas as pd

    from mtlrec.config import resolve
    from mtlrec.train.predict_file import predict_frame
    from mtlrec.train.run import train_run

    rng = np.random.default_rng(0)
    frames = []
    for n, seed in ((600, 1), (200, 2)):
        frame = funnel_frame(n, seed)
        frame.loc[rng.random(n) < 0.3, "user"] = ""
        frame.loc[rng.random(n) < 0.3, "item"] = ""
        frame["price"] = [f"{float(p):.1f}" if p else "" for p in frame["price"]]
        frames.append(frame)
    frames[0].to_csv(tmp_path / "train.csv", index=False)
    frames[1].to_csv(tmp_path / "valid.csv", index=False)
    schema = {
        "features": [
            {"name": "user"},
            {"name": "item", "hash_buckets": 16},
            {"name": "price", "type": "numeric"},
            {"name": "price_band", "column": "price"},
        ],
        "tasks": [{"name": "click"}, {"name": "purchase", "depends_on": "click"}],
    }
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(schema))
    files = {
        k: str(tmp_path / f"{k}.{'yaml' if k == 'schema' else 'csv'}")
        for k in ("train", "valid", "schema")
    }
    config = resolve(
        {
            "dataset": {"name": "files", **files},
            "model": {"name": "mmoe"},
            "train": {"epochs": 2, "batch_size": 64, "progress": False},
        }
    )
    run = tmp_path / "run"
    train_run(config, run, echo=lambda *_: None)
    _, encoder, model = load_run(run)
    assert "" in encoder.state["user"]["vocab"] and "1.0" in encoder.state["price_band"]["vocab"]
    rows = frames[1].head(60)
    offline = predict_frame(model, encoder, rows.reset_index(drop=True))
    candidates = [
        {k: (v or None) for k, v in row.items() if k in ("user", "item", "price")}
        for row in rows.to_dict("records")
    ]
    assert sum(c["user"] is None for c in candidates) > 5
    online = TestClient(create_app(run)).post("/score", json={"candidates": candidates})
    assert online.status_code == 200, online.text
    got = pd.DataFrame([s["probabilities"] for s in online.json()["scores"]])
    np.testing.assert_allclose(got["click"], offline["pred_click"], rtol=1e-6)
    np.testing.assert_allclose(got["purchase"], offline["pred_purchase"], rtol=1e-6)
    bad = TestClient(create_app(run)).post("/score", json={"candidates": [{"price": "cheap"}]})
    assert (
        bad.status_code == 422
        and "candidates[0].price: str 'cheap' is not a finite number" in bad.text
    )


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        (
            {"candidates": [{"user": "u1"}, {"price": "abc"}]},
            "candidates[1].price: expected a number",
        ),
        (
            {"candidates": [{"price": float("nan")}]},
            "candidates[0].price: nan is not a finite number",
        ),
        (
            {"candidates": [{}, {}, {"price": float("inf")}]},
            "candidates[2].price: inf is not a finite",
        ),
        ({"candidates": [{"price": True}]}, "candidates[0].price: expected a number, got bool"),
        ({"candidates": [{"user": 1.5}]}, "candidates[0].user: expected a string or an integer"),
        ({"candidates": [{"user": {"a": 1}}]}, "candidates[0].user: expected a string"),
        ({"candidates": [{}, {"tags": [1, [2]]}]}, "candidates[1].tags: item 1: expected a string"),
        ({"candidates": [{"tags": ["a|b"]}]}, "candidates[0].tags: item 0 contains the separator"),
        ({"candidates": [{"tags": 3}]}, "candidates[0].tags: expected a list or a string"),
        ({"candidates": [{"usr": "u1"}]}, "candidates[0].usr: unknown field"),
        ({"candidates": [{"click": 1}]}, "candidates[0].click: unknown field"),
        ({"candidates": [{}, 7]}, "candidates[1]: Input should be a valid dictionary"),
        ({"candidates": "u1"}, "candidates: Input should be a valid list"),
        ({}, "candidates: Field required"),
        ({"candidates": [], "extra": 1}, "extra: Extra inputs are not permitted"),
        ({"candidates": [{}] * 6}, "candidates: 6 candidates exceed the limit of 5"),
        (
            {"candidates": [], "weights": {"purchase": 3}},
            "weights.purchase: 3.0 is outside the allowed range [0, 2]",
        ),
        ({"candidates": [], "weights": {"clicks": 1}}, "weights.clicks: unknown task"),
        (
            {"candidates": [], "weights": {"click": "1"}},
            "weights.click: Input should be a valid number",
        ),
        (
            {"candidates": [], "weights": {"click": float("nan")}},
            "weights.click: Input should be a finite number",
        ),
        ({"candidates": [], "weights": [1]}, "weights: Input should be a valid dictionary"),
    ],
)
def test_bad_requests_name_the_candidate_and_field(funnel_app, payload, where):
    _, client = funnel_app
    r = client.post(
        "/score", content=json.dumps(payload), headers={"content-type": "application/json"}
    )
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["detail"].startswith(where), body["detail"]
    assert body["errors"] and body["errors"][0]["loc"] == where.split(":")[0]


def test_all_problems_are_listed(funnel_app):
    _, client = funnel_app
    r = _score(client, [{"price": "x"}, {"user": 2.5, "bad": 1}])
    errors = r.json()["errors"]
    assert r.status_code == 422 and r.json()["detail"].endswith("(and 2 more)")
    assert {(e["candidate"], e["field"]) for e in errors} == {(0, "price"), (1, "user"), (1, "bad")}


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"{", 422),
        (b"[1, 2]", 422),
        (b"null", 422),
        (b'{"candidates": [{"price": NaN}]}', 422),
        (b'{"candidates": [{"price": -Infinity}]}', 422),
        (b'{"candidates": [{"price": 1' + b"0" * 400 + b"}]}", 422),
        (b'{"candidates": [{"user": 1' + b"0" * 5000 + b"}]}", 400),
        (b'{"candidates": [' + b"[" * 5000 + b"]" * 5000 + b"]}", 400),
        (bytes([255, 254, 0]), 400),
        (b'{"candidates": [' + b'{"user": "u1"},' * 2000 + b"{}]}", 413),
    ],
)
def test_malformed_bodies_are_4xx(funnel_app, raw, status):
    _, client = funnel_app
    r = client.post("/score", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["detail"] and r.json()["errors"][0]["loc"]  # one shape for every 4xx
    assert client.get("/health").status_code == 200


def test_expression_fusion_required_fields_and_joint(runs, tmp_path):
    run = runs("funnel-esmm")
    fusion = tmp_path / "fusion.yaml"
    fusion.write_text(
        "serve:\n  kind: expression\n  expression: 'click + 2 * log(purchase)'\n"
        "  probabilities: joint\n  required_fields: [user]\n"
    )
    client = TestClient(create_app(run, fusion))
    r = _score(client, [{"user": "u1", "item": "i1"}])
    s = r.json()["scores"][0]
    assert math.isclose(
        s["score"], s["joint"]["click"] + 2 * math.log(s["joint"]["purchase"]), rel_tol=1e-6
    )
    r = _score(client, [{"user": "u1"}, {"item": "i1"}, {"user": None}])
    assert r.status_code == 422
    assert r.json()["detail"].startswith("candidates[1].user: required field is missing")
    assert [e["candidate"] for e in r.json()["errors"]] == [1, 2]
    r = _score(client, [{"user": "u1"}], weights={"click": 1})
    assert r.status_code == 422 and r.json()["detail"].startswith("weights: ")


def test_app_serves_an_export_folder(runs, tmp_path):
    run = runs("funnel-aitm")
    candidates = [{"user": "u3", "item": "i1", "price": 1.0, "tags": ["t0"]}, {"item": "i9"}]
    want = _score(TestClient(create_app(run)), candidates).json()["scores"]
    for fmt in ("torchscript", "onnx"):
        out = export_run(run, fmt, tmp_path / fmt)
        client = TestClient(create_app(out))
        assert client.get("/metadata").json()["source"] == fmt
        got = _score(client, candidates).json()["scores"]
        for g, w in zip(got, want):
            assert g["score"] == pytest.approx(w["score"], abs=1e-5)
            assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)


def test_load_errors_are_mtlrec_errors(tmp_path):
    with pytest.raises(MTLRecError, match="not a directory"):
        create_app(tmp_path / "nope")
    with pytest.raises(MTLRecError, match="not a finished run directory"):
        create_app(tmp_path)
    (tmp_path / "metadata.json").write_text("{}")
    with pytest.raises(MTLRecError, match="not an mtlrec export"):
        create_app(tmp_path)


# --- a real server process ---------------------------------------------------------------------
def test_real_server_process(runs, tmp_path):
    run = runs("funnel-esmm")
    port = free_port()
    fusion = tmp_path / "fusion.yaml"
    fusion.write_text("serve:\n  max_body_bytes: 100000\n")
    log = (tmp_path / "server.log").open("w")
    cmd = [sys.executable, "-m", "mtlrec.cli", "serve", str(run), "--port", str(port)]
    cmd += ["--fusion", str(fusion)]
    proc = subprocess.Popen(cmd + ["--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not come up in 90 s"
                time.sleep(0.2)
            r = client.post("/score", json={"candidates": [{"user": "u1", "price": 0.3}, {}]})
            assert r.status_code == 200 and len(r.json()["scores"]) == 2
            bad = [
                b"{",
                b'{"candidates": [{"price": NaN}]}',
                b'{"candidates": [{"price": "x"}], "weights": {"click": 99}}',
                b'{"candidates": [{"nope": 1}]}',
                b'{"candidates": [' + b"[" * 5000 + b"]" * 5000 + b"]}",
                b'{"candidates": [' + b"{}," * 1200 + b"{}]}",
                bytes([255, 254]),
                b'{"candidates": ["' + b"x" * 300_000 + b'"]}',  # 413, drained, kept alive
            ]
            for raw in bad:
                r = client.post("/score", content=raw, headers={"content-type": "application/json"})
                assert 400 <= r.status_code < 500, (raw[:40], r.status_code, r.text)
            assert (
                client.post(
                    "/score", content=b"x", headers={"content-type": "text/plain"}
                ).status_code
                == 422
            )
            assert client.get("/nope").status_code == 404
            assert client.get("/health").json()["status"] == "ok"
            assert client.post("/score", json={"candidates": [{}]}).status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_serve_cli_errors_are_one_line(runs, tmp_path):
    from typer.testing import CliRunner

    from mtlrec.cli import app

    cli = CliRunner()
    result = cli.invoke(app, ["serve", str(tmp_path)])
    assert result.exit_code == 2 and "not a finished run directory" in result.output
    fusion = tmp_path / "fusion.yaml"
    fusion.write_text("serve:\n  kind: expression\n  expression: \"__import__('os')\"\n")
    result = cli.invoke(app, ["serve", str(runs("funnel-esmm")), "--fusion", str(fusion)])
    assert result.exit_code == 2 and "'__import__' is not allowed" in result.output


def test_non_finite_fused_score_is_null_and_bugs_are_a_bare_500(runs, tmp_path):
    run = runs("funnel-esmm")
    fusion = tmp_path / "fusion.yaml"
    fusion.write_text("serve:\n  kind: expression\n  expression: 'log(click - click)'\n")
    app = create_app(run, fusion)
    client = TestClient(app, raise_server_exceptions=False)
    r = _score(client, [{"user": "u1"}])
    assert r.status_code == 200 and r.json()["scores"][0]["score"] is None

    def broken(_table):
        raise RuntimeError("a bug, not the client's fault")

    app.state.service.predictor.predict = broken
    r = _score(client, [{"user": "u1"}])
    assert r.status_code == 500 and r.json() == {"detail": "internal error"}
    assert client.get("/health").status_code == 200
