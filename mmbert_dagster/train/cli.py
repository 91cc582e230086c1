"""``python -m mmbert_dagster.train.cli --job job.json``: run one stage (the entry point torchrun starts).

``job.json``: ``{"stage": {Stage fields}, "shape": {ModelShape fields}, "kwargs": {run_stage keyword arguments:
shards_dir, tokenizer_dir, out_dir, state_dir, init_from, heldout_texts, seed, device, micro_batch_tokens,
checkpoint_every, max_steps}, "metrics_out": path}``. Rank 0 writes the returned metrics to ``metrics_out``.
Build jobs with ``distributed.run_stage_distributed`` rather than by hand.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mmbert_dagster.recipe import ModelShape, Stage


def _stage(d: dict) -> Stage:
    d = dict(d)
    d["betas"] = tuple(d["betas"])
    if isinstance(d["languages"], list):
        d["languages"] = tuple(d["languages"])
    return Stage(**d)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, type=Path, help="job JSON (see module docstring)")
    args = parser.parse_args(argv)
    job = json.loads(args.job.read_text())

    from mmbert_dagster.train.loop import run_stage

    rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    metrics = run_stage(_stage(job["stage"]), ModelShape(**job["shape"]), **job["kwargs"],
                        log=lambda msg: print(prefix + str(msg), flush=True))
    if rank == 0 and job.get("metrics_out"):
        Path(job["metrics_out"]).write_text(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
