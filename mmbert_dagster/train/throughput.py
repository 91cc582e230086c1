"""Training throughput: packed per-document attention vs the standard padded batch (transformers' SDPA).

``python -m mmbert_dagster.train.throughput [--shape tiny|small|base] [--context 1024] [--device auto] ...``

One model shape (a preset's ``[model]``, with the preset's vocabulary unless ``--vocab``), synthetic documents
~N(mean, std) tokens (default mean = context / 4, std = mean / 4, clipped to [8, context]; ``--uniform`` makes
every document ``context`` tokens), micro-batches of ~``budget`` real tokens, 30 % masking, sparse prediction,
StableAdamW. CPU in fp32; CUDA with bf16 autocast (as the training loop). Each timed step is forward + backward
+ optimizer step on the SAME documents in both layouts:

* ``packed``: one row, ``cu_seqlens``, attention per document (``mmbert_varlen``: on CUDA a FlashAttention-2
  varlen kernel, see ``attention.varlen_kernel``);
* ``padded``: the same documents as a (B, L_max) batch with an attention mask, ``attn_implementation="sdpa"``
  (what a stock Hugging Face collator + ModernBERT does);
* ``hf_packed``: transformers' own way to pack with SDPA (it has no model-level unpadding): documents packed
  into rows of at most ``row_tokens`` (default: the longest document), the rows padded, a per-layer-type mask
  dict (block-diagonal; block-diagonal within the window on the sliding layers), positions restarting per
  document.

Variants are interleaved rep by rep (machine drift hits both); reported: real (non-pad) tokens/s, "best"
from each batch's fastest rep (the least disturbed), "median" from the median rep, and MFU = model FLOPs
actually needed (real tokens only, see :func:`train_flops`) per second / the machine's matmul peak measured in
the same run (same dtype). Other processes on the machine slow a CPU step 5-15x: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import numpy as np
import torch

from mmbert_dagster.recipe import ModelShape, load_recipe
from mmbert_dagster.train.device import autocast_for, resolve_device
from mmbert_dagster.train.masking import mask_tokens
from mmbert_dagster.train.model import build_model
from mmbert_dagster.train.packing import IGNORE, collate, pack_rows

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
MASK_RATE = 0.3


def make_docs(rng: np.random.Generator, budget: int, mean: float, std: float, vocab: int,
              max_len: int) -> list[np.ndarray]:
    """Documents ~N(mean, std) tokens, clipped to [8, max_len], until one more would exceed ``budget`` tokens."""
    docs, used = [], 0
    while True:
        n = int(np.clip(rng.normal(mean, std), 8, max_len)) if std > 0 else int(mean)
        if used + n > budget:
            return docs
        docs.append(np.concatenate([[2], rng.integers(5, vocab, n - 2), [3]]).astype(np.int64))
        used += n


def masked(docs: list[np.ndarray], vocab: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [mask_tokens(torch.from_numpy(d), MASK_RATE, mask_id=4, vocab_size=vocab, special_ids=SPECIALS.values(),
                        generator=g) for d in docs]


def packed_inputs(pairs, device) -> dict:
    batch = collate([ids.numpy() for ids, _ in pairs])
    batch.labels = torch.cat([lab for _, lab in pairs])[None]
    return batch.model_inputs(device)


def padded_inputs(pairs, device) -> dict:
    length = max(ids.numel() for ids, _ in pairs)
    ids = torch.zeros(len(pairs), length, dtype=torch.long)
    labels = torch.full((len(pairs), length), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(pairs), length, dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        ids[i, :x.numel()], labels[i, :x.numel()], mask[i, :x.numel()] = x, y, 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def hf_packed_inputs(pairs, device, row_tokens: int, half_window: int = 64) -> dict:
    """Rows of <= row_tokens tokens (documents whole, in order), padded to the longest row, with the mask dict."""
    rows = [[pairs[i] for i in row] for row in pack_rows([ids.numel() for ids, _ in pairs], row_tokens)]
    length = max(sum(x.numel() for x, _ in r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    pos = torch.zeros(len(rows), length, dtype=torch.long)
    doc = torch.full((len(rows), length), -1, dtype=torch.long)  # document index in the row, -1 = padding
    for r, docs in enumerate(rows):
        at = 0
        for d, (x, y) in enumerate(docs):
            n = x.numel()
            ids[r, at:at + n], labels[r, at:at + n] = x, y
            pos[r, at:at + n] = torch.arange(n)
            doc[r, at:at + n] = d
            at += n
    same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    band = (pos[:, :, None] - pos[:, None, :]).abs() <= half_window
    eye = torch.eye(length, dtype=torch.bool)[None]  # padding rows attend to themselves (no NaN rows)
    full, sliding = (same | eye)[:, None], ((same & band) | eye)[:, None]
    return {"input_ids": ids.to(device), "position_ids": pos.to(device), "labels": labels.to(device),
            "attention_mask": {"full_attention": full.to(device), "sliding_attention": sliding.to(device)}}


def train_flops(shape: ModelShape, vocab: int, lengths: list[int], n_masked: int) -> float:
    """FLOPs of one training step (forward + backward = 3 x forward) that the model actually needs.

    Matmuls of the encoder layers: 6 x layer params per real token. Attention scores and the weighted sum:
    4 x hidden x keys seen per query (the whole document on global layers, at most ``local_window + 1`` keys on
    local ones), x 3 for training. The MLM head (dense + tied decoder) only on the ``n_masked`` predicted
    tokens (sparse prediction). Embedding lookups, norms and activations are not counted.
    """
    h, inter = shape.hidden, shape.intermediate
    layer_params = 4 * h * h + 3 * h * inter  # Wqkv + Wo; GLU Wi (2 x inter) + Wo
    tokens = sum(lengths)
    dense = 6 * shape.layers * layer_params * tokens
    n_global = len(range(0, shape.layers, shape.global_every))
    w = shape.local_window // 2
    keys_global = sum(n * n for n in lengths)
    keys_local = sum(sum(min(n, i + w + 1) - max(0, i - w) for i in range(n)) if n > w + 1 else n * n
                     for n in lengths)
    attn = 12 * h * (n_global * keys_global + (shape.layers - n_global) * keys_local)
    head = 6 * (h * h + h * vocab) * n_masked
    return float(dense + attn + head)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5) -> float:
    """Measured FLOP/s of an n x n x n matmul in ``dtype`` (the roofline the MFU is relative to)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)


def variant_models(shape: ModelShape, vocab: int, context: int, variants: tuple[str, ...], device: torch.device):
    """One model per variant, all with the same (seeded) random weights: ours, and transformers' SDPA copies."""
    base = build_model(shape, vocab, SPECIALS, context, 10_000.0, attn="auto")
    models = {"packed": base}
    for name in ("padded", "hf_packed"):
        if name in variants:
            other = type(base)._from_config(copy.deepcopy(base.config), attn_implementation="sdpa")
            other.load_state_dict(base.state_dict())
            models[name] = other
    return {k: m.to(device) for k, m in models.items() if k in variants}


def time_steps(models: dict, makers: dict, batches: list, reps: int,
               device: torch.device) -> tuple[dict[str, list[list[float]]], dict[str, float]]:
    """Seconds of every training step, ``[variant][rep][batch]`` (batch 0, a warm-up, left out), and the peak
    CUDA memory of each variant (GiB). Variants take turns rep by rep."""
    from optimi import StableAdamW

    optims = {k: StableAdamW(m.parameters(), lr=1e-4, weight_decay=0.0) for k, m in models.items()}
    times: dict[str, list[list[float]]] = {k: [] for k in models}
    peak_memory: dict[str, float] = {}
    for _ in range(reps):
        for name, model in models.items():
            model.train()
            inputs = [makers[name](b, device) for b in batches]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rep = []
            for x in inputs:
                _sync(device)
                t0 = time.perf_counter()
                with autocast_for(device):
                    loss = model(**x).loss
                loss.backward()
                optims[name].step()
                optims[name].zero_grad(set_to_none=True)
                _sync(device)
                rep.append(time.perf_counter() - t0)
            times[name].append(rep[1:])
            if device.type == "cuda":
                peak_memory[name] = torch.cuda.max_memory_allocated(device) / 2**30
    return times, peak_memory


def bench(shape: ModelShape, *, vocab: int, context: int, budget: int, mean: float, std: float, steps: int = 6,
          reps: int = 3, device: str = "auto", seed: int = 0, variants: tuple[str, ...] = ("packed", "padded"),
          row_tokens: int = 0) -> dict:
    dev = resolve_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    models = variant_models(shape, vocab, context, variants, dev)
    row = row_tokens or context
    makers = {"packed": packed_inputs, "padded": padded_inputs,
              "hf_packed": lambda pairs, d: hf_packed_inputs(pairs, d, row, shape.local_window // 2)}
    batches = [masked(make_docs(rng, budget, mean, std, vocab, context), vocab, seed + i) for i in range(steps + 1)]
    times, peak_memory = time_steps(models, makers, batches, reps, dev)
    real = [sum(ids.numel() for ids, _ in b) for b in batches]
    slots = [len(b) * max(ids.numel() for ids, _ in b) for b in batches]
    flops = [train_flops(shape, vocab, [ids.numel() for ids, _ in b], sum(int((y != IGNORE).sum()) for _, y in b))
             for b in batches]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out = {
        "shape": f"{shape.layers}L/{shape.hidden}h/{shape.intermediate}i/{shape.heads}heads, vocab {vocab}, "
                 f"window {shape.local_window}",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype).replace("torch.", ""), "varlen_kernel": _kernel_name(dev), "context": context,
        "doc_length": f"uniform {int(mean)}" if std == 0 else f"N({mean:g}, {std:g}) clipped to [8, {context}]",
        "docs_per_step": statistics.mean(len(b) for b in batches), "real_tokens_per_step": statistics.mean(real),
        "padded_slots_per_real_token": sum(slots) / sum(real),
    }
    return out | throughput(times, peak_memory, tokens=sum(real[1:]), step_flops=sum(flops[1:]),
                            peak=matmul_peak(dev, dtype), row=row)


def _kernel_name(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    from mmbert_dagster.train.attention import varlen_kernel

    return getattr(varlen_kernel(), "name", "loop")


def throughput(times: dict[str, list[list[float]]], peak_memory: dict[str, float], *, tokens: int,
               step_flops: float, peak: float, row: int) -> dict:
    """tokens/s and MFU of each variant ("best": each batch's fastest rep; "median": the median rep) and the
    speed-ups of ours over the others."""
    steps = len(next(iter(times.values()))[0])
    best_s = {k: sum(min(r[i] for r in v) for i in range(steps)) for k, v in times.items()}
    median_s = {k: statistics.median(sum(r) for r in v) for k, v in times.items()}
    out = {"matmul_peak_tflops": peak / 1e12}
    for k in times:
        out[f"{k}_tokens_per_s_best"] = tokens / best_s[k]
        out[f"{k}_tokens_per_s_median"] = tokens / median_s[k]
        out[f"{k}_mfu_best"] = step_flops / best_s[k] / peak
        if k in peak_memory:
            out[f"{k}_peak_memory_gib"] = peak_memory[k]
    if {"packed", "padded"} <= set(times):
        out["speedup_best"] = best_s["padded"] / best_s["packed"]
        out["speedup_median"] = median_s["padded"] / median_s["packed"]
    if {"packed", "hf_packed"} <= set(times):
        out["hf_packed_row_tokens"] = row
        out["speedup_vs_hf_packed_best"] = best_s["hf_packed"] / best_s["packed"]
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description="packed vs padded training throughput")
    p.add_argument("--shape", default="tiny", help="a preset whose [model] shape to use (tiny, small, base)")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary size (0: the preset's tokenizer vocab_size)")
    p.add_argument("--context", type=int, default=1024, help="longest document (tokens)")
    p.add_argument("--mean", type=float, default=0, help="mean document length (0: context / 4)")
    p.add_argument("--std", type=float, default=-1, help="std of document lengths (-1: mean / 4)")
    p.add_argument("--uniform", action="store_true", help="every document exactly --context tokens")
    p.add_argument("--budget", type=int, default=0, help="real tokens per step (0: 4096 on CPU, 65536 on CUDA)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--variants", default="packed,padded")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--json", default="", help="also append the result as one JSON line to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.shape)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    mean = float(args.context) if args.uniform else (args.mean or args.context / 4)
    std = 0.0 if args.uniform else (args.std if args.std >= 0 else mean / 4)
    budget = args.budget or (65536 if cuda else 4096)
    result = bench(recipe.model, vocab=args.vocab or recipe.tokenizer.vocab_size, context=args.context,
                   budget=max(budget, args.context), mean=mean, std=std, steps=args.steps, reps=args.reps,
                   device=args.device, variants=tuple(args.variants.split(",")))
    line = json.dumps(result)
    print(json.dumps(result, indent=1), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
