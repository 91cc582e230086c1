"""``run_stage``: the one training loop every stage (pretrain, midtrain, the three decays) runs.

Read top to bottom: join the ranks, open the inputs (refused unless shards and init checkpoint share the stage's
tokenizer), build or load the model at the stage's context, build the optimizer, load the checkpoint if there is
one — from then on a fresh start and a resume are the same code — then train for the stage's token budget,
checkpointing every ``checkpoint_every`` optimizer steps, and finally measure held-out MLM loss and write a
Hugging Face folder with the stage's summary.

The pieces: ``inputs`` (shards, tokenizer, their checks), ``model``, ``optim``, ``state`` (run identity and
progress, i.e. ``state.json``), ``step`` (masked micro-batches and one optimizer step; how the loss is scaled for
accumulation and data parallelism), ``checkpoint``, ``metrics``, ``heldout``, ``export``, ``device``
(devices, autocast, the default micro-batch size), ``distributed`` (ranks, DDP).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmbert_dagster.recipe import ModelShape, Stage
from mmbert_dagster.train import distributed
from mmbert_dagster.train.checkpoint import (TRAINER_STATE, CheckpointError, capture_rng, load_checkpoint,
                                             restore_rng, save_checkpoint)
from mmbert_dagster.train.device import micro_batch_tokens_for, resolve_device
from mmbert_dagster.train.distributed import DistInfo
from mmbert_dagster.train.export import write_hf_folder, write_summary
from mmbert_dagster.train.heldout import heldout_loss
from mmbert_dagster.train.inputs import Vocabulary, open_inputs
from mmbert_dagster.train.masking import stable_seed
from mmbert_dagster.train.metrics import MetricsLog
from mmbert_dagster.train.model import (
    build_model,
    check_shape,
    context_of,
    extend_context,
    load_model,
    local_rope_theta_of,
)
from mmbert_dagster.train.optim import build_optimizer, micro_batch_geometry
from mmbert_dagster.train.packing import Packer
from mmbert_dagster.train.schedule import (
    accum_schedule,
    lr_at,
    total_steps_for,
    warmup_steps_for,
    warmup_steps_in,
)
from mmbert_dagster.train.state import RunIdentity, TrainState
from mmbert_dagster.train.step import StepResult, masked_micro_batches, train_step

DEFAULT_CHECKPOINT_EVERY = 100  # optimizer steps between resume checkpoints


@dataclass(frozen=True)
class Plan:
    """A stage's schedule and micro-batch geometry on this world and device (``optim.micro_batch_geometry``)."""

    stage: Stage
    total_steps: int
    warmup_steps: int
    accum: int  # micro-batches per rank and optimizer step (of the full batch)
    budget: int  # tokens per micro-batch, at most
    accums: tuple[int, ...] | None = None  # per step, under a batch-size warm-up (schedule.accum_schedule)

    @classmethod
    def of(cls, stage: Stage, micro_batch_tokens: int, world: int) -> Plan:
        accum, budget = micro_batch_geometry(stage.batch_tokens, micro_batch_tokens, world, stage.context_length)
        accums = accum_schedule(stage, accum, budget * world)
        if accums is None:
            return cls(stage, total_steps_for(stage), warmup_steps_for(stage), accum, budget)
        return cls(stage, len(accums), warmup_steps_in(accums, budget * world, stage.warmup_tokens), accum, budget,
                   tuple(accums))

    def accum_at(self, step: int) -> int:
        """Micro-batches per rank of optimizer step ``step``."""
        return self.accum if self.accums is None else self.accums[step]

    def lr(self, step: int) -> float:
        s = self.stage
        return lr_at(step, self.total_steps, self.warmup_steps, s.lr_peak, s.lr_final, s.lr_decay)


def run_stage(stage: Stage, shape: ModelShape, *, shards_dir: Path | str, tokenizer_dir: Path | str,
              out_dir: Path | str, state_dir: Path | str, init_from: Path | str | None = None,
              heldout_texts: Sequence[str] | None = None, seed: int = 0, device: str = "auto",
              micro_batch_tokens: int | None = None, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
              log: Callable[[str], None] = print, max_steps: int | None = None, attn: str = "auto") -> dict:
    """Train one stage, resuming from ``state_dir/trainer_state`` if present; return ``trainer_summary.json``'s
    metrics. ``init_from``: the previous stage's HF folder (None: random init, seeded by ``seed``).
    ``micro_batch_tokens``: per rank (None or 0: ``device.MICRO_BATCH_TOKENS``). ``max_steps``: stop after this many
    steps in total, without writing the output (a simulated interruption). ``attn``: "auto" (packed per-document
    attention) — "sdpa"/"eager" only for comparisons."""
    t_start = time.perf_counter()
    out_dir, state_dir, tokenizer_dir = Path(out_dir), Path(state_dir), Path(tokenizer_dir)
    info = distributed.setup(resolve_device(device).type)
    dev = resolve_device(device, info.local_rank)
    log = log if info.is_main else (lambda *_: None)

    # ---- inputs, model, optimizer; then the checkpoint's state if there is one (else a fresh one): one code path
    reader, vocab = open_inputs(Path(shards_dir), tokenizer_dir, init_from)
    model = initial_model(stage, shape, vocab, init_from, seed=seed, attn=attn, log=log).to(dev)
    optimizer = build_optimizer(model, stage)
    plan = Plan.of(stage, micro_batch_tokens_for(dev, micro_batch_tokens), info.world)
    state = start_or_resume(state_dir, RunIdentity(stage, shape, seed, info.world), model, optimizer, info, dev, log)
    resumed = TrainState(state.run, state.step, state.tokens, state.seconds)  # this run's throughput starts here
    packer = Packer(reader, plan.budget, stage.context_length, vocab.specials, rank=info.rank, world=info.world,
                    position=state.positions[info.rank], shuffle_window=stage.shuffle_window_docs,
                    seed=stable_seed(seed, "pieces"))
    trained = distributed.data_parallel(model, info, dev)  # what the steps run; `model` is what is saved
    metrics = MetricsLog(out_dir, resume_step=state.step, enabled=info.is_main)
    log_plan(plan, info, model, dev, metrics, log)

    # ---- train
    model.train()
    stop = plan.total_steps if max_steps is None else min(plan.total_steps, max_steps)
    while state.step < stop:
        epoch, t_step, lr = packer.position.epoch, time.perf_counter(), plan.lr(state.step)
        batches = list(masked_micro_batches(packer, plan.accum_at(state.step), rate=stage.mask_rate, vocab=vocab,
                                            seed_parts=(seed, stage.name, info.rank, state.step)))
        step = train_step(trained, optimizer, batches, lr=lr, grad_clip=stage.grad_clip, info=info, device=dev)
        seconds = time.perf_counter() - t_step
        state.record(loss=step.loss, lr=lr, tokens=step.n_tokens, seconds=seconds)
        log_step(plan, state, step, seconds, metrics, log, epochs=(epoch, packer.position.epoch))
        if state.step % checkpoint_every == 0 or state.step == plan.total_steps:
            save_state(state_dir, model, optimizer, state, packer, info)
    del trained  # a DDP module that outlives its process group can hang gloo when it is freed

    # ---- held-out loss, the Hugging Face folder and the summary (rank 0), unless interrupted
    complete, heldout = info.is_main and state.step == plan.total_steps, None
    if complete:
        heldout = heldout_loss(model, heldout_texts or [], tokenizer_dir=tokenizer_dir, stage=stage,
                               budget=plan.budget, vocab=vocab, seed=seed, device=dev)
        write_hf_folder(model, tokenizer_dir, out_dir)
    result = summary(plan, state, resumed, heldout=heldout, epochs=packer.position.epoch, info=info, device=dev,
                     context=context_of(model), seconds=time.perf_counter() - t_start)
    if complete:
        write_summary(out_dir, result)
        log_end(result, heldout_texts, metrics, out_dir, log)
    metrics.close()
    distributed.barrier(info)
    distributed.teardown(info)
    return result


def initial_model(stage: Stage, shape: ModelShape, vocab: Vocabulary, init_from: Path | str | None, *, seed: int,
                  attn: str, log: Callable[[str], None]):
    """The previous stage's weights or a random init seeded by ``seed``, at this stage's context (extended)."""
    torch.manual_seed(seed)
    if init_from:
        model = load_model(init_from, attn)
        check_shape(model, shape, vocab.size, init_from)
    else:
        model = build_model(shape, vocab.size, vocab.specials, stage.context_length, stage.rope_theta, attn)
    have = (*context_of(model), local_rope_theta_of(model))
    want = (stage.context_length, float(stage.rope_theta), float(stage.local_rope_theta) or have[2])
    if have != want:
        log(f"{stage.name}: context {have} -> {want} (max positions, global RoPE θ, local RoPE θ)")
        extend_context(model, stage.context_length, stage.rope_theta, stage.local_rope_theta)
    return model


def start_or_resume(state_dir: Path, run: RunIdentity, model, optimizer, info: DistInfo, device: torch.device,
                    log: Callable[[str], None]) -> TrainState:
    """Seed this rank's RNGs and start fresh, or load the checkpoint in ``state_dir`` if it is this run's."""
    random.seed(stable_seed(run.seed, "python", info.rank))
    np.random.seed(stable_seed(run.seed, "numpy", info.rank) % 2**32)
    torch.manual_seed(stable_seed(run.seed, "torch", info.rank))
    loaded = load_checkpoint(state_dir, model=model, optimizer=optimizer, device=device)
    if loaded is None:
        return TrainState.fresh(run)
    saved, rngs = loaded
    try:
        state = TrainState.from_dict(saved, run)
    except ValueError as e:
        raise CheckpointError(f"{state_dir / TRAINER_STATE} belongs to another run ({e}); delete it to restart "
                              f"the stage") from e
    restore_rng(rngs[info.rank])
    log(f"{run.stage.name}: resuming from {state_dir / TRAINER_STATE} at step {state.step}/"
        f"{total_steps_for(run.stage)}")
    return state


def save_state(state_dir: Path, model, optimizer, state: TrainState, packer: Packer, info: DistInfo) -> None:
    """Checkpoint (rank 0 writes): weights, optimizer, ``state`` with every rank's data position and RNG states."""
    state.positions = distributed.gather_objects(packer.position, info)
    rngs = distributed.gather_objects(capture_rng(), info)
    if info.is_main:
        save_checkpoint(state_dir, model=model, optimizer=optimizer, state=state.to_dict(), rng=rngs)
    distributed.barrier(info)


def summary(plan: Plan, state: TrainState, resumed: TrainState, *, heldout: float | None, epochs: int,
            info: DistInfo, device: torch.device, context: tuple[int, float], seconds: float) -> dict:
    """The stage's metrics (``trainer_summary.json``); throughput counts this run's steps only."""
    run_tokens, run_seconds = state.tokens - resumed.tokens, state.seconds - resumed.seconds
    return {
        "stage": plan.stage.name, "steps": state.step, "total_steps": plan.total_steps, "tokens": state.tokens,
        "tokens_per_s": run_tokens / run_seconds if run_seconds else 0.0,
        "initial_loss": state.losses[0] if state.losses else None,
        "final_loss": state.losses[-1] if state.losses else None,
        "heldout_loss": heldout, "losses": list(state.losses), "lr": list(state.lrs), "seconds": seconds,
        "train_seconds_total": state.seconds, "interrupted": state.step < plan.total_steps,
        "resumed_from": resumed.step, "epochs": epochs, "accum": plan.accum, "micro_batch_budget": plan.budget,
        "world": info.world, "device": str(device), "context": list(context),
    }


def log_plan(plan: Plan, info: DistInfo, model, device: torch.device, metrics: MetricsLog, log) -> None:
    s = plan.stage
    grow = (f" (batch-size warm-up over {s.batch_warmup_tokens} tokens: {plan.accums[0]} -> {plan.accum} "
            f"micro-batches)" if plan.accums else "")
    log(f"{s.name}: {plan.total_steps} steps x {s.batch_tokens} tokens ({plan.warmup_steps} warmup, decay "
        f"{s.lr_decay}); {info.world} rank(s) x {plan.accum} micro-batch(es) of <= {plan.budget} tokens{grow}; "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}; "
        f"metrics in {metrics.path}{' + TensorBoard' if metrics.tensorboard else ' (tensorboard not installed)'}")


def log_step(plan: Plan, state: TrainState, step: StepResult, seconds: float, metrics: MetricsLog, log,
             epochs: tuple[int, int]) -> None:
    """One ``metrics.jsonl`` row and one log line; a warning when the shards ran out during the step."""
    row = {"loss": step.loss, "lr": state.lrs[-1], "mask_rate": step.mask_rate, "tokens_per_s": step.n_tokens / seconds,
           "grad_norm": step.grad_norm, "tokens": state.tokens, "epoch": epochs[1]}
    name = plan.stage.name
    metrics.write(state.step, row)
    if epochs[1] > epochs[0]:
        log(f"{name}: WARNING the shards ran out; repeating them (epoch {epochs[1]}) — build them to the stage's "
            f"token budget")
    log(f"{name} step {state.step}/{plan.total_steps} loss {step.loss:.4f} lr {row['lr']:.3g} mask "
        f"{row['mask_rate']:.3f} grad {step.grad_norm:.3f} {row['tokens_per_s']:.0f} tok/s")


def log_end(result: dict, heldout_texts, metrics: MetricsLog, out_dir: Path, log) -> None:
    if result["heldout_loss"] is not None:
        metrics.write(result["steps"], {"loss": result["heldout_loss"]}, prefix="heldout")
        log(f"{result['stage']}: held-out MLM loss {result['heldout_loss']:.4f} ({len(heldout_texts)} texts)")
    log(f"{result['stage']}: done, {result['steps']} steps, {result['tokens']:,} tokens, final loss "
        f"{result['final_loss']:.4f}, {result['tokens_per_s']:.0f} tok/s -> {out_dir}")
