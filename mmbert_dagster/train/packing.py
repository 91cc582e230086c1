"""Pack whole documents into one-row micro-batches of at most ``budget`` tokens, with no padding at all.

A micro-batch is ``input_ids`` (1, T) — documents back to back — plus ``position_ids`` restarting at 0 for each
document, ``cu_seqlens`` (int32, flash-attn's ``[0, end_0, end_1, ..., T]``) and ``max_seqlen``. ``T`` is
whatever fits: the next piece goes into the row if it fits in the budget, else the row is emitted and the piece
starts the next one (documents keep their order; rows are ~``budget - context_length / 2`` tokens on average,
and the slack costs nothing because nothing is padded).

Long documents. A document longer than ``context_length`` is cut into ``n = ceil(len(content) / (C - 2))``
pieces of (near-)equal size, and EVERY piece is wrapped as ``[CLS] part [SEP]``: each training sequence then
looks like what the model sees at inference (a tokenizer's ``[CLS] … [SEP]`` input) and never exceeds ``C``.
Equal-size pieces avoid a tiny leftover tail (a 260-token document at C = 256 gives 2 pieces of 131, not 256 + 4).
The extra [CLS]/[SEP] tokens are never masked (special tokens).

Shuffle window. Pieces are read in windows of ``shuffle_window`` consecutive documents (of this rank): all the
pieces of the window's documents, in a seeded random order (a function of ``seed``, the epoch and the window's
first document). Without it a long document fills several micro-batches in a row — one document, one language
per optimizer step — and the gradient follows whichever document is current: measured on the tiny preset (12
languages, documents up to 7k tokens at context 256), a window of 1 left the loss on the unigram plateau after
1M tokens where a window of 64 documents did not (README, "Training"). A window is a few dozen documents, so
memory stays bounded at any corpus size. ``shuffle_window=1`` reads documents and pieces in order.

Data position. ``DataPosition(epoch, doc, piece)`` names the next piece to read: ``doc`` = global index of the
first document of the current window, ``piece`` = index into that window's shuffled piece list (with a window
of 1: the piece of that document). It is all a resume needs: a window's pieces and their order are a pure
function of its documents' tokens, ``context_length``, the seed and the epoch. With ``world`` ranks, rank ``r``
reads documents ``r, r + world, r + 2 * world, …`` (disjoint slices). When the documents run out the packer
starts the next epoch (the same windows, reshuffled) — shards are built to the stage's token budget, so this is
a fallback, and it is counted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100  # label of positions that are not predicted


@dataclass(frozen=True)
class DataPosition:
    epoch: int = 0
    doc: int = 0  # global document index in the shards
    piece: int = 0  # piece of that document (long documents are cut into pieces)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataPosition:
        return cls(int(d["epoch"]), int(d["doc"]), int(d["piece"]))


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (1, T) int64, documents back to back
    position_ids: torch.Tensor  # (1, T) int64, 0.. restarting per document
    cu_seqlens: torch.Tensor  # (n_docs + 1,) int32, document boundaries
    max_seqlen: int
    labels: torch.Tensor | None = None  # (1, T) int64, IGNORE where nothing is predicted (set by masking)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_docs(self) -> int:
        return int(self.cu_seqlens.numel() - 1)

    def model_inputs(self, device: torch.device | str = "cpu") -> dict:
        """Keyword arguments for ``ModernBertForMaskedLM(**inputs)`` with the packed attention.

        The attention-mask dict makes transformers skip building masks (our attention reads cu_seqlens); the
        ``cu_seq_lens_*`` / ``max_length_*`` names are transformers' flash kwargs, forwarded to every layer.
        """
        cu = self.cu_seqlens.to(device)
        out = {
            "input_ids": self.input_ids.to(device),
            "position_ids": self.position_ids.to(device),
            "attention_mask": {"full_attention": None, "sliding_attention": None},
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": self.max_seqlen, "max_length_k": self.max_seqlen,
        }
        if self.labels is not None:
            out["labels"] = self.labels.to(device)
        return out


def split_document(doc: np.ndarray, context_length: int, cls_id: int, sep_id: int) -> list[np.ndarray]:
    """A document as pieces of at most ``context_length`` tokens, each ``[CLS] part [SEP]`` (see module doc)."""
    doc = np.asarray(doc, dtype=np.int64)
    if doc.size <= context_length:
        return [doc]
    if context_length < 3:
        raise ValueError(f"context_length must be >= 3 to cut documents, got {context_length}")
    content = doc[1:-1] if doc[0] == cls_id and doc[-1] == sep_id else doc
    n = math.ceil(content.size / (context_length - 2))
    cls, sep = np.array([cls_id], np.int64), np.array([sep_id], np.int64)
    return [np.concatenate([cls, part, sep]) for part in np.array_split(content, n)]


def pack_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of whole documents per row, in order: a row takes the next document while it stays within
    ``budget`` tokens (a document longer than the budget gets a row of its own)."""
    rows: list[list[int]] = []
    row, used = [], 0
    for i, n in enumerate(lengths):
        if row and used + n > budget:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


def collate(pieces: Sequence[np.ndarray]) -> PackedBatch:
    """One packed row from token arrays (no padding, no labels)."""
    if not pieces:
        raise ValueError("collate: no pieces")
    lengths = np.array([p.size for p in pieces], dtype=np.int64)
    if (lengths == 0).any():
        raise ValueError("collate: empty piece")
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces])
    pos = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return PackedBatch(
        input_ids=torch.from_numpy(ids)[None], position_ids=torch.from_numpy(pos)[None],
        cu_seqlens=torch.from_numpy(cu), max_seqlen=int(lengths.max()),
    )


class Packer:
    """Deterministic, resumable stream of packed micro-batches over ``documents`` (a ``ShardReader`` or a list).

    ``next(packer)`` -> ``PackedBatch``; ``packer.position`` is the resume point after the last batch. With
    ``cycle=False`` the stream stops after one pass (held-out evaluation) instead of starting a new epoch.
    """

    def __init__(self, documents: Sequence[np.ndarray], budget_tokens: int, context_length: int,
                 special_ids: dict[str, int], *, rank: int = 0, world: int = 1,
                 position: DataPosition | None = None, cycle: bool = True, shuffle_window: int = 1,
                 seed: int = 0):
        if budget_tokens < context_length:
            raise ValueError(f"micro-batch budget ({budget_tokens} tokens) must be >= context_length "
                             f"({context_length})")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in 0..{world - 1}")
        if shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1 document, got {shuffle_window}")
        if len(documents) <= rank:
            raise ValueError(f"rank {rank} of {world} gets no documents: the shards hold only {len(documents)}")
        self.documents = documents
        self.budget = int(budget_tokens)
        self.context_length = int(context_length)
        self.cls_id, self.sep_id = int(special_ids["cls"]), int(special_ids["sep"])
        self.rank, self.world, self.cycle = rank, world, cycle
        self.shuffle_window, self.seed = int(shuffle_window), int(seed)
        self.position = position or DataPosition(0, rank, 0)
        if self.position.doc % world != rank or (self.position.doc - rank) // world % self.shuffle_window:
            raise ValueError(f"data position {self.position} does not belong to rank {rank} of {world} "
                             f"(windows of {self.shuffle_window} documents)")
        self._cache: tuple[tuple[int, int], list[np.ndarray]] | None = None

    def _window(self, epoch: int, start: int) -> list[np.ndarray]:
        """The pieces of the window starting at document ``start``, in reading order (shuffled for a window > 1)."""
        if self._cache is None or self._cache[0] != (epoch, start):
            stop = min(start + self.shuffle_window * self.world, len(self.documents))
            pieces = [piece for doc in range(start, stop, self.world)
                      for piece in split_document(self.documents[doc], self.context_length, self.cls_id,
                                                  self.sep_id)]
            if self.shuffle_window > 1:
                order = np.random.default_rng([self.seed, epoch, start]).permutation(len(pieces))
                pieces = [pieces[i] for i in order]
            self._cache = ((epoch, start), pieces)
        return self._cache[1]

    def _advance(self, p: DataPosition) -> DataPosition:
        if p.piece + 1 < len(self._window(p.epoch, p.doc)):
            return DataPosition(p.epoch, p.doc, p.piece + 1)
        if p.doc + self.shuffle_window * self.world < len(self.documents):
            return DataPosition(p.epoch, p.doc + self.shuffle_window * self.world, 0)
        return DataPosition(p.epoch + 1, self.rank, 0)

    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        start_epoch = self.position.epoch
        if not self.cycle and start_epoch > 0:
            raise StopIteration
        pieces, used, p = [], 0, self.position
        while True:
            piece = self._window(p.epoch, p.doc)[p.piece]
            if pieces and used + piece.size > self.budget:
                break
            pieces.append(piece)
            used += piece.size
            p = self._advance(p)
            if p.epoch != start_epoch and not self.cycle:
                break
        self.position = p
        return collate(pieces)
