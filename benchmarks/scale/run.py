"""Scaling benchmark: training throughput with 1 and 2 processes (torchrun, Gloo, CPU) on
Census-Income, and the communication volume of data parallelism for a large MMoE.

Usage: python benchmarks/scale/run.py [--epochs 2] [--max-rows N] [--model mmoe] [--balance ew]
                                      [--procs 1 2] [--out DIR] [--vocab 100000]
Writes results.json and RESULTS.md beside this file (or next to --results).

Each configuration runs ``mtlrec train`` unchanged: one process directly, N processes under
``torchrun --nproc-per-node N`` over loopback, every process with one torch thread. The global
batch (``train.batch_size``) is the same in every configuration, so the runs follow the same
trajectory and their metrics agree; only the time per epoch changes. On a machine with C cores,
N <= C processes with one thread each is the fair comparison against one process with N threads
(also measured, ``--threads-baseline``).

The second part needs no run: it builds the MMoE that a production deployment would train
(4 experts of [256], towers of [64], 40 categorical fields x 16-dimensional embeddings + 2 dense
inputs, 2 tasks), counts its parameters, and computes the bytes each GPU moves per step on 8
GPUs for each family of balancers (ring all-reduce: 2 (N - 1) / N x the buffer size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(procs: int, threads: int, args: argparse.Namespace, root: Path) -> dict:
    """One training run; returns its throughput and metrics."""
    out = root / f"p{procs}-t{threads}"
    train = [
        "-m", "mtlrec.cli", "train", "--dataset", "census-income", "--model", args.model,
        "--balance", args.balance, "--epochs", str(args.epochs), "--out", str(out), "--quiet",
        "--set", f"train.threads={threads}", "--set", f"train.batch_size={args.batch_size}",
        "--set", "train.patience=1000",
    ]  # fmt: skip
    if args.max_rows:
        train += ["--max-rows", str(args.max_rows)]
    if procs == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *train,
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, cwd=REPO)
    wall = time.perf_counter() - started
    history = json.loads((out / "history.json").read_text())
    test = json.loads((out / "metrics.json").read_text())["test"]
    epochs = history["epochs"]
    row = {
        "processes": procs,
        "threads_per_process": threads,
        "epochs": len(epochs),
        "sec_per_epoch": statistics.mean(e["seconds"] for e in epochs),
        "samples_per_second": statistics.mean(e["samples_per_second"] for e in epochs),
        "wall_seconds": wall,
        "test_auc": {t: m.get("auc") for t, m in test.items()},
    }
    print(json.dumps(row), flush=True)
    return row


def large_mmoe(vocab: int) -> dict:
    """Parameter counts of the large MMoE (hashed fields of ``vocab`` rows each)."""
    import pandas as pd

    from mtlrec.balance.grads import trainable
    from mtlrec.data.encoder import Encoder
    from mtlrec.models import build_model
    from mtlrec.schema import Feature, Schema, Task

    fields = [Feature(f"c{i}", hash_buckets=vocab) for i in range(40)]
    dense = [Feature("d0", "numeric"), Feature("d1", "numeric")]
    tasks = [Task("click"), Task("conversion", depends_on="click")]
    schema = Schema(features=fields + dense, tasks=tasks)
    columns = {f.name: ["a", "b"] for f in fields} | {"d0": [0, 1], "d1": [1, 0]}
    frame = pd.DataFrame(columns | {"click": [1, 0], "conversion": [1, 0]})
    encoder = Encoder(schema).fit(frame)
    options = {"embed_dim": 16, "num_experts": 4, "expert_hidden": [256], "tower_hidden": [64]}
    import torch

    with torch.device("meta"):  # count without allocating the (large) embedding table
        model = build_model("mmoe", schema, encoder.layout(), options)
    total = sum(p.numel() for p in trainable(model.parameters()))
    shared = sum(p.numel() for p in trainable(model.shared_parameters()))
    embedding = model.embedding.table.weight.numel()
    return {
        "vocab_per_field": vocab,
        "tasks": len(tasks),
        "total": total,
        "shared": shared,
        "embedding": embedding,
        "dense_shared": shared - embedding,
        "task_specific": total - shared,
    }


def communication(params: dict, gpus: int = 8) -> list[dict]:
    """Floats all-reduced per step and bytes each GPU sends (= receives) with a ring all-reduce."""
    t, total, shared = params["tasks"], params["total"], params["shared"]
    own = total - shared
    ring = 2 * (gpus - 1) / gpus
    rows = [
        ("loss weighting: ew, fixed, uw, dwa, rlw, famo", total),
        (
            "per-task gradients: pcgrad, gradvac, mgda, cagrad, imtl, nashmtl, alignedmtl, "
            "gradnorm, dbmtl, metabalance, adatask",
            t * shared + own + total,
        ),
    ]
    out = []
    for name, floats in rows:
        out.append(
            {
                "family": name,
                "floats_per_step": floats,
                "mb_per_gpu_per_step": floats * 4 * ring / 2**20,
                "vs_plain": floats / total,
            }
        )
    return out


def write_results(rows: list[dict], params: dict, comm: list[dict], args, path: Path) -> None:
    from mtlrec.bench.hardware import describe

    base = next((r for r in rows if r["processes"] == 1 and r["threads_per_process"] == 1), None)
    lines = [
        "# Data-parallel scaling",
        "",
        f"Measured {date.today().isoformat()} on {describe()} ({platform.system()}), with",
        "",
        "```",
        f"python benchmarks/scale/run.py --epochs {args.epochs}"
        + (f" --max-rows {args.max_rows}" if args.max_rows else "")
        + f" --model {args.model} --balance {args.balance} --batch-size {args.batch_size}",
        "```",
        "",
        f"Census-Income, `{args.model}` with `{args.balance}`, global batch {args.batch_size} "
        "(the same in every row, so the runs follow the same trajectory up to the dropout "
        "masks of the preset's dropout), Gloo over loopback. Load average when the benchmark "
        f"started: {args.load_before:.2f} (other work on the machine slows every row alike).",
        "",
        "| processes x threads | s / epoch | samples / s | speed-up | test AUC |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        speed = base["sec_per_epoch"] / r["sec_per_epoch"] if base else float("nan")
        aucs = ", ".join(
            f"{t} {v:.4f}" if v is not None else f"{t} -" for t, v in r["test_auc"].items()
        )
        lines.append(
            f"| {r['processes']} x {r['threads_per_process']} | {r['sec_per_epoch']:.2f} | "
            f"{r['samples_per_second']:,.0f} | {speed:.2f} | {aucs} |"
        )
    lines += [
        "",
        "Reading it: on a machine with two cores shared with other work, two processes can at",
        "best double the throughput of one single-threaded process; per-step synchronisation",
        "(two small all-reduces for the losses, one for the gradients) and the per-process",
        "evaluation overhead take part of it. Expected scaling is near-linear while the",
        "per-rank batch keeps each core busy (hundreds of rows or more) and the gradient",
        "all-reduce is small next to the step's compute; it flattens when the per-rank batch",
        "gets small or the embedding tables are large (their dense gradients are all-reduced",
        "whole, see below).",
        "",
        "## At 8 GPUs: communication per step for the large MMoE",
        "",
        "MMoE with 4 experts of [256], towers of [64], 40 categorical fields x 16-dimensional",
        f"embeddings ({params['vocab_per_field']:,} hashed rows per field) + 2 dense inputs, "
        f"{params['tasks']} tasks, built by the library and counted:",
        "",
        "| parameters | count |",
        "|---|---:|",
        f"| embedding table | {params['embedding']:,} |",
        f"| other shared (experts, gates) | {params['dense_shared']:,} |",
        f"| task-specific (towers) | {params['task_specific']:,} |",
        f"| total | {params['total']:,} |",
        "",
        "Per step each GPU all-reduces (ring: sends and receives 2 (N - 1) / N of the buffer,",
        "float32):",
        "",
        "| balancer family | floats all-reduced | MiB per GPU per step (N = 8) | x plain "
        "| ms at 150 GB/s (NVLink) | ms at 3 GB/s (25 GbE) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in comm:
        nbytes = c["mb_per_gpu_per_step"] * 2**20
        lines.append(
            f"| {c['family']} | {c['floats_per_step']:,} | {c['mb_per_gpu_per_step']:.1f} | "
            f"{c['vs_plain']:.2f} | {nbytes / 150e9 * 1e3:.1f} | {nbytes / 3e9 * 1e3:.0f} |"
        )
    lines += [
        "",
        "Plus two all-reduces of T + 1 numbers for the exact global-batch losses (negligible).",
        "",
        "Design at 8 GPUs:",
        "",
        "* One process per GPU (`torchrun --nproc_per_node 8`, NCCL chosen automatically for a",
        "  CUDA device), `train.batch_size` the global batch: 8 x the per-GPU batch.",
        "* The gradient all-reduce is dominated by the embedding table, whose gradient is dense",
        "  here (every row, touched or not). Within one NVLink node the plain all-reduce costs a",
        "  few milliseconds per step, comparable to the step's compute; between nodes over",
        "  Ethernet it is 50 x slower and the step becomes communication-bound. Beyond this",
        "  size, shard the embedding table across GPUs (model parallel, e.g. TorchRec) or",
        "  all-reduce sparse row gradients, and keep data parallelism for the dense part.",
        "* Balancers that use per-task gradients all-reduce the [T, D] matrix before the",
        "  surgery so every GPU applies the same update, then the trainer all-reduces `.grad`:",
        "  T x D + D floats, about T + 1 times the plain volume here because the embedding",
        "  table is shared by every task. Restricting the surgery to the dense shared layers",
        "  (the embedding getting the plain sum) would bring it back near 1 x.",
        "* The losses are synchronised exactly (per-task counts all-reduced), so the result does",
        "  not depend on the number of GPUs; a checkpoint resumes on any number of them.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-rows", type=int, default=None, help="cap rows per split")
    parser.add_argument("--model", default="mmoe")
    parser.add_argument("--balance", default="ew")
    parser.add_argument("--batch-size", type=int, default=1024, help="global batch")
    parser.add_argument("--procs", nargs="*", type=int, default=[1, 2])
    parser.add_argument(
        "--threads-baseline",
        action="store_true",
        help="also time one process with as many threads as the largest --procs",
    )
    parser.add_argument("--vocab", type=int, default=100_000, help="hashed rows per field")
    parser.add_argument("--out", default=str(HERE / "runs"))
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()

    root = Path(args.out)
    args.load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [run_config(n, 1, args, root) for n in args.procs]
    if args.threads_baseline and max(args.procs) > 1:
        rows.append(run_config(1, max(args.procs), args, root))
    params = large_mmoe(args.vocab)
    comm = communication(params)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    (results.parent / "results.json").write_text(
        json.dumps({"runs": rows, "large_mmoe": params, "communication": comm}, indent=2)
    )
    write_results(rows, params, comm, args, results)
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
