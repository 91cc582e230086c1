"""Gradient all-reduce: torch's DistributedDataParallel (+ ``no_sync``) vs the hand-written flat all-reduce it replaced.

    python benchmarks/ddp.py [--shape tiny|tests] [--steps 6] [--reps 5] [--micro 256] [--json FILE]

Starts itself under torchrun: 2 gloo ranks on this CPU, one thread each. Both variants train a copy of the same
model on the same masked micro-batches of the test data (``tests/data/reference_stage``: its shards and 300-token
vocabulary), interleaved rep by rep (machine drift hits both):

* ``hand``: forward/backward every micro-batch with the loss / the step's predicted tokens, then ONE flat
  all-reduce (SUM) of all gradients — the loop's code before DDP (kept here as the baseline);
* ``ddp``: ``step.train_step`` on ``distributed.data_parallel(model)``: DDP's bucketed all-reduce (AVERAGE,
  overlapping the backward pass) on the last micro-batch, ``no_sync`` before it, the loss / (predicted / world).

The two alternate step by step. Reported on rank 0: seconds per optimizer step (median over the reps of a rep's
mean; best: each step's fastest rep; a rep's first step is a warm-up), tokens/s, the ratio ddp / hand (and per
rep, to judge the noise), and the largest weight difference after the run (0.0: the same gradients).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mmbert_dagster.data.shard_reader import ShardReader  # noqa: E402
from mmbert_dagster.recipe import ModelShape, load_recipe  # noqa: E402
from mmbert_dagster.train import distributed  # noqa: E402
from mmbert_dagster.train.inputs import read_vocabulary  # noqa: E402
from mmbert_dagster.train.model import build_model  # noqa: E402
from mmbert_dagster.train.optim import build_optimizer, clip_gradients, set_lr  # noqa: E402
from mmbert_dagster.train.packing import Packer  # noqa: E402
from mmbert_dagster.train.step import masked_micro_batches, train_step  # noqa: E402

DATA = ROOT / "tests" / "data" / "reference_stage"
TEST_SHAPE = ModelShape(layers=3, hidden=64, intermediate=96, heads=2, global_every=3, local_window=32)  # tests'
CONTEXT = 128


def hand_step(model, optimizer, batches, *, lr, grad_clip, info) -> float:
    """The loop's step before DDP: loss / global predicted tokens, one flat SUM all-reduce of the gradients."""
    counts = torch.tensor([sum(b.n_predicted for b in batches)], dtype=torch.float64)
    num_items = torch.tensor(distributed.all_reduce_sum(counts, info).item())
    set_lr(optimizer, lr)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for micro in batches:
        out = model(**micro.batch.model_inputs("cpu"), num_items_in_batch=num_items)
        out.loss.backward()
        loss_sum += out.loss.detach().double()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()
    clip_gradients(model, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(distributed.all_reduce_sum(loss_sum, info))


def timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(shape: ModelShape, *, steps: int, reps: int, micro: int, accum: int) -> dict:
    info = distributed.setup("cpu")
    stage = load_recipe("tiny").stage("pretrain")
    vocab = read_vocabulary(DATA / "tokenizer")
    packer = Packer(ShardReader(DATA / "shards"), micro, CONTEXT, vocab.specials, rank=info.rank, world=info.world,
                    shuffle_window=stage.shuffle_window_docs)
    batches = [list(masked_micro_batches(packer, accum, rate=stage.mask_rate, vocab=vocab, seed_parts=(0, s)))
               for s in range(steps)]
    torch.manual_seed(0)  # the same weights on every rank
    base = build_model(shape, vocab.size, vocab.specials, CONTEXT, 10_000.0)
    models = {"hand": base, "ddp": copy.deepcopy(base)}
    optims = {k: build_optimizer(m, stage) for k, m in models.items()}
    wrapped = distributed.data_parallel(models["ddp"], info, torch.device("cpu"))
    run = {
        "hand": lambda b: hand_step(models["hand"], optims["hand"], b, lr=1e-4, grad_clip=1.0, info=info),
        "ddp": lambda b: train_step(wrapped, optims["ddp"], b, lr=1e-4, grad_clip=1.0, info=info,
                                    device=torch.device("cpu")),
    }
    times = {k: [] for k in run}  # [rep][step] seconds, the first step of a rep (warm-up) left out
    for _ in range(reps):
        per_step = {k: [] for k in run}
        for i, b in enumerate(batches):  # the variants alternate step by step (drift hits both), in turns first
            for name in (("hand", "ddp") if i % 2 else ("ddp", "hand")):
                per_step[name].append(timed(lambda: run[name](b)))
        for name in run:
            times[name].append(per_step[name][1:])
    worst = max(float((a - b).abs().max()) for a, b in zip(models["hand"].state_dict().values(),
                                                          models["ddp"].state_dict().values()))
    local = torch.tensor([float(sum(m.n_tokens for b in batches[1:] for m in b))], dtype=torch.float64)
    tokens = distributed.all_reduce_sum(local, info).item() / (steps - 1)  # per step, all ranks
    out = {"shape": f"{shape.layers}L/{shape.hidden}h/{shape.intermediate}i, vocab {vocab.size}",
           "params_m": sum(p.numel() for p in base.parameters()) / 1e6, "world": info.world,
           "accum": accum, "micro_batch_tokens": micro, "tokens_per_step": tokens, "reps": reps,
           "max_weight_difference": worst}
    for name, per_rep in times.items():
        median = statistics.median(statistics.mean(r) for r in per_rep)
        best = statistics.mean(min(r[i] for r in per_rep) for i in range(steps - 1))  # each step's fastest rep
        out |= {f"{name}_s_per_step_median": median, f"{name}_s_per_step_best": best,
                f"{name}_tokens_per_s_median": tokens / median}
    out["ddp_over_hand_median"] = out["ddp_s_per_step_median"] / out["hand_s_per_step_median"]
    out["ddp_over_hand_best"] = out["ddp_s_per_step_best"] / out["hand_s_per_step_best"]
    out["ddp_over_hand_per_rep"] = [round(statistics.mean(d) / statistics.mean(h), 3)
                                    for d, h in zip(times["ddp"], times["hand"])]
    del run, wrapped  # a DDP module that outlives its process group can hang gloo when it is freed
    distributed.teardown(info)
    return out if info.is_main else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=("tiny", "tests"), default="tiny", help="tiny: the tiny preset's [model]")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per rep (the first is a warm-up)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--micro", type=int, default=256, help="tokens per micro-batch")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per rank and step")
    p.add_argument("--json", default="", help="also append the result as one JSON line to this file")
    args = p.parse_args(argv)
    if "RANK" not in os.environ:  # start the 2 ranks
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
               *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    shape = load_recipe("tiny").model if args.shape == "tiny" else TEST_SHAPE
    result = measure(shape, steps=args.steps, reps=args.reps, micro=args.micro, accum=args.accum)
    if result:
        print(json.dumps(result, indent=1), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
