"""Warmup–stable–decay learning rate: a pure function of the step, plus steps derived from token budgets.

Steps are 0-based; ``lr_at(step)`` is the rate used BY optimizer step ``step``.

* warmup: linear from ``lr_peak / warmup_steps`` (step 0) to ``lr_peak`` (step ``warmup_steps - 1``);
* ``decay="none"``: then constant ``lr_peak`` to the end (pre-training, mid-training);
* ``decay="1-sqrt"`` / ``"linear"``: after warmup, decay over the WHOLE rest of the stage, from ``lr_peak`` at
  step ``warmup_steps`` to exactly ``lr_final`` at the last step ``total_steps - 1`` (mmBERT's decay stages are
  one long decay; ``1-sqrt``: lr = final + (peak - final) * (1 - sqrt(progress))).
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


def total_steps_for(stage: Stage) -> int:
    """Optimizer steps of a stage: its token budget over tokens per step, at least 1."""
    return max(1, stage.tokens // stage.batch_tokens)


def warmup_steps_for(stage: Stage) -> int:
    return min(total_steps_for(stage), stage.warmup_tokens // stage.batch_tokens)
