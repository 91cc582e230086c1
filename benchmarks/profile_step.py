"""Where a packed training step spends its time: torch.profiler over a few steps of the benchmark's small-like shape.

    python benchmarks/profile_step.py [--lengths var512|uniform512|long] [--steps 4] [--top 15]

Prints the operators with the most self CPU time (and their share) and the time per phase (forward, backward,
optimizer), so optimisation targets come from a measurement. Not part of the unit tests.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmbert_dagster.train import throughput as bench  # noqa: E402
from mmbert_dagster.train.model import build_model  # noqa: E402

from run import SMALL_LIKE, VOCAB  # noqa: E402

CASES = {"uniform512": (512, 512, 0.0), "var512": (512, 256, 64.0), "long": (4096, 2048, 512.0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", choices=sorted(CASES), default="var512")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    from optimi import StableAdamW
    from torch.profiler import ProfilerActivity, profile, record_function

    context, mean, std = CASES[args.lengths]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model(SMALL_LIKE, VOCAB, bench.SPECIALS, context, 10_000.0, attn="auto").train()
    optim = StableAdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    batches = [bench.packed_inputs(bench.masked(bench.make_docs(rng, 8192, mean, std, VOCAB, context), VOCAB, i),
                                   "cpu") for i in range(args.steps + 1)]

    def step(x):
        with record_function("forward"):
            loss = model(**x).loss
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            optim.step()
            optim.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x in batches[1:]:
            step(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.lengths}: {args.steps} steps, {total / 1e6 / args.steps:.2f} s of CPU op time per step\n")
    print("| operator | self CPU s/step | share |\n|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e6 / args.steps:.3f} | {e.self_cpu_time_total / total:.1%} |")
    phases = {e.key: e.cpu_time_total for e in events if e.key in ("forward", "backward", "optimizer")}
    print("\nwall per phase (s/step): " + ", ".join(f"{k} {v / 1e6 / args.steps:.2f}" for k, v in phases.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
