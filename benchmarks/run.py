"""Speed benchmark: every ratio measured side by side in one run (the machines are shared; absolute numbers drift).

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--out benchmarks/results/<name>.json]

Sections (each case interleaves its variants rep by rep and keeps each batch's fastest rep):

* training: our packed core vs the same model on padded batches (transformers' SDPA) and vs transformers' own
  packing (rows + per-layer-type block masks), on a ``small``-like shape (6 layers, hidden 384, GLU 1152, vocab
  8192): uniform 512, variable ~N(256, 64) at max 512, long ~N(2048, 512) at max 4096. Ideal = padded slots /
  real tokens. MFU = model FLOPs on real tokens (``train.throughput.train_flops``) / the matmul peak measured here.
* inference: ModernBERT packed and padded vs an XLM-R-architecture encoder (``XLMRobertaModel``, random weights,
  the same parameter count, padded, max 512), uniform 512 and ~N(256, 64); and ours beyond 512.

Waits (up to ``--wait`` s) until other processes use < 10 % of the CPUs before each case (recorded as
``cpu_busy_before``): they slow a 2-thread CPU step 5-15x. Not part of the unit tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmbert_dagster.recipe import ModelShape  # noqa: E402
from mmbert_dagster.train import throughput as bench  # noqa: E402
from mmbert_dagster.train.model import build_model  # noqa: E402
from mmbert_dagster.train.packing import collate  # noqa: E402

SMALL_LIKE = ModelShape(layers=6, hidden=384, intermediate=1152, heads=6, global_every=3, local_window=128)
VOCAB = 8192


def _cpu_busy(interval: float = 2.0) -> float:
    """Share of all CPUs busy over ``interval`` seconds (from /proc/stat; we are idle while measuring it)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    t0, i0 = read()
    time.sleep(interval)
    t1, i1 = read()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_idle(max_wait: float, threshold: float = 0.1) -> float:
    """Wait until other processes use < ``threshold`` of the CPUs (the load average would count our own last case)."""
    t0 = time.time()
    busy = _cpu_busy()
    while busy >= threshold and time.time() - t0 < max_wait:
        busy = _cpu_busy()
    return busy


def xlmr_like(shape: ModelShape, vocab: int):
    """An XLM-R-architecture encoder with the same non-embedding parameter count as ``shape`` (MLP width solved)."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    h = shape.hidden
    per_layer = 4 * h * h + 3 * h * shape.intermediate  # ModernBERT: Wqkv + Wo, GLU Wi (2x) + Wo
    intermediate = round((per_layer - 4 * h * h) / (2 * h))  # XLM-R: 4h^2 + 2 h i
    cfg = XLMRobertaConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=shape.layers,
                           num_attention_heads=shape.heads, intermediate_size=intermediate,
                           max_position_embeddings=514, attn_implementation="sdpa")
    return XLMRobertaModel(cfg, add_pooling_layer=False)


def inference_case(shape: ModelShape, *, lengths: str, budget: int, steps: int, reps: int, device: str,
                   seed: int = 0, with_xlmr: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    context = {"uniform512": 512, "var512": 512, "var2048": 2048}[lengths]
    mean, std = {"uniform512": (512, 0), "var512": (256, 64), "var2048": (1024, 256)}[lengths]
    batches = [bench.make_docs(rng, budget, mean, std, VOCAB, context) for _ in range(steps + 1)]
    real = [sum(d.size for d in b) for b in batches]
    slots = [len(b) * max(d.size for d in b) for b in batches]
    torch.manual_seed(seed)
    ours = build_model(shape, VOCAB, bench.SPECIALS, max(context, 1024), 160_000.0, attn="auto").model.eval().to(device)
    variants = {"modernbert_packed": ours}
    if lengths != "var2048":
        padded = build_model(shape, VOCAB, bench.SPECIALS, 1024, 160_000.0, attn="sdpa").model
        padded.load_state_dict(ours.state_dict())
        variants["modernbert_padded"] = padded.eval().to(device)
        if with_xlmr:
            variants["xlmr_padded"] = xlmr_like(shape, VOCAB).eval().to(device)

    def make(name, docs):
        if name == "modernbert_packed":
            x = collate(docs).model_inputs(device)
            x.pop("labels", None)
            return x
        length = max(d.size for d in docs)
        ids = torch.zeros(len(docs), length, dtype=torch.long)
        mask = torch.zeros(len(docs), length, dtype=torch.long)
        for i, d in enumerate(docs):
            ids[i, :d.size], mask[i, :d.size] = torch.from_numpy(d), 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    params = {k: sum(p.numel() for n, p in m.named_parameters() if "embeddings" not in n) for k, m in variants.items()}
    times: dict[str, list[list[float]]] = {k: [] for k in variants}
    with torch.inference_mode():
        for _ in range(reps):
            for name, model in variants.items():
                inputs = [make(name, b) for b in batches]
                rep = []
                for x in inputs:
                    bench._sync(torch.device(device))
                    t0 = time.perf_counter()
                    model(**x)
                    bench._sync(torch.device(device))
                    rep.append(time.perf_counter() - t0)
                times[name].append(rep[1:])
    tokens = sum(real[1:])
    best = {k: tokens / sum(min(r[i] for r in v) for i in range(steps)) for k, v in times.items()}
    out = {"case": f"inference {lengths}", "docs_per_step": statistics.mean(len(b) for b in batches),
           "ideal": sum(slots) / sum(real), "non_embedding_params": params,
           **{f"{k}_tokens_per_s": v for k, v in best.items()}}
    if "xlmr_padded" in best:
        out["packed_vs_xlmr"] = best["modernbert_packed"] / best["xlmr_padded"]
        out["padded_vs_xlmr"] = best["modernbert_padded"] / best["xlmr_padded"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one timed step per case, no long-context cases (~6 min)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--wait", type=float, default=120, help="max seconds to wait for an idle machine per case")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, reps = (1, 2) if args.quick else (2, 2)
    budget = 8192 if args.device == "cpu" else 65536  # CPU: 32 documents ~N(256, 64) per step
    results = []

    def record(r: dict) -> None:
        r["cpu_busy_before"] = round(load, 2)
        results.append(r)
        print(json.dumps(r), flush=True)

    train_cases = [("uniform512", 512, 512, 0, 512), ("var512", 512, 256, 64, 512)]
    if not args.quick:
        train_cases.append(("long4096", 4096, 2048, 512, 4096))
    for name, context, mean, std, row in train_cases:
        load = wait_idle(args.wait)
        r = bench.bench(SMALL_LIKE, vocab=VOCAB, context=context, budget=budget, mean=mean, std=std,
                        steps=1 if context > 512 else steps,  # a long-context step costs ~4 short ones
                        reps=reps, device=args.device, variants=("packed", "padded", "hf_packed"), row_tokens=row)
        record({"case": f"train {name}", **r})
    for lengths in ("uniform512", "var512") + (() if args.quick else ("var2048",)):
        load = wait_idle(args.wait)
        record(inference_case(SMALL_LIKE, lengths=lengths, budget=budget, steps=steps, reps=reps,
                              device=args.device))

    print()
    print("| case | ideal | packed tok/s | padded tok/s | packed ÷ padded | HF packing tok/s | packed ÷ HF packing "
          "| packed MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["case"].startswith("train"):
            print(f"| {r['case']} | {r['padded_slots_per_real_token']:.2f} | {r['packed_tokens_per_s_best']:,.0f} | "
                  f"{r['padded_tokens_per_s_best']:,.0f} | {r['speedup_best']:.2f} | "
                  f"{r['hf_packed_tokens_per_s_best']:,.0f} | {r['speedup_vs_hf_packed_best']:.2f} | "
                  f"{r['packed_mfu_best']:.0%} |")
    print()
    print("| case | ideal | ours packed tok/s | ours padded tok/s | XLM-R padded tok/s | packed ÷ XLM-R | padded ÷ XLM-R |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if r["case"].startswith("inference"):
            print(f"| {r['case']} | {r['ideal']:.2f} | {r['modernbert_packed_tokens_per_s']:,.0f} | "
                  f"{r.get('modernbert_padded_tokens_per_s', float('nan')):,.0f} | "
                  f"{r.get('xlmr_padded_tokens_per_s', float('nan')):,.0f} | {r.get('packed_vs_xlmr', float('nan')):.2f} | "
                  f"{r.get('padded_vs_xlmr', float('nan')):.2f} |")
    out = Path(args.out or f"benchmarks/results/{args.device}_{dt.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "results": results},
                              indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
