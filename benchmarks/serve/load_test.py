"""Load test of ``mtlrec serve``: throughput, latency and robustness on this machine, loopback only.

Usage: python benchmarks/serve/load_test.py [--requests 20000] [--candidates 100]
       [--concurrency 8] [--malformed 1000] [--run DIR] [--model mmoe] [--max-seconds 1800]

1. Trains a small run (UCI Adult, ``--train-rows`` rows, 1 epoch; needs MTLREC_DATA_DIR) or
   reuses ``--run``; the model's accuracy is beside the point, its size and inputs are real.
2. Starts ``mtlrec serve`` on a free 127.0.0.1 port and waits for ``/health``.
3. Sends ``--requests`` POST /score requests of ``--candidates`` raw candidates each (rows of the
   Adult test split, so unseen categories and missing values occur) from ``--concurrency``
   keep-alive clients; every 10th request also overrides a fusion weight. Measures throughput,
   latency percentiles and errors (any non-200 answer or failed request).
4. Sends ``--malformed`` bad requests (broken JSON, NaN, wrong types, unknown fields, too many
   candidates, weights out of bounds, oversized bodies, ...), counts answers by status, requires
   zero 500s and no dropped connection, then checks ``/health`` again.

Writes results.json and RESULTS.md beside this file (or ``--out``). Exits 1 if the valid phase had
errors, a malformed request got a 5xx or no answer, or the server was unhealthy afterwards. The
load generator runs on the same cores as the server, so the numbers are a floor for the server.
Every loop is bounded by its count and by ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from mtlrec.bench.hardware import cpu_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the run and its candidates --------------------------------------------------------------
def ensure_run(args) -> Path:
    run = Path(args.run) if args.run else REPO / "runs" / "bench-serve" / args.model
    if (run / "model.pt").exists():
        print(f"reusing {run}", flush=True)
        return run
    from mtlrec.config import resolve
    from mtlrec.train.run import train_run

    config = resolve(
        {
            "dataset": {"name": "adult", "max_rows": args.train_rows},
            "model": {"name": args.model},
            "train": {"epochs": 1, "progress": False},
        }
    )
    print(f"training {args.model} on {args.train_rows} Adult rows -> {run}", flush=True)
    train_run(config, run, echo=lambda *_: None)
    return run


def candidate_pool(run: Path, rows: int) -> list[dict]:
    """Raw Adult test rows as JSON-ready candidates (numbers as numbers; missing ones omitted)."""
    import pandas as pd

    from mtlrec.train.run import load_run, load_splits

    config, encoder, _ = load_run(run)
    frame = load_splits(config).test.head(rows)
    out: list[dict] = [{} for _ in range(len(frame))]
    for feat in encoder.schema.features:
        column = frame[feat.source]
        if feat.type == "numeric":
            values = pd.to_numeric(column, errors="coerce").tolist()
            for cand, v in zip(out, values):
                if not math.isnan(v):
                    cand[feat.source] = int(v) if float(v).is_integer() else v
        else:
            for cand, v in zip(out, column.astype(str).tolist()):
                cand[feat.source] = v
    return out


def valid_bodies(pool: list[dict], candidates: int, count: int, task: str) -> list[bytes]:
    rng = random.Random(0)
    bodies = []
    for i in range(count):
        request: dict = {"candidates": rng.sample(pool, candidates)}
        if i % 10 == 0:
            request["weights"] = {task: 0.5}
        bodies.append(json.dumps(request).encode())
    return bodies


def malformed_bodies(pool: list[dict], max_candidates: int, task: str) -> list[tuple[str, bytes]]:
    good = pool[0]
    num_field = next(k for k, v in good.items() if isinstance(v, int | float))
    cat_field = next(k for k, v in good.items() if isinstance(v, str))
    ok = json.dumps(good)

    def body(obj) -> bytes:
        return json.dumps(obj).encode()

    return [
        ("broken json", b'{"candidates": [' + ok.encode()),
        ("not an object", b"[1, 2, 3]"),
        ("null body", b"null"),
        ("empty body", b""),
        ("candidates not a list", body({"candidates": "x"})),
        ("candidate not an object", body({"candidates": [good, 5]})),
        ("NaN", f'{{"candidates": [{{"{num_field}": NaN}}]}}'.encode()),
        ("Infinity", f'{{"candidates": [{{"{num_field}": -Infinity}}]}}'.encode()),
        ("string for number", body({"candidates": [{**good, num_field: "abc"}]})),
        ("bool for number", body({"candidates": [{**good, num_field: True}]})),
        ("float for category", body({"candidates": [{**good, cat_field: 1.5}]})),
        ("object for category", body({"candidates": [{**good, cat_field: {"a": 1}}]})),
        ("unknown field", body({"candidates": [{**good, "not_a_field": 1}]})),
        ("too many candidates", body({"candidates": [good] * (max_candidates + 1)})),
        ("weight out of bounds", body({"candidates": [good], "weights": {task: 1e6}})),
        ("unknown task weight", body({"candidates": [good], "weights": {"nope": 1}})),
        ("string weight", body({"candidates": [good], "weights": {task: "1"}})),
        ("extra top-level key", body({"candidates": [good], "limit": 3})),
        ("huge integer", f'{{"candidates": [{{"{num_field}": 1{"0" * 400}}}]}}'.encode()),
        ("deep nesting", b'{"candidates": [' + b"[" * 3000 + b"]" * 3000 + b"]}"),
        ("invalid utf-8", bytes([0xFF, 0xFE, 0xFD])),
        ("oversized body", b'{"candidates": ["' + b"x" * (9 * 1024 * 1024) + b'"]}'),
    ]


# --- HTTP ----------------------------------------------------------------------------------------
def wait_healthy(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode} before /health")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server did not answer /health within {timeout:.0f} s")


def get_json(port: int, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data or b"{}")


def blast(
    port: int,
    bodies: list[tuple[str, bytes]],
    total: int,
    concurrency: int,
    deadline: float,
    content_type: str = "application/json",
) -> dict:
    """Send ``total`` POST /score requests from ``concurrency`` keep-alive clients, cycling over
    ``bodies``; returns latencies (s), statuses and failures, per label."""
    counter = iter(range(total))
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: Counter = Counter()
    by_label: dict[str, Counter] = {}
    failures: Counter = Counter()
    sent = [0]

    def worker() -> None:
        conn = None
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            label, body = bodies[i % len(bodies)]
            started = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("POST", "/score", body=body, headers={"Content-Type": content_type})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                status = None
                with lock:
                    failures[f"{label}: {type(exc).__name__}"] += 1
                if conn is not None:
                    conn.close()
                conn = None
            elapsed = time.perf_counter() - started
            with lock:
                sent[0] += 1
                if status is not None:
                    latencies.append(elapsed)
                    statuses[status] += 1
                    by_label.setdefault(label, Counter())[status] += 1
        if conn is not None:
            conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {
        "sent": sent[0],
        "wall_s": wall,
        "latencies": latencies,
        "statuses": statuses,
        "by_label": by_label,
        "failures": failures,
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


# --- report --------------------------------------------------------------------------------------
def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    v, m, hw = results["valid"], results["malformed"], results["hardware"]
    full = results["config"]["requests"] == 20000 and results["config"]["malformed"] == 1000
    size = (
        "the full-size run (the script's defaults)"
        if full
        else f"a **reduced-size** run ({results['config']['requests']:,} valid and "
        f"{results['config']['malformed']:,} malformed requests); the script's defaults are "
        "20,000 and 1,000"
    )
    statuses = ", ".join(f"{k}: {n}" for k, n in sorted(m["statuses"].items()))
    lines = [
        "# mtlrec serve: load test",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Hardware: {hw['cpu']}, {hw['nproc']} CPU(s) available (`nproc`), "
        f"{hw['platform']}; Python {hw['python']}, torch {hw['torch']}, mtlrec {hw['mtlrec']}  ",
        f"Load average (1/5/15 min) before the run: {hw['loadavg_before']}  ",
        f"Model: {results['model']} (run `{results['run']}`), served eagerly from the run "
        f"directory by one uvicorn process, {results['config']['threads']} torch thread(s), "
        "loopback only.",
        "",
        f"This is {size}. The load generator (Python threads, keep-alive HTTP/1.1 "
        "connections) shares the same CPUs with the server, so these numbers are a floor. "
        "50 warm-up requests are sent first and not counted.",
        "",
        "## Valid requests",
        "",
        "| requests | candidates / request | clients | throughput (req/s) | candidates/s "
        "| p50 (ms) | p99 (ms) | mean (ms) | max (ms) | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {v['sent']:,} | {results['config']['candidates']} | "
        f"{results['config']['concurrency']} | {v['throughput_rps']:.1f} | "
        f"{v['throughput_rps'] * results['config']['candidates']:,.0f} | {v['p50_ms']:.1f} | "
        f"{v['p99_ms']:.1f} | {v['mean_ms']:.1f} | {v['max_ms']:.1f} | {v['errors']} |",
        "",
        "## Malformed requests",
        "",
        f"{m['sent']:,} requests cycling over {len(m['by_label'])} kinds of mistake; answers by "
        f"status: {statuses}. **5xx answers: {m['server_errors']}**; requests without an answer: "
        f"{m['no_answer']}. `/health` afterwards: {results['healthy_after']}.",
        "",
        "| mistake | statuses |",
        "|---|---|",
    ]
    for label, counts in m["by_label"].items():
        lines.append(f"| {label} | {', '.join(f'{k}: {n}' for k, n in sorted(counts.items()))} |")
    lines += ["", f"Verdict: **{'PASS' if results['passed'] else 'FAIL'}**", ""]
    (out / "RESULTS.md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--malformed", type=int, default=1000)
    parser.add_argument("--run", help="reuse this run directory (default: train one)")
    parser.add_argument("--model", default="mmoe")
    parser.add_argument("--train-rows", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--max-seconds", type=float, default=1800, help="stop sending after this")
    parser.add_argument("--out", default=str(HERE), help="where results.json/RESULTS.md go")
    args = parser.parse_args()
    if min(args.requests, args.candidates, args.concurrency) < 1 or args.malformed < 0:
        parser.error("--requests, --candidates and --concurrency must be >= 1")

    import torch

    import mtlrec

    default_data = REPO.parent / "shared" / "data"  # as the Makefile and tests/conftest.py do
    if not os.environ.get("MTLREC_DATA_DIR") and default_data.is_dir():
        os.environ["MTLREC_DATA_DIR"] = str(default_data)
    load_before = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    run = ensure_run(args)
    pool = candidate_pool(run, rows=5000)
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="mtlrec-serve-", suffix=".log", delete=False)
    cmd = [
        sys.executable, "-m", "mtlrec.cli", "serve", str(run), "--host", "127.0.0.1",
        "--port", str(port), "--threads", str(args.threads), "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + args.max_seconds
    try:
        wait_healthy(port, proc, timeout=120)
        _, meta = get_json(port, "/metadata")
        task = meta["tasks"][0]["name"]
        if args.candidates > meta["max_candidates"]:
            parser.error(f"--candidates exceeds the server's limit of {meta['max_candidates']}")
        bodies = [("valid", b) for b in valid_bodies(pool, args.candidates, 500, task)]
        blast(port, bodies, min(50, args.requests), args.concurrency, deadline)  # warm-up
        print(
            f"valid phase: {args.requests:,} requests x {args.candidates} candidates, "
            f"{args.concurrency} clients",
            flush=True,
        )
        valid = blast(port, bodies, args.requests, args.concurrency, deadline)
        lat = valid["latencies"]
        ok = valid["statuses"].get(200, 0)
        valid_summary = {
            "sent": valid["sent"],
            "ok": ok,
            "errors": valid["sent"] - ok,
            "statuses": {str(k): n for k, n in valid["statuses"].items()},
            "failures": dict(valid["failures"]),
            "wall_s": round(valid["wall_s"], 3),
            "throughput_rps": valid["sent"] / valid["wall_s"],
            "p50_ms": percentile(lat, 50) * 1000,
            "p90_ms": percentile(lat, 90) * 1000,
            "p99_ms": percentile(lat, 99) * 1000,
            "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"),
            "max_ms": max(lat) * 1000 if lat else float("nan"),
        }
        print(f"malformed phase: {args.malformed:,} requests", flush=True)
        bad = malformed_bodies(pool, meta["max_candidates"], task)
        malformed = blast(port, bad, args.malformed, args.concurrency, deadline)
        status, health = get_json(port, "/health")
        healthy = status == 200 and health.get("status") == "ok" and proc.poll() is None
        server_errors = sum(n for s, n in malformed["statuses"].items() if s >= 500)
        no_answer = malformed["sent"] - sum(malformed["statuses"].values())
        malformed_summary = {
            "sent": malformed["sent"],
            "statuses": {str(k): n for k, n in malformed["statuses"].items()},
            "server_errors": server_errors,
            "no_answer": no_answer,
            "failures": dict(malformed["failures"]),
            "by_label": {
                label: {str(k): n for k, n in c.items()}
                for label, c in malformed["by_label"].items()
            },
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.flush()
    passed = (
        valid_summary["errors"] == 0
        and valid_summary["sent"] == args.requests
        and server_errors == 0
        and no_answer == 0
        and malformed["sent"] == args.malformed
        and healthy
    )
    results = {
        "command": " ".join(["python", "benchmarks/serve/load_test.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "hardware": {
            "cpu": cpu_name(),
            "nproc": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),  # fmt: skip
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "mtlrec": mtlrec.__version__,
            "loadavg_before": load_before,
        },
        "config": {
            "requests": args.requests,
            "candidates": args.candidates,
            "concurrency": args.concurrency,
            "malformed": args.malformed,
            "threads": args.threads,
        },
        "model": meta["model"],
        "run": os.path.relpath(run, REPO),
        "valid": valid_summary,
        "malformed": malformed_summary,
        "healthy_after": healthy,
        "passed": passed,
    }
    write_report(results, Path(args.out))
    print(
        f"{valid_summary['throughput_rps']:.1f} req/s, p50 {valid_summary['p50_ms']:.1f} ms, "
        f"p99 {valid_summary['p99_ms']:.1f} ms, errors {valid_summary['errors']}; malformed: "
        f"{malformed_summary['statuses']}, 5xx {server_errors}; healthy after: {healthy}; "
        f"{'PASS' if passed else 'FAIL'} -> {Path(args.out) / 'RESULTS.md'}",
        flush=True,
    )
    if not passed:
        log.seek(0)
        sys.stderr.write(f"server log {log.name}:\n{log.read()[-4000:]}")
    log.close()
    if passed:
        os.unlink(log.name)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
