"""Where does a training step's time go? torch.profiler over one epoch of run.py's data.

Why: issue 3 asks to profile before optimising. This trains one warm-up epoch, then profiles a
second one and prints the operators by self CPU time, plus samples per CPU-second (process CPU
time, so the figure stays comparable on a machine that is busy with other work).

Usage::

    python benchmarks/speed/profile_step.py --model mmoe --config census
    python benchmarks/speed/profile_step.py --model mmoe --config large --rows 30000 --top 15
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import CONFIGS, TRAIN_BATCH, build_mtlrec, make_data, mtlrec_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mmoe", choices=sorted(CONFIGS))
    parser.add_argument("--config", default="census", choices=["large", "census"])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)

    from mtlrec.balance import build_balancer
    from mtlrec.train.trainer import make_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    (cat, dense, labels), _ = make_data(args.rows, seed=0)
    model, layout = build_mtlrec(args.model, CONFIGS[args.model][args.config])
    table = mtlrec_table(cat, dense, labels, layout)
    balancer = build_balancer("ew", model)
    optimizer = make_optimizer("adam", list(model.parameters()), 1e-3, 0.0)
    generator = torch.Generator().manual_seed(0)

    def epoch() -> None:
        for batch in table.batches(TRAIN_BATCH, shuffle=True, generator=generator):
            out = model(batch)
            losses = model.task_losses(out, batch)
            optimizer.zero_grad(set_to_none=True)
            balancer.backward(losses, out.aux_loss)
            optimizer.step()

    epoch()  # warm-up: allocator, kernels
    start = time.process_time()
    epoch()
    cpu = time.process_time() - start
    print(f"{args.model}/{args.config}: {len(table) / cpu:,.0f} samples per CPU-second")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        epoch()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
