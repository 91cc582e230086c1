"""Warmup–stable–decay learning rate: a pure function of the step, plus steps derived from token budgets.

Steps are 0-based; ``lr_at(step)`` is the rate used BY optimizer step ``step``.

* warmup: linear from ``lr_peak / warmup_steps`` (step 0) to ``lr_peak`` (step ``warmup_steps - 1``);
* ``decay="none"``: then constant ``lr_peak`` to the end (pre-training, mid-training);
* ``decay="1-sqrt"`` / ``"linear"``: after warmup, decay over the WHOLE rest of the stage, from ``lr_peak`` at
  step ``warmup_steps`` to exactly ``lr_final`` at the last step ``total_steps - 1`` (mmBERT's decay stages are
  one long decay; ``1-sqrt``: lr = final + (peak - final) * (1 - sqrt(progress))).

Batch-size warm-up (``stage.batch_warmup_tokens``, mmBERT's pre-training: 60B tokens from 48 sequences): the
micro-batches per step (:func:`accum_schedule`) grow linearly with the tokens the stage has seen, from
``batch_warmup_min_tokens`` to ``batch_tokens``; the steps then come from that table, not from
``tokens // batch_tokens``. It is a pure function of the stage and the micro-batch geometry, so a resumed run
continues the same table.
"""

from __future__ import annotations

import math

from mmbert_dagster.recipe import Stage

DECAYS = ("none", "1-sqrt", "linear")


def lr_at(step: int, total_steps: int, warmup_steps: int, lr_peak: float, lr_final: float, decay: str) -> float:
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return lr_peak * (step + 1) / warmup_steps
    if decay == "none":
        return lr_peak
    decay_steps = total_steps - 1 - warmup_steps  # steps after the first post-warmup step
    progress = 1.0 if decay_steps <= 0 else min(max((step - warmup_steps) / decay_steps, 0.0), 1.0)
    shape = 1.0 - math.sqrt(progress) if decay == "1-sqrt" else 1.0 - progress
    return lr_final + (lr_peak - lr_final) * shape


def accum_schedule(stage: Stage, accum: int, tokens_per_micro_batch: int) -> list[int] | None:
    """Micro-batches per rank of every optimizer step under batch-size warm-up, or None without one.

    ``accum``: micro-batches of the full batch; ``tokens_per_micro_batch``: the nominal tokens one micro-batch of
    every rank adds (world x budget). Step k uses ``clamp(ceil(b_k / tokens_per_micro_batch), 1, accum)`` with
    ``b_k = min + (batch_tokens - min) * min(t_k / batch_warmup_tokens, 1)``, ``t_k`` the nominal tokens before
    step k; steps run until the nominal tokens reach the stage's budget."""
    if stage.batch_warmup_tokens <= 0:
        return None
    low = stage.batch_warmup_min_tokens or stage.context_length
    steps, seen = [], 0
    while seen < stage.tokens or not steps:
        grown = low + (stage.batch_tokens - low) * min(seen / stage.batch_warmup_tokens, 1.0)
        k = min(accum, max(1, math.ceil(grown / tokens_per_micro_batch)))
        steps.append(k)
        seen += k * tokens_per_micro_batch
    return steps


def warmup_steps_in(accums: list[int], tokens_per_micro_batch: int, warmup_tokens: int) -> int:
    """The LR warm-up's steps under a batch-size warm-up: those before ``warmup_tokens`` nominal tokens."""
    seen = 0
    for i, k in enumerate(accums):
        if seen >= warmup_tokens:
            return i
        seen += k * tokens_per_micro_batch
    return len(accums)


def total_steps_for(stage: Stage) -> int:
    """Optimizer steps of a stage: its token budget over tokens per step, at least 1."""
    return max(1, stage.tokens // stage.batch_tokens)


def warmup_steps_for(stage: Stage) -> int:
    return min(total_steps_for(stage), stage.warmup_tokens // stage.batch_tokens)
