"""One optimizer step: this rank's masked micro-batches, their forward/backward passes, clipping, the update.

A step is ``accum`` packed micro-batches per rank. The loss of every micro-batch is its summed cross-entropy
divided by ``n_predicted / world``, where ``n_predicted`` counts the predicted tokens of the WHOLE step (all
micro-batches, all ranks): DistributedDataParallel averages the ranks' gradients, so the result is the gradient
of one big batch's mean loss, whatever the accumulation and the number of ranks. (With a power-of-two world the
scaling is exact: bit for bit the SUM over ranks of the gradients of the loss divided by ``n_predicted``.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mmbert_dagster.train import distributed
from mmbert_dagster.train.device import autocast_for
from mmbert_dagster.train.distributed import DistInfo
from mmbert_dagster.train.inputs import Vocabulary
from mmbert_dagster.train.masking import mask_batch, micro_batch_generator
from mmbert_dagster.train.optim import clip_gradients, set_lr
from mmbert_dagster.train.packing import IGNORE, PackedBatch, Packer


@dataclass(frozen=True)
class MicroBatch:
    batch: PackedBatch  # masked: input_ids with [MASK] / random tokens, labels where a token is predicted
    n_maskable: int  # tokens that are not special tokens (before masking)

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens

    @property
    def n_predicted(self) -> int:
        return int((self.batch.labels != IGNORE).sum())


def masked_micro_batches(packer: Packer, count: int, *, rate: float, vocab: Vocabulary,
                         seed_parts: tuple) -> Iterator[MicroBatch]:
    """The next ``count`` micro-batches of ``packer``, masked at ``rate``; micro-batch ``i`` draws its mask from a
    generator seeded by ``(*seed_parts, i)`` (the loop passes seed, stage, rank, step: an exact resume)."""
    never_mask = torch.tensor(vocab.never_mask)
    for i in range(count):
        raw = next(packer)
        masked = mask_batch(raw, rate, mask_id=vocab.mask_id, vocab_size=vocab.size, special_ids=vocab.never_mask,
                            generator=micro_batch_generator(*seed_parts, i))
        yield MicroBatch(masked, int((~torch.isin(raw.input_ids, never_mask)).sum()))


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean MLM cross-entropy over the step's predicted tokens
    grad_norm: float  # global L2 norm before clipping
    n_tokens: int  # real tokens, all ranks
    n_predicted: int  # predicted (masked) tokens, all ranks
    n_maskable: int  # non-special tokens, all ranks

    @property
    def mask_rate(self) -> float:
        return self.n_predicted / max(self.n_maskable, 1)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[MicroBatch], *, lr: float,
               grad_clip: float, info: DistInfo, device: torch.device) -> StepResult:
    """Forward and backward every micro-batch (gradients averaged over ranks at the last), clip, update, zero."""
    counts = torch.tensor([sum(b.n_predicted for b in batches), sum(b.n_tokens for b in batches),
                           sum(b.n_maskable for b in batches)],
                          dtype=torch.float64, device=device)  # on the device: NCCL reduces CUDA tensors only
    n_predicted, n_tokens, n_maskable = distributed.all_reduce_sum(counts, info).tolist()
    num_items = torch.tensor(n_predicted / info.world, device=device)  # DDP averages over ranks: see module doc
    set_lr(optimizer, lr)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    for i, micro in enumerate(batches):
        with distributed.gradient_sync(model, sync=i == len(batches) - 1):
            with autocast_for(device):
                out = model(**micro.batch.model_inputs(device), num_items_in_batch=num_items)  # sum CE / count
            out.loss.backward()
        loss_sum += out.loss.detach().double() / info.world
    grad_norm = clip_gradients(model, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = float(distributed.all_reduce_sum(loss_sum, info))
    return StepResult(loss, grad_norm, int(n_tokens), int(n_predicted), int(n_maskable))
