"""``run_stage``: the one training loop every stage (pretrain, midtrain, the three decays) runs.

Read top to bottom: set up (devices, data, tokenizer), build or load the model at the stage's context, build
the optimizer, load the checkpoint if there is one — from then on a fresh start and a resume are the same code —
then train for the stage's token budget, checkpointing every ``checkpoint_every`` optimizer steps, and finally
measure held-out MLM loss and write a Hugging Face folder.

One optimizer step = ``accum`` packed micro-batches per rank (``stage.batch_tokens`` tokens in all, see
``optim.micro_batch_geometry``). The loss of every micro-batch is its summed cross-entropy divided by the
number of predicted tokens in the WHOLE step (all micro-batches, all ranks), so accumulation and data
parallelism give exactly the gradient of one big batch. Devices: CPU in fp32 (bf16 is 70-140x slower on CPUs
without AVX-512/AMX); CUDA with bf16 autocast (weights and optimizer state stay fp32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from mmbert_dagster.artifacts import MANIFEST
from mmbert_dagster.data.shards import ShardReader
from mmbert_dagster.data.tokenizer import special_token_ids
from mmbert_dagster.recipe import ModelShape, Stage
from mmbert_dagster.train import distributed
from mmbert_dagster.train.checkpoint import CheckpointError, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from mmbert_dagster.train.masking import mask_batch, micro_batch_generator, stable_seed
from mmbert_dagster.train.metrics import MetricsLog
from mmbert_dagster.train.model import build_model, context_of, extend_context, load_model
from mmbert_dagster.train.optim import build_optimizer, clip_gradients, micro_batch_geometry, set_lr
from mmbert_dagster.train.packing import IGNORE, DataPosition, Packer
from mmbert_dagster.train.schedule import lr_at, total_steps_for, warmup_steps_for

DEFAULT_MICRO_BATCH_TOKENS = {"cpu": 8192, "cuda": 32768}  # per rank; 65536 OOMs base (256k vocab) on 141 GB
DEFAULT_CHECKPOINT_EVERY = 100  # optimizer steps
SHUFFLE_WINDOW_DOCS = 64  # pieces of this many consecutive documents are read in a shuffled order (packing.py)
SUMMARY_JSON = "trainer_summary.json"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def tokenizer_info(tokenizer_dir: Path) -> tuple[int, dict[str, int]]:
    """(vocabulary size, special token ids) of a tokenizer folder."""
    from tokenizers import Tokenizer

    file = Path(tokenizer_dir) / "tokenizer.json"
    if not file.is_file():
        raise ValueError(f"{file}: missing; {tokenizer_dir} is not a tokenizer folder")
    tok = Tokenizer.from_file(str(file))
    specials = special_token_ids(Path(tokenizer_dir))
    missing = {"pad", "cls", "sep", "mask"} - set(specials)
    if missing:
        raise ValueError(f"{tokenizer_dir}: the tokenizer declares no {sorted(missing)} token(s)")
    return tok.get_vocab_size(), specials


def autocast_for(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # never bf16 on CPU


@torch.no_grad()
def heldout_loss(model, texts: Sequence[str], *, tokenizer_dir: Path, stage: Stage, budget: int,
                 special_ids: dict[str, int], vocab_size: int, seed: int, device: torch.device) -> float | None:
    """Mean MLM cross-entropy on ``texts``, tokenized like the shards, masked at the stage's rate with a fixed seed."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    tok.encode_special_tokens = True  # as in the shards: a literal "[MASK]" in text is text
    docs = [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch([t for t in texts if t])]
    docs = [d for d in docs if d.size]
    if not docs:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(Packer(docs, budget, stage.context_length, special_ids, cycle=False)):
        batch = mask_batch(batch, stage.mask_rate, mask_id=special_ids["mask"], vocab_size=vocab_size,
                           special_ids=special_ids.values(), generator=micro_batch_generator(seed, "heldout", i))
        n = int((batch.labels != IGNORE).sum())
        with autocast_for(device):
            out = model(**batch.model_inputs(device))
        total += float(out.loss) * n
        count += n
    model.train(was_training)
    return total / count if count else None


def write_hf_folder(model, tokenizer_dir: Path, out_dir: Path) -> None:
    """config.json + model.safetensors + the tokenizer files: loads with AutoModelForMaskedLM / pipeline offline."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file() and f.name != MANIFEST:
            shutil.copy2(f, out_dir / f.name)


def _check_same_model(config, shape: ModelShape, vocab_size: int, folder) -> None:
    have = (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads,
            config.local_attention, config.vocab_size)
    want = (shape.layers, shape.hidden, shape.intermediate, shape.heads, shape.local_window, vocab_size)
    if have != want:
        raise ValueError(f"{folder}: model (layers, hidden, intermediate, heads, window, vocab) = {have}, but this "
                         f"stage's shape and tokenizer give {want}")


def _check_resumable(saved: dict, identity: dict, state_dir: Path) -> None:
    for key, want in identity.items():
        if saved.get(key) != want:
            raise CheckpointError(
                f"{state_dir}/trainer_state belongs to another run ({key}: checkpoint {saved.get(key)!r}, "
                f"this run {want!r}); delete it to restart the stage")


def run_stage(
    stage: Stage,
    shape: ModelShape,
    *,
    shards_dir: Path | str,
    tokenizer_dir: Path | str,
    out_dir: Path | str,
    state_dir: Path | str,
    init_from: Path | str | None = None,
    heldout_texts: Sequence[str] | None = None,
    seed: int = 0,
    device: str = "auto",
    micro_batch_tokens: int | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    log: Callable[[str], None] = print,
    max_steps: int | None = None,
    attn: str = "auto",
) -> dict:
    """Train one stage; resume from ``state_dir/trainer_state`` if present. See the module docstring.

    ``init_from``: the previous stage's HF folder (None: random init, seeded by ``seed``). ``max_steps``: stop
    after this many optimizer steps in total, without writing the output (a simulated interruption).
    ``attn``: "auto" (packed per-document attention; always use it for training) — "sdpa"/"eager" only for
    comparisons. Returns metrics: steps, tokens, tokens_per_s, initial_loss, final_loss, heldout_loss,
    losses, lr, seconds, plus total_steps, interrupted, resumed_from, accum, micro_batch_budget, world.
    """
    t_start = time.perf_counter()
    out_dir, state_dir, tokenizer_dir = Path(out_dir), Path(state_dir), Path(tokenizer_dir)
    dev = resolve_device(device)
    info = distributed.setup(dev.type)
    if dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
    log = log if info.is_main else (lambda *_: None)

    # ---- data and tokenizer
    reader = ShardReader(Path(shards_dir))
    vocab_size, specials = tokenizer_info(tokenizer_dir)
    reader.check_tokenizer(tokenizer_dir, vocab_size, specials)
    never_mask = sorted(set(specials.values()))

    # ---- model: the previous stage's weights or a seeded random init, at this stage's context
    torch.manual_seed(seed)
    if init_from:
        model = load_model(init_from, attn)
        _check_same_model(model.config, shape, vocab_size, init_from)
    else:
        model = build_model(shape, vocab_size, specials, stage.context_length, stage.rope_theta, attn)
    if context_of(model) != (stage.context_length, float(stage.rope_theta)):
        log(f"{stage.name}: context {context_of(model)} -> ({stage.context_length}, {stage.rope_theta}) "
            f"(max positions, global RoPE θ)")
        extend_context(model, stage.context_length, stage.rope_theta)
    model.to(dev)
    distributed.broadcast_parameters(model, info)
    optimizer = build_optimizer(model, stage)

    # ---- schedule and micro-batch geometry
    total_steps, warmup_steps = total_steps_for(stage), warmup_steps_for(stage)
    micro = micro_batch_tokens or min(DEFAULT_MICRO_BATCH_TOKENS.get(dev.type, 8192),
                                      math.ceil(stage.batch_tokens / info.world))
    accum, budget = micro_batch_geometry(stage.batch_tokens, micro, info.world, stage.context_length)

    # ---- state: fresh, or the checkpoint's; from here on a resume is the same code path as a fresh start
    identity = {"stage": json.loads(json.dumps(dataclasses.asdict(stage))),
                "shape": json.loads(json.dumps(dataclasses.asdict(shape))), "seed": seed, "world": info.world,
                "shuffle_window": SHUFFLE_WINDOW_DOCS}
    state = {"step": 0, "tokens": 0, "losses": [], "lrs": [], "seconds": 0.0,
             "positions": [DataPosition(0, r, 0).to_dict() for r in range(info.world)], **identity}
    random.seed(stable_seed(seed, "python", info.rank))
    np.random.seed(stable_seed(seed, "numpy", info.rank) % 2**32)
    torch.manual_seed(stable_seed(seed, "torch", info.rank))
    loaded = load_checkpoint(state_dir, model=model, optimizer=optimizer, device=dev)
    if loaded is not None:
        saved, rngs = loaded
        _check_resumable(saved, identity, state_dir)
        state = saved
        restore_rng(rngs[info.rank])
        log(f"{stage.name}: resuming from {state_dir / 'trainer_state'} at step {state['step']}/{total_steps}")
    resumed_from = state["step"]
    packer = Packer(reader, budget, stage.context_length, specials, rank=info.rank, world=info.world,
                    position=DataPosition.from_dict(state["positions"][info.rank]),
                    shuffle_window=SHUFFLE_WINDOW_DOCS, seed=stable_seed(seed, "pieces"))
    metrics = MetricsLog(out_dir, resume_step=state["step"], enabled=info.is_main)
    log(f"{stage.name}: {total_steps} steps x {stage.batch_tokens} tokens ({warmup_steps} warmup, decay "
        f"{stage.lr_decay}); {info.world} rank(s) x {accum} micro-batch(es) of <= {budget} tokens; "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {dev}; "
        f"metrics in {metrics.path}{' + TensorBoard' if metrics.tensorboard else ' (tensorboard not installed)'}")

    # ---- train
    model.train()
    stop = total_steps if max_steps is None else min(total_steps, max_steps)
    run_tokens, run_seconds, epoch = 0, 0.0, packer.position.epoch
    while state["step"] < stop:
        step, t_step = state["step"], time.perf_counter()
        lr = lr_at(step, total_steps, warmup_steps, stage.lr_peak, stage.lr_final, stage.lr_decay)
        set_lr(optimizer, lr)
        # this rank's micro-batches; masks drawn from generators derived from the step (exact resume)
        raw = [next(packer) for _ in range(accum)]
        batches = [
            mask_batch(b, stage.mask_rate, mask_id=specials["mask"], vocab_size=vocab_size, special_ids=never_mask,
                       generator=micro_batch_generator(seed, stage.name, info.rank, step, i))
            for i, b in enumerate(raw)
        ]
        counts = torch.tensor([
            sum(int((b.labels != IGNORE).sum()) for b in batches),  # predicted tokens
            sum(b.n_tokens for b in raw),  # real tokens
            sum(int((~torch.isin(b.input_ids, torch.tensor(never_mask))).sum()) for b in raw),  # maskable
        ], dtype=torch.float64, device=dev)  # on the device: NCCL reduces CUDA tensors only
        n_predicted, n_tokens, n_maskable = distributed.all_reduce_sum(counts, info).tolist()
        num_items = torch.tensor(n_predicted, device=dev)
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        for batch in batches:
            with autocast_for(dev):
                out = model(**batch.model_inputs(dev), num_items_in_batch=num_items)  # sum CE / step's count
            out.loss.backward()
            loss_sum += out.loss.detach().double()
        distributed.all_reduce_gradients(model, info)
        grad_norm = clip_gradients(model, stage.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(distributed.all_reduce_sum(loss_sum, info))

        seconds = time.perf_counter() - t_step
        state["step"] += 1
        state["tokens"] += int(n_tokens)
        state["seconds"] += seconds
        state["losses"].append(loss)
        state["lrs"].append(lr)
        run_tokens += int(n_tokens)
        run_seconds += seconds
        row = {"loss": loss, "lr": lr, "mask_rate": n_predicted / max(n_maskable, 1),
               "tokens_per_s": n_tokens / seconds, "grad_norm": grad_norm, "tokens": state["tokens"],
               "epoch": packer.position.epoch}
        metrics.write(state["step"], row)
        if row["epoch"] > epoch:
            epoch = row["epoch"]
            log(f"{stage.name}: WARNING the shards ran out; repeating them (epoch {epoch}) — "
                f"build them to the stage's token budget")
        log(f"{stage.name} step {state['step']}/{total_steps} loss {loss:.4f} lr {lr:.3g} mask {row['mask_rate']:.3f} "
            f"grad {grad_norm:.3f} {row['tokens_per_s']:.0f} tok/s")

        if state["step"] % checkpoint_every == 0 or state["step"] == total_steps:
            state["positions"] = distributed.gather_objects(packer.position.to_dict(), info)
            rngs = distributed.gather_objects(capture_rng(), info)
            if info.is_main:
                save_checkpoint(state_dir, model=model, optimizer=optimizer, state=state, rng=rngs)
            distributed.barrier(info)

    # ---- held-out loss and the Hugging Face folder (rank 0), unless interrupted
    interrupted = state["step"] < total_steps
    heldout = None
    if not interrupted and info.is_main:
        if heldout_texts:
            heldout = heldout_loss(model, heldout_texts, tokenizer_dir=tokenizer_dir, stage=stage, budget=budget,
                                   special_ids=specials, vocab_size=vocab_size, seed=seed, device=dev)
            metrics.write(state["step"], {"loss": heldout}, prefix="heldout")
            log(f"{stage.name}: held-out MLM loss {heldout:.4f} ({len(heldout_texts)} texts)")
        write_hf_folder(model, tokenizer_dir, out_dir)
    metrics.close()

    result = {
        "stage": stage.name,
        "steps": state["step"],
        "total_steps": total_steps,
        "tokens": state["tokens"],
        "tokens_per_s": run_tokens / run_seconds if run_seconds else 0.0,
        "initial_loss": state["losses"][0] if state["losses"] else None,
        "final_loss": state["losses"][-1] if state["losses"] else None,
        "heldout_loss": heldout,
        "losses": list(state["losses"]),
        "lr": list(state["lrs"]),
        "seconds": time.perf_counter() - t_start,
        "train_seconds_total": state["seconds"],
        "interrupted": interrupted,
        "resumed_from": resumed_from,
        "epochs": packer.position.epoch,
        "accum": accum,
        "micro_batch_budget": budget,
        "world": info.world,
        "device": str(dev),
        "context": list(context_of(model)),
    }
    if not interrupted and info.is_main:
        (out_dir / SUMMARY_JSON).write_text(json.dumps(result, indent=1))
        log(f"{stage.name}: done, {result['steps']} steps, {result['tokens']:,} tokens, final loss "
            f"{result['final_loss']:.4f}, {result['tokens_per_s']:.0f} tok/s -> {out_dir}")
    distributed.barrier(info)
    distributed.teardown(info)
    return result
