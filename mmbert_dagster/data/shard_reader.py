"""Reading a shards folder (written by ``data/shards.py``, whose constants define its layout): ``ShardReader``, the
reader the training core uses, and the checks the shards asset runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmbert_dagster.data.shards import (
    DOCUMENTS, INDEX_DTYPE, SHARDS_JSON, TOKENS_PER_LANGUAGE, ShardError, token_dtype,
)
from mmbert_dagster.artifacts import sha256_file
from mmbert_dagster.data.tokenizer import TOKENIZER_FILE

if TYPE_CHECKING:  # polars is imported where a table is built: training reads shards without it
    import polars as pl


class ShardReader:
    """THE reader the training core uses: documents of a shards folder, in shard order, memory-mapped.

    Unlike datatrove's ``DatatroveFolderDataset`` (fixed-length windows that cut across documents) it yields
    whole documents as 1-D numpy arrays of the stored dtype (uint16/uint32), each ``[CLS] … [SEP]``, so the
    training core can pack them into micro-batches and build ``cu_seqlens`` from the true boundaries.

    * ``len(reader)``: documents; ``reader.total_tokens``; ``reader.lengths``: tokens per document.
    * ``reader.document(i)`` / ``reader[i]``: document ``i`` (a read-only view into the memory map).
    * ``iter(reader)``, ``reader.iter_from(position)``: documents from ``position`` on — resume a run at
      the data position saved in its checkpoint.
    * ``reader.decode_document(i, tokenizer)``: text of document ``i`` (round-trip checks).

    Opening validates every file against ``shards.json`` (existence, size = tokens x token_size, index
    length, last index entry) and raises ``ShardError`` naming the offending file.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta_path = self.folder / SHARDS_JSON
        if not meta_path.is_file():
            raise ShardError(f"{meta_path}: missing; {self.folder} is not a shards folder")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{meta_path}: not valid JSON: {e}") from e
        self.token_size = int(self.meta["token_size"])
        self.dtype = token_dtype(self.token_size)
        if self.dtype.str != self.meta.get("dtype", self.dtype.str):
            raise ShardError(f"{meta_path}: dtype {self.meta['dtype']} does not match token_size {self.token_size}")
        self._tokens: list[np.memmap] = []
        ends_all, self._file_first = [], []
        first = 0
        for f in self.meta["files"]:
            ds, idx = self.folder / f["name"], self.folder / f["index"]
            for p in (ds, idx):
                if not p.is_file():
                    raise ShardError(f"{p}: shard file listed in {SHARDS_JSON} is missing")
            want = int(f["tokens"]) * self.token_size
            if ds.stat().st_size != want:
                raise ShardError(f"{ds}: {ds.stat().st_size} bytes, expected {want} "
                                 f"({f['tokens']} tokens x {self.token_size} bytes) — truncated or wrong token_size")
            if idx.stat().st_size != int(f["docs"]) * INDEX_DTYPE.itemsize:
                raise ShardError(f"{idx}: {idx.stat().st_size} bytes, expected {int(f['docs']) * 8} "
                                 f"({f['docs']} documents x 8) — truncated")
            ends = np.fromfile(idx, dtype=INDEX_DTYPE).astype(np.int64)
            if ends.size and (ends[-1] != int(f["tokens"]) or np.any(np.diff(ends, prepend=0) <= 0)):
                raise ShardError(f"{idx}: document ends are inconsistent with {ds.name} ({f['tokens']} tokens)")
            self._tokens.append(np.memmap(ds, dtype=self.dtype, mode="r") if want else np.zeros(0, self.dtype))
            ends_all.append(ends)
            self._file_first.append(first)
            first += ends.size
        self._file_first = np.asarray(self._file_first, dtype=np.int64)
        self._ends = ends_all
        self._n = first
        if self._n != int(self.meta["docs"]):
            raise ShardError(f"{meta_path}: lists {self.meta['docs']} documents, files hold {self._n}")
        self.lengths = (np.concatenate([np.diff(e, prepend=0) for e in ends_all])
                        if ends_all else np.zeros(0, np.int64))

    @property
    def total_tokens(self) -> int:
        return int(self.meta["total_tokens"])

    @property
    def special_token_ids(self) -> dict[str, int]:
        return dict(self.meta.get("special_token_ids", {}))

    def check_tokenizer(self, tokenizer_dir: Path, vocab_size: int, special_ids: dict[str, int]) -> None:
        """Raise ``ShardError`` unless ``tokenizer_dir`` (whose vocabulary size and special ids the caller has
        read) holds the tokenizer these shards were built with — same tokenizer.json bytes, vocabulary and
        special ids: other token ids would train silently on noise."""
        file = Path(tokenizer_dir) / TOKENIZER_FILE
        want_sha, have_sha = self.meta.get("tokenizer_sha256"), sha256_file(file)
        want_specials = self.special_token_ids
        problems = []
        if vocab_size != self.meta.get("vocab_size", vocab_size):
            problems.append(f"vocabulary {vocab_size} vs {self.meta['vocab_size']}")
        if want_sha and want_sha != have_sha:
            problems.append(f"tokenizer.json SHA-256 {have_sha[:12]} vs {want_sha[:12]}")
        if any(want_specials.get(k) != v for k, v in special_ids.items() if k in want_specials):
            problems.append(f"special ids {special_ids} vs {want_specials}")
        if problems:
            raise ShardError(f"{self.folder}: shards were built with another tokenizer than {file} "
                             f"({'; '.join(problems)}); re-materialize the shards with this tokenizer")

    def __len__(self) -> int:
        return self._n

    def document(self, i: int) -> np.ndarray:
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"document {i} out of range (0..{self._n - 1})")
        f = int(np.searchsorted(self._file_first, i, side="right")) - 1
        j = i - int(self._file_first[f])
        ends = self._ends[f]
        start = int(ends[j - 1]) if j else 0
        return self._tokens[f][start:int(ends[j])]

    __getitem__ = document

    def iter_from(self, position: int = 0) -> Iterator[np.ndarray]:
        """Documents ``position, position + 1, ...`` in shard order."""
        if not 0 <= position <= self._n:
            raise IndexError(f"position {position} out of range (0..{self._n})")
        f = int(np.searchsorted(self._file_first, position, side="right")) - 1 if self._n else 0
        for fi in range(max(f, 0), len(self._tokens)):
            ends, arr = self._ends[fi], self._tokens[fi]
            j0 = position - int(self._file_first[fi]) if fi == f else 0
            start = int(ends[j0 - 1]) if j0 else 0
            for end in ends[j0:]:
                yield arr[start:int(end)]
                start = int(end)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.iter_from(0)

    def documents(self) -> pl.DataFrame:
        """``documents.parquet``: position, doc_id, lang, copy, n_tokens, in shard order."""
        import polars as pl

        return pl.read_parquet(self.folder / DOCUMENTS)

    def decode_document(self, i: int, tokenizer, *, skip_special_tokens: bool = True) -> str:
        """Decode document ``i`` with a transformers tokenizer or a ``tokenizers.Tokenizer``."""
        return decode_tokens(self.document(i), tokenizer, skip_special_tokens=skip_special_tokens)


def decode_tokens(ids: np.ndarray, tokenizer, *, skip_special_tokens: bool = True) -> str:
    ids = [int(x) for x in ids]
    try:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    except TypeError:  # tokenizers.Tokenizer.decode takes the flag positionally in old versions
        return tokenizer.decode(ids, skip_special_tokens)


def read_tokens_per_language(folder: Path):
    """(lang, docs, tokens, share, ...) of a shards artifact, largest first."""
    import polars as pl

    return pl.read_parquet(Path(folder) / TOKENS_PER_LANGUAGE).sort(["tokens", "lang"], descending=[True, False])


def roundtrip_mismatches(shards_dir: Path, tokenizer_dir: Path, filtered_corpus_dir: Path,
                         sample: int = 64) -> tuple[int, list[str]]:
    """Decode ``sample`` evenly spaced documents of a shards folder and compare them with their filtered text
    (NFC): ``(documents compared, doc_ids that differ)``."""
    import unicodedata

    import polars as pl

    from mmbert_dagster.data.sources import read_docs
    from mmbert_dagster.data.tokenizer import load_tokenizer

    reader, tok = ShardReader(Path(shards_dir)), load_tokenizer(tokenizer_dir)
    step = max(1, len(reader) // sample)
    positions = list(range(0, len(reader), step))[:sample]
    wanted = reader.documents()[positions]["doc_id"].to_list()
    texts = dict(read_docs(filtered_corpus_dir, ["doc_id", "text"]).filter(pl.col("doc_id").is_in(wanted))
                 .collect().iter_rows())
    nfc = lambda t: unicodedata.normalize("NFC", t)  # noqa: E731
    return len(positions), [doc_id for pos, doc_id in zip(positions, wanted)
                            if nfc(reader.decode_document(pos, tok)) != nfc(texts[doc_id])]
