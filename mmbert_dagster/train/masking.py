"""MLM masking (BERT's 80/10/10), seeded, never on special tokens.

Each non-special token is selected with probability ``rate``; a selected token's label is its id (every other
label is ``IGNORE``) and its input becomes ``[MASK]`` with probability 0.8, a random non-special token with 0.1,
and stays unchanged with 0.1. A call (one micro-batch) with at least one maskable token always selects at least
one (so every micro-batch has a loss and a gradient for every weight).

Randomness comes only from the ``torch.Generator`` passed in. The training loop derives a fresh generator for
every micro-batch from ``(seed, stage, rank, step, micro-batch)`` (:func:`micro_batch_generator`), so masks do
not depend on the process history: a resumed run masks exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch

from mmbert_dagster import seeding
from mmbert_dagster.train.packing import IGNORE, PackedBatch

MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1  # of the selected tokens; the remaining 0.1 stay unchanged


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``, independent of Python's per-process string hashing."""
    return seeding.stable_seed(*parts) >> 1  # torch generators take seeds below 2**63


def micro_batch_generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*parts))


def mask_tokens(input_ids: torch.Tensor, rate: float, *, mask_id: int, vocab_size: int, special_ids,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked_input_ids, labels)`` for an int64 tensor of any shape (CPU). ``special_ids``: ids never masked."""
    if not 0 < rate < 1:
        raise ValueError(f"mask rate must be in (0, 1), got {rate}")
    special = torch.tensor(sorted({int(i) for i in special_ids} | {int(mask_id)}), dtype=input_ids.dtype)
    maskable = ~torch.isin(input_ids, special)
    selected = (torch.rand(input_ids.shape, generator=generator) < rate) & maskable
    if not selected.any() and maskable.any():  # guarantee one prediction per call
        candidates = maskable.flatten().nonzero().flatten()
        pick = candidates[torch.randint(candidates.numel(), (1,), generator=generator)]
        selected.view(-1)[pick] = True
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE))
    action = torch.rand(input_ids.shape, generator=generator)
    to_mask = selected & (action < MASK_FRACTION)
    to_random = selected & (action >= MASK_FRACTION) & (action < MASK_FRACTION + RANDOM_FRACTION)
    # random replacements: uniform over the non-special vocabulary
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[special < vocab_size]] = False
    allowed_ids = allowed.nonzero().flatten().to(input_ids.dtype)
    random_ids = allowed_ids[torch.randint(allowed_ids.numel(), input_ids.shape, generator=generator)]
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def mask_batch(batch: PackedBatch, rate: float, *, mask_id: int, vocab_size: int, special_ids,
               generator: torch.Generator) -> PackedBatch:
    """A copy of ``batch`` with masked ``input_ids`` and MLM ``labels``."""
    masked, labels = mask_tokens(batch.input_ids, rate, mask_id=mask_id, vocab_size=vocab_size,
                                 special_ids=special_ids, generator=generator)
    return PackedBatch(masked, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, labels)
