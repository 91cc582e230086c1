"""StableAdamW (``optimi``) from a stage's settings, gradient clipping, and the micro-batch geometry.

* lr, betas, weight decay from the ``Stage``; weight decay is fully decoupled from the learning rate
  (``decouple_lr=True``, scaled by lr / lr_peak, as in ModernBERT/mmBERT) and skips biases and norm weights;
* gradient clipping to ``stage.grad_clip`` (global L2 norm) after gradients are summed over micro-batches
  and ranks;
* accumulation: an optimizer step of ``stage.batch_tokens`` tokens is ``accum`` micro-batches per rank of at
  most ``budget`` tokens each (:func:`micro_batch_geometry`).
"""

from __future__ import annotations

import math

import torch
from optimi import StableAdamW, param_groups_weight_decay

from mmbert_dagster.recipe import Stage


def build_optimizer(model: torch.nn.Module, stage: Stage) -> StableAdamW:
    groups = param_groups_weight_decay(model, weight_decay=stage.weight_decay)
    return StableAdamW(groups, lr=stage.lr_peak, betas=tuple(stage.betas), weight_decay=stage.weight_decay,
                       decouple_lr=True, max_lr=stage.lr_peak)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip to ``max_norm`` (<= 0: no clipping); return the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


def micro_batch_geometry(batch_tokens: int, micro_batch_tokens: int, world: int,
                         context_length: int) -> tuple[int, int]:
    """``(accum, budget)``: micro-batches per rank per optimizer step and the token budget of each.

    ``accum = ceil(batch_tokens / (world * micro_batch_tokens))``; the budget splits the rank's share of the
    step evenly over its micro-batches, and is at least ``context_length`` (a longest piece must fit).
    """
    if micro_batch_tokens <= 0 or world <= 0:
        raise ValueError(f"micro_batch_tokens and world must be > 0, got {micro_batch_tokens}, {world}")
    accum = max(1, math.ceil(batch_tokens / (world * micro_batch_tokens)))
    budget = max(math.ceil(batch_tokens / (world * accum)), context_length)
    return accum, budget
