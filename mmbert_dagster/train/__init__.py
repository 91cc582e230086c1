"""The training core every stage uses: ``run_stage`` (loop) and the small modules it is built from.

model (transformers' ModernBertForMaskedLM from a ModelShape; context extension) · attention (packed
per-document attention registered with transformers' AttentionInterface) · packing (documents -> one-row
micro-batches with cu_seqlens) · masking (80/10/10 MLM) · schedule (warmup-stable-decay LR) · optim
(StableAdamW, clipping, accumulation) · checkpoint (atomic, exact resume) · metrics (JSONL/TensorBoard) ·
distributed (torchrun data parallelism) · cli (torchrun entry point) · bench (packed vs padded throughput).
"""


def __getattr__(name: str):
    if name == "run_stage":  # lazy: importing the package must not pull in torch/transformers
        from mmbert_dagster.train.loop import run_stage

        return run_stage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
