"""Held-out MLM loss: texts no stage trains on, tokenized like the shards, packed and masked like a training step.

The masks come from fixed generators (``(seed, "heldout", micro-batch)``), so two checkpoints of a run are scored
on exactly the same predictions and their held-out losses compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mmbert_dagster.recipe import Stage
from mmbert_dagster.train.device import autocast_for
from mmbert_dagster.data.tokenizer import load_tokenizer
from mmbert_dagster.train.inputs import Vocabulary
from mmbert_dagster.train.masking import mask_batch, micro_batch_generator
from mmbert_dagster.train.packing import IGNORE, Packer


def encode_texts(texts: Sequence[str], tokenizer_dir: Path) -> list[np.ndarray]:
    """Token ids of the non-empty texts, as in the shards (a literal "[MASK]" in a text is text)."""
    tok = load_tokenizer(tokenizer_dir)
    tok.encode_special_tokens = True
    docs = [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch([t for t in texts if t])]
    return [d for d in docs if d.size]


@torch.no_grad()
def heldout_loss(model, texts: Sequence[str], *, tokenizer_dir: Path, stage: Stage, budget: int, vocab: Vocabulary,
                 seed: int, device: torch.device) -> float | None:
    """Mean MLM cross-entropy on ``texts`` at the stage's mask rate and context; None if there is no token."""
    docs = encode_texts(texts, tokenizer_dir)
    if not docs:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(Packer(docs, budget, stage.context_length, vocab.specials, cycle=False)):
        batch = mask_batch(batch, stage.mask_rate, mask_id=vocab.mask_id, vocab_size=vocab.size,
                           special_ids=vocab.specials.values(), generator=micro_batch_generator(seed, "heldout", i))
        n = int((batch.labels != IGNORE).sum())
        with autocast_for(device):
            out = model(**batch.model_inputs(device))
        total += float(out.loss) * n
        count += n
    model.train(was_training)
    return total / count if count else None
