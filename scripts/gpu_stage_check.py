"""GPU smoke run of the training core on real shards: pretrain then midtrain (context extension) of the tiny recipe.

``python scripts/gpu_stage_check.py --artifacts .mmbert/tiny --out OUT_DIR`` (after ``make demo`` built the
shards here). Needs only torch, transformers, tokenizers, torch-optimi, numpy, pyarrow — no Dagster, polars or
datatrove — so it runs on a bare GPU machine. Prints one JSON line per stage (tokens/s, losses, device, kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    import pyarrow.parquet as pq
    import torch

    from mmbert_dagster.recipe import load_recipe
    from mmbert_dagster.train.attention import varlen_kernel
    from mmbert_dagster.train.loop import run_stage

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, default=Path(".mmbert/tiny"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    recipe = load_recipe(args.preset)
    heldout = pq.read_table(Path("mmbert_dagster/data/embedded/heldout.parquet"), columns=["text"])
    texts = heldout.column("text").to_pylist()[::20][:64]
    previous = None
    for name in ("pretrain", "midtrain"):
        stage = recipe.stages[name]
        out = args.out / name
        t0 = time.perf_counter()
        m = run_stage(stage, recipe.model, shards_dir=args.artifacts / f"shards_{name}",
                      tokenizer_dir=args.artifacts / "tokenizer", out_dir=out, state_dir=args.out / f"state_{name}",
                      init_from=previous, heldout_texts=texts, seed=recipe.seed, device=args.device,
                      checkpoint_every=50, log=lambda s: None)
        kernel = varlen_kernel()
        print(json.dumps({k: m[k] for k in ("stage", "steps", "tokens", "tokens_per_s", "initial_loss", "final_loss",
                                            "heldout_loss", "device", "context")}
                         | {"wall_s": time.perf_counter() - t0, "kernel": kernel.name if kernel else "loop",
                            "gpu": torch.cuda.get_device_name()}), flush=True)
        previous = out
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
