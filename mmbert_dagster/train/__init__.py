"""The training core every stage uses: ``run_stage`` (loop), ``train_checkpoint`` (stage_run), and their parts.

stage_run (a training asset's life cycle: resume folder, launcher, probes, the checkpoint folder) · loop (the
training loop) · step (masked micro-batches, one optimizer step) · state (run identity and progress: state.json) ·
inputs (shards, tokenizer, init checkpoint and their checks) · model (transformers' ModernBertForMaskedLM from a
ModelShape; context extension) · attention (packed per-document attention registered with transformers'
AttentionInterface) · packing (documents -> one-row micro-batches with cu_seqlens) · masking (80/10/10 MLM) ·
schedule (warmup-stable-decay LR) · optim (StableAdamW, clipping, accumulation) · checkpoint (atomic, exact
resume) · heldout (held-out MLM loss) · export (the files of a checkpoint folder, their readers) · metrics
(JSONL/TensorBoard) · device (device, autocast, default micro-batch) · distributed (torchrun, DDP) · cli (torchrun
entry point) · throughput (packed vs padded training throughput; benchmarks/ times it).
"""

# The modules whose code decides what a stage trains and writes (hashed into the training assets' code version).
CORE_MODULES = tuple(f"{__name__}.{m}" for m in (
    "loop", "step", "state", "inputs", "model", "attention", "packing", "masking", "schedule", "optim",
    "checkpoint", "distributed", "device", "heldout", "export", "stage_run"))

_LAZY = {"run_stage": "loop", "train_checkpoint": "stage_run", "TrainSettings": "stage_run"}


def __getattr__(name: str):
    if name in _LAZY:  # lazy: importing the package must not pull in torch/transformers
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
