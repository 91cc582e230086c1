"""Running a saved checkpoint over texts: packed inference (no padding), mean-pooled embeddings, masked-token guesses.

Every benchmark goes through :class:`Encoder`: texts are tokenized with the checkpoint's own tokenizer,
truncated to its context (``max_position_embeddings``; the last token stays ``[SEP]``), and packed into one-row
micro-batches of at most ``batch_tokens`` tokens with ``cu_seqlens`` — the same per-document attention as in
training, so no compute is spent on padding and documents never see each other.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmbert_dagster.train.device import autocast_for
from mmbert_dagster.train.packing import IGNORE, collate, pack_rows


@dataclass
class Throughput:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class Encoder:
    """A checkpoint folder loaded for evaluation (eval mode, fp32 on CPU, bf16 autocast on CUDA)."""

    folder: Path
    device: str = "cpu"
    batch_tokens: int = 8192
    throughput: Throughput = field(default_factory=Throughput)

    def __post_init__(self):
        from mmbert_dagster.data.tokenizer import load_tokenizer, special_token_ids
        from mmbert_dagster.train.model import load_model

        self.folder = Path(self.folder)
        self.model = load_model(self.folder).to(self.device).eval()
        self.tokenizer = load_tokenizer(self.folder)
        self.tokenizer.encode_special_tokens = True  # a literal "[MASK]" in held-out text is text, as in the shards
        self.specials = special_token_ids(self.folder)
        if not {"cls", "sep", "mask"} <= set(self.specials):  # a tokenizer without our config files: the model's ids
            cfg = self.model.config
            ids = {"pad": cfg.pad_token_id, "cls": cfg.cls_token_id, "sep": cfg.sep_token_id,
                   "mask": getattr(cfg, "mask_token_id", None)}
            self.specials = {k: int(v) for k, v in ids.items() if v is not None} | self.specials
        if "mask" not in self.specials:
            raise ValueError(f"{self.folder}: neither the tokenizer nor config.json names a [MASK] token id")
        self.context = int(self.model.config.max_position_embeddings)
        self.vocab_size = int(self.model.config.vocab_size)

    def tokenize(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = []
        for enc in self.tokenizer.encode_batch(list(texts)):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if ids.size > self.context:
                ids = np.concatenate([ids[: self.context - 1], ids[-1:]])  # keep the closing [SEP]
            out.append(ids)
        return out

    def _rows(self, docs: Sequence[np.ndarray]) -> list[list[int]]:
        """Indices of ``docs`` per packed row (order kept)."""
        return pack_rows([d.size for d in docs], self.batch_tokens)

    def _autocast(self):
        return autocast_for(torch.device(self.device))

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n, hidden) mean of the last hidden states over each text's non-special tokens; counts throughput."""
        docs = self.tokenize(texts)
        special = torch.tensor(sorted(set(self.specials.values())))
        out = np.zeros((len(docs), self.model.config.hidden_size), dtype=np.float32)
        for row in self._rows(docs):
            batch = collate([docs[i] for i in row])
            inputs = batch.model_inputs(self.device)
            inputs.pop("labels", None)
            t0 = time.perf_counter()
            with self._autocast():
                hidden = self.model.model(**inputs).last_hidden_state[0].float()
            if str(self.device).startswith("cuda"):
                torch.cuda.synchronize()
            self.throughput.seconds += time.perf_counter() - t0
            self.throughput.tokens += batch.n_tokens
            keep = ~torch.isin(batch.input_ids[0], special).to(hidden.device)
            bounds = batch.cu_seqlens.tolist()
            for j, i in enumerate(row):
                s, e = bounds[j], bounds[j + 1]
                k = keep[s:e]
                h = hidden[s:e][k] if k.any() else hidden[s:e]
                out[i] = h.mean(0).cpu().numpy()
        return out

    @torch.no_grad()
    def masked_predictions(self, docs: Sequence[tuple[np.ndarray, np.ndarray]]
                           ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """For (input_ids with [MASK]s, labels with IGNORE elsewhere) per text: (true ids, predicted ids, the
        cross-entropy of each true id in nats) at the masks."""
        results: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [None] * len(docs)  # type: ignore[list-item]
        for row in self._rows([ids for ids, _ in docs]):
            batch = collate([docs[i][0] for i in row])
            labels = np.concatenate([docs[i][1] for i in row])
            inputs = batch.model_inputs(self.device)
            with self._autocast():
                hidden = self.model.model(**inputs).last_hidden_state[0]
                where = torch.from_numpy(labels != IGNORE).to(hidden.device)
                logits = self.model.decoder(self.model.head(hidden[where]))
            true = torch.from_numpy(labels[labels != IGNORE]).to(logits.device)
            nll = torch.nn.functional.cross_entropy(logits.float(), true, reduction="none").cpu().numpy()
            pred = logits.argmax(-1).cpu().numpy()
            bounds = batch.cu_seqlens.tolist()
            offset = 0
            for j, i in enumerate(row):
                lab = labels[bounds[j]:bounds[j + 1]]
                n = int((lab != IGNORE).sum())
                results[i] = (lab[lab != IGNORE], pred[offset:offset + n], nll[offset:offset + n])
                offset += n
        return results
