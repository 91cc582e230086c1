"""Token shards for one training stage: sample documents by the stage's mixture, tokenize with datatrove.

``build_shards`` turns the filtered corpus + language-ID table + one stage's mixture into datatrove token
files (``.ds`` + ``.ds.index``) whose document order is OUR seeded order; this module defines the folder's layout
(the constants below), and ``data/shard_reader.py`` reads it back document by document for the training core.

How the order and the boundaries survive datatrove
--------------------------------------------------
* Sampling and shuffling happen here, in Python, seeded by ``(seed, stage)``. The shuffled documents are
  written to scratch parquet parts, one per output file, in order.
* datatrove's ``ParquetReader`` gives task ``r`` exactly part ``r`` (files are sorted and dealt
  ``files[r::tasks]``, and we run ``tasks == parts``) and reads it in row order.
* ``DocumentTokenizer(shuffle_documents=False, eos_token=None)`` then writes the documents in arrival order
  to ``<save_filename>_<rank:05d>_unshuffled.ds`` ("unshuffled" is datatrove's name: the order is our
  seeded shuffle). Without ``eos_token`` it keeps the tokenizer's own post-processor, so every document is
  encoded as ``[CLS] … [SEP]``; the ``.ds.index`` file holds each document's end offset (uint64, in tokens).
  A small subclass only sets ``encode_special_tokens=True``, so a literal "[MASK]" or "[CLS]" inside a
  document's text is encoded as text, never as a special token (stock datatrove would inject real ones).
  With ``shuffle_documents=False`` datatrove's ``max_tokens_per_file`` has no effect, so files are split by
  us instead: parts are cut at an estimated token count (bytes / measured bytes-per-token), which makes
  ``max_tokens_per_file`` a target, not a hard cap.
* After the run every file is checked: documents per file == documents sent, file size == tokens *
  token_size, and every document starts with ``[CLS]`` and ends with ``[SEP]``.
* The folder does not depend on where the artifact root is: datatrove's ``.ds.metadata`` names the tokenizer by
  the absolute path it was loaded from, which is replaced by ``tokenizer/tokenizer.json`` (``shards.json`` holds
  its SHA-256), so the same inputs give the same bytes in any root.

datatrove's ``LocalPipelineExecutor`` starts its worker pool with ``forkserver``, which needs an importable
``__main__`` (breaks under some hosts) and a fresh logging dir (a reused one skips "completed" ranks). We run
the pipeline in a child ``python -c`` process with its own fresh logging dir inside a scratch folder next to
``out_dir`` (deleted afterwards; its name contains ``.tmp-`` so ``artifacts.clean_stale_temporaries`` removes
it after a kill), so it behaves the same from pytest, a script or a Dagster asset process.

The whole eligible corpus text is held in memory (polars) while sampling: fine up to a few GB of text.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # polars is imported where a table is built: training reads shards without it
    import polars as pl

from mmbert_dagster.artifacts import sha256_file
from mmbert_dagster.child import python_command, run_child
from mmbert_dagster.data.tokenizer import TOKENIZER_FILE
from mmbert_dagster.seeding import stable_seed

SHARDS_JSON = "shards.json"
DOCUMENTS = "documents.parquet"
TOKENS_PER_LANGUAGE = "tokens_per_language.parquet"
SAVE_FILENAME = "tokens"
INDEX_DTYPE = np.dtype("<u8")  # datatrove writes document ends as little-endian uint64


class ShardError(RuntimeError):
    """Missing, truncated or inconsistent shard files; the message names the file."""


def token_size_for_vocab(vocab_size: int) -> int:
    """datatrove's rule: 2-byte tokens up to 65536 entries, 4-byte above."""
    return 4 if vocab_size > np.iinfo(np.uint16).max + 1 else 2


def token_dtype(token_size: int) -> np.dtype:
    return np.dtype("<u2") if token_size == 2 else np.dtype("<u4")


# --------------------------------------------------------------------------------------------- sampling


def _check_mixture(mixture: pl.DataFrame) -> str:
    import polars as pl
    need = {"stage", "lang", "repeat_factor"}
    missing = need - set(mixture.columns)
    if missing:
        raise ValueError(f"mixture lacks column(s) {sorted(missing)}; has {mixture.columns}")
    stages = mixture["stage"].unique().to_list()
    if len(stages) != 1:
        raise ValueError(f"mixture must hold exactly one stage, got {sorted(map(str, stages))}")
    if mixture["lang"].n_unique() != mixture.height:
        dup = mixture.filter(pl.col("lang").is_duplicated())["lang"].unique().to_list()
        raise ValueError(f"mixture lists language(s) {sorted(dup)} more than once")
    rf = mixture["repeat_factor"].cast(pl.Float64)
    if rf.is_null().any() or (~rf.is_finite()).any() or (rf < 0).any():
        raise ValueError("mixture.repeat_factor must be finite and >= 0 for every language")
    return str(stages[0])


def _load_corpus(docs_files: list[Path], lid_table: Path, langs: list[str]) -> pl.DataFrame:
    """doc_id, lang, text of the documents that passed language ID, in a language of the mixture.

    Sorted by (lang, doc_id) so the sample does not depend on how the corpus is split into files.
    """
    import polars as pl
    files = [str(p) for p in docs_files]
    for f in files + [str(lid_table)]:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f}: input parquet does not exist")
    lid = pl.read_parquet(lid_table, columns=["doc_id", "lang", "passed"])
    lid = lid.filter(pl.col("passed").fill_null(False)).select("doc_id", "lang")
    if lid["doc_id"].n_unique() != lid.height:
        raise ValueError(f"{lid_table}: doc_id is not unique among passed rows")
    lid = lid.filter(pl.col("lang").is_in(langs))
    docs = pl.scan_parquet(files).select("doc_id", "text").join(lid.lazy(), on="doc_id", how="inner")
    docs = docs.filter(pl.col("text").is_not_null() & (pl.col("text").str.len_bytes() > 0))
    return docs.select("doc_id", "lang", "text").sort("lang", "doc_id").collect()


def sample_documents(corpus: pl.DataFrame, mixture: pl.DataFrame, *, seed: int) -> pl.DataFrame:
    """The seeded, shuffled sample: one row per included copy with ``row`` (into ``corpus``), ``copy``.

    Each document of a language is included floor(r) times, plus once more with probability frac(r),
    r = the language's ``repeat_factor`` (random draws seeded by seed, stage, language). The list of copies
    is then shuffled (seeded by seed, stage). Deterministic for the same inputs.
    """
    import polars as pl
    stage = _check_mixture(mixture)
    rf = dict(zip(mixture["lang"].to_list(), mixture["repeat_factor"].cast(pl.Float64).to_list()))
    rows, copies = [], []
    langs = corpus["lang"].to_numpy()
    for lang in sorted(rf):
        idx = np.flatnonzero(langs == lang)
        if idx.size == 0:
            continue
        r = rf[lang]
        whole = math.floor(r)
        frac = r - whole
        rng = np.random.default_rng(stable_seed(seed, stage, "repeat", lang))
        n = whole + (rng.random(idx.size) < frac).astype(np.int64)
        rows.append(np.repeat(idx, n))
        # copy number 0..n-1 of each document
        starts = np.repeat(np.cumsum(n) - n, n)
        copies.append(np.arange(int(n.sum()), dtype=np.int64) - starts)
    if not rows:
        return pl.DataFrame({"row": [], "copy": []}, schema={"row": pl.Int64, "copy": pl.Int64})
    row = np.concatenate(rows).astype(np.int64)
    copy = np.concatenate(copies).astype(np.int64)
    order = np.random.default_rng(stable_seed(seed, stage, "shuffle")).permutation(row.size)
    return pl.DataFrame({"row": row[order], "copy": copy[order]})


# --------------------------------------------------------------------------------------------- datatrove


_LITERAL_TOKENIZER_CLASS = None


def _literal_specials_document_tokenizer():
    """datatrove's ``DocumentTokenizer``, except that special-token strings inside document text
    (a web page that says "[MASK]" or "[CLS]") are encoded as plain text, never as the special tokens.

    Built lazily (importing datatrove costs ~0.7 s) and reachable as a module attribute (PEP 562
    ``__getattr__`` below) so that datatrove's worker processes can unpickle it.
    """
    global _LITERAL_TOKENIZER_CLASS
    if _LITERAL_TOKENIZER_CLASS is None:
        from datatrove.pipeline.tokens import DocumentTokenizer

        class _LiteralSpecialsDocumentTokenizer(DocumentTokenizer):
            def write_unshuffled(self, data, filename):
                # Set on the live tokenizer right before use: the flag is not saved in tokenizer.json and
                # does not survive pickling to the workers.
                self.tokenizer.encode_special_tokens = True
                return super().write_unshuffled(data, filename)

        _LiteralSpecialsDocumentTokenizer.__module__ = __name__
        _LITERAL_TOKENIZER_CLASS = _LiteralSpecialsDocumentTokenizer
    return _LITERAL_TOKENIZER_CLASS


def __getattr__(name: str):
    if name == "_LiteralSpecialsDocumentTokenizer":
        return _literal_specials_document_tokenizer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _tokenize_pipeline(job: dict) -> list:
    """datatrove's reader of our ordered parts + its DocumentTokenizer (see the module docstring)."""
    from datatrove.pipeline.readers import ParquetReader

    DocumentTokenizer = _literal_specials_document_tokenizer()
    return [
        ParquetReader(job["parts_dir"], glob_pattern="part-*.parquet", text_key="text", id_key="id",
                      read_metadata=False),
        DocumentTokenizer(
            output_folder=job["out_dir"],
            tokenizer_name_or_path=job["tokenizer_file"],
            save_filename=job["save_filename"],
            eos_token=None,  # keep the tokenizer's post-processor: [CLS] $A [SEP]
            save_index=True,
            save_final_metadata=True,
            shuffle_documents=False,  # the parts are already in our seeded order
            batch_size=10_000,  # datatrove's default; batches of 1000 tokenize ~1.7x slower
        ),
    ]


def _run_datatrove_job(job_path: str) -> None:
    """Child-process entry point: read the parts, tokenize them with datatrove on this machine."""
    from datatrove.executor import LocalPipelineExecutor

    job = json.loads(Path(job_path).read_text())
    LocalPipelineExecutor(
        _tokenize_pipeline(job), tasks=job["tasks"], workers=job["workers"], logging_dir=job["logging_dir"],
        skip_completed=False,
    ).run()


def _datatrove_progress(line: str) -> str | None:
    """datatrove's task-completion lines, for the run log (the rest of its output stays out of it)."""
    if "tasks completed" in line or "All " in line and "tasks" in line:
        return f"shards: datatrove: {line.split('|')[-1].strip()}"
    return None


def _run_child(job_path: Path, log) -> None:
    run_child(python_command("mmbert_dagster.data.shards:_run_datatrove_job", str(job_path)),
              what="datatrove tokenization", log=log, show=_datatrove_progress)


def _tokenizer_file(tokenizer_dir: Path):
    from tokenizers import Tokenizer

    file = Path(tokenizer_dir) / TOKENIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; build_shards needs the tokenizer folder's tokenizer.json")
    raw = json.loads(file.read_text(encoding="utf-8"))
    if raw.get("truncation") or raw.get("padding"):
        raise ValueError(f"{file}: truncation/padding is enabled and would cut documents; "
                         f"re-save it with mmbert_dagster.data.tokenizer.load_pretrained_tokenizer")
    return file, Tokenizer.from_file(str(file))


def _name_tokenizer_in_metadata(path: Path, name: str) -> None:
    """Replace the tokenizer's absolute path in datatrove's ``.ds.metadata`` (``<tokenizer>|<token_size>``, then
    the token count) by ``name``: the shards must not change with the artifact root."""
    if not path.is_file():
        raise ShardError(f"{path}: datatrove did not write this shard's metadata")
    first, sep, rest = path.read_text().partition("\n")
    path.write_text(f"{name}|{first.rsplit('|', 1)[-1]}{sep}{rest}")


def _cut_parts(n_bytes: np.ndarray, bytes_per_token: float, max_tokens_per_file: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges with about ``max_tokens_per_file`` estimated tokens each."""
    est = np.cumsum(n_bytes / bytes_per_token)
    bounds, start, base = [], 0, 0.0
    while start < n_bytes.size:
        end = int(np.searchsorted(est, base + max_tokens_per_file, side="right"))
        end = max(end, start + 1)
        bounds.append((start, end))
        base = float(est[end - 1])
        start = end
    return bounds


def build_shards(
    docs_files: list[Path],
    lid_table: Path,
    mixture: pl.DataFrame,
    tokenizer_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    max_tokens_per_file: int = 50_000_000,
    executor=None,
    log=print,
) -> dict:
    """Sample one stage's documents by its mixture, tokenize them with datatrove and write shards to ``out_dir``.

    ``docs_files``: parquet with ``doc_id, text`` (+ ``source, declared_lang``, unused); ``lid_table``: parquet
    with ``doc_id, lang, passed`` — a document's language is ``lang`` from this table, only ``passed`` rows
    count; ``mixture``: one stage's rows with ``stage, lang, repeat_factor`` (+ ``tokens_target``...).
    ``out_dir`` must exist and be empty; it receives the ``.ds``/``.ds.index``/``.ds.metadata`` files,
    ``documents.parquet``, ``tokens_per_language.parquet`` and ``shards.json``. Returns metadata.
    ``executor``: ``data.executors.DataExecutorSettings`` of a Ray or Slurm cluster for the tokenization (one
    task per output file); None / ``local``: a child process on this machine.
    """
    import polars as pl
    from mmbert_dagster.data.tokenizer import special_token_ids

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise ValueError(f"{out_dir}: output folder must be empty")
    if max_tokens_per_file <= 0:
        raise ValueError(f"max_tokens_per_file must be > 0, got {max_tokens_per_file}")
    stage = _check_mixture(mixture)
    tok_file, tok = _tokenizer_file(tokenizer_dir)
    vocab_size = tok.get_vocab_size()
    token_size = token_size_for_vocab(vocab_size)
    dtype = token_dtype(token_size)
    specials = special_token_ids(Path(tokenizer_dir))

    corpus = _load_corpus(list(docs_files), lid_table, mixture["lang"].to_list())
    sample = sample_documents(corpus, mixture, seed=seed)
    if sample.height == 0:
        raise ValueError(f"stage {stage}: the mixture selects no documents "
                         f"(languages {mixture['lang'].to_list()}, {corpus.height} eligible documents)")
    ordered = corpus.select("doc_id", "lang", "text")[sample["row"].to_numpy()].with_columns(
        copy=sample["copy"], position=pl.int_range(pl.len(), dtype=pl.Int64)
    )
    n_bytes = ordered["text"].str.len_bytes().cast(pl.Float64).to_numpy()
    probe = ordered["text"].head(256).to_list()
    probe_tokens = sum(len(e.ids) for e in tok.encode_batch(probe))
    bytes_per_token = max(sum(len(t.encode()) for t in probe) / max(probe_tokens, 1), 0.1)
    parts = _cut_parts(n_bytes, bytes_per_token, max_tokens_per_file)
    log(f"shards[{stage}]: {ordered.height} documents ({corpus.height} eligible), {n_bytes.sum() / 1e6:.2f} MB "
        f"-> {len(parts)} file(s); vocab {vocab_size}, {token_size}-byte tokens")

    scratch = out_dir.parent / f".{out_dir.name.lstrip('.')}.tmp-scratch-{uuid.uuid4().hex[:8]}"
    scratch.mkdir(parents=True)
    try:
        parts_dir = scratch / "parts"
        parts_dir.mkdir()
        for r, (a, b) in enumerate(parts):
            chunk = ordered.slice(a, b - a)
            chunk.select(pl.col("position").cast(pl.Utf8).alias("id"), "text").write_parquet(
                parts_dir / f"part-{r:05d}.parquet", row_group_size=1000
            )
        job = {
            "parts_dir": str(parts_dir),
            "out_dir": str(out_dir),
            "tokenizer_file": str(tok_file.resolve()),
            "save_filename": SAVE_FILENAME,
            "tasks": len(parts),
            "workers": max(1, min(len(parts), os.cpu_count() or 1)),
            "logging_dir": str(scratch / f"logs-{uuid.uuid4().hex[:8]}"),
        }
        job_path = scratch / "job.json"
        job_path.write_text(json.dumps(job, indent=1))
        t_tok = time.perf_counter()
        if executor is not None and executor.kind != "local":
            from mmbert_dagster.data.executors import run_pipeline

            run_pipeline(_tokenize_pipeline(job), executor, tasks=job["tasks"], logging_dir=job["logging_dir"],
                         name=f"shards-{stage.replace('_', '-')}", log=log)
        else:
            _run_child(job_path, log)
        tokenize_seconds = time.perf_counter() - t_tok
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    # ---- check what datatrove wrote, derive per-document token counts
    files, n_tokens = [], []
    for r, (a, b) in enumerate(parts):
        name = f"{SAVE_FILENAME}_{r:05d}_unshuffled.ds"
        ds, idx = out_dir / name, out_dir / f"{name}.index"
        if not ds.is_file() or not idx.is_file():
            raise ShardError(f"{ds}: datatrove did not write this shard (or its .index)")
        ends = np.fromfile(idx, dtype=INDEX_DTYPE).astype(np.int64)
        if ends.size != b - a:
            raise ShardError(f"{idx}: {ends.size} documents, expected {b - a} — datatrove dropped or merged documents")
        tokens = int(ends[-1])
        if ds.stat().st_size != tokens * token_size:
            raise ShardError(f"{ds}: {ds.stat().st_size} bytes, expected {tokens} tokens x {token_size}")
        arr = np.memmap(ds, dtype=dtype, mode="r")
        starts = np.concatenate([[0], ends[:-1]])
        if "cls" in specials and "sep" in specials and not (
            np.all(arr[starts] == specials["cls"]) and np.all(arr[ends - 1] == specials["sep"])
        ):
            raise ShardError(f"{ds}: a document does not start with [CLS] and end with [SEP]")
        del arr
        _name_tokenizer_in_metadata(out_dir / f"{name}.metadata", f"{Path(tokenizer_dir).name}/{tok_file.name}")
        n_tokens.append(np.diff(ends, prepend=0))
        files.append({"name": name, "index": f"{name}.index", "docs": int(ends.size), "tokens": tokens,
                      "bytes": tokens * token_size, "first_position": a})
    n_tok = np.concatenate(n_tokens)
    documents = ordered.select(
        "position", "doc_id", "lang", "copy", pl.Series("n_tokens", n_tok, dtype=pl.Int64)
    )
    documents.write_parquet(out_dir / DOCUMENTS)
    total_tokens = int(n_tok.sum())

    per_lang = (
        documents.group_by("lang")
        .agg(docs=pl.len(), unique_docs=pl.col("doc_id").n_unique(), tokens=pl.col("n_tokens").sum())
    )
    extra = [c for c in ("repeat_factor", "tokens_target") if c in mixture.columns]
    per_lang = (
        mixture.select("lang", *extra)
        .join(per_lang, on="lang", how="left")
        .with_columns(pl.col("docs", "unique_docs", "tokens").fill_null(0).cast(pl.Int64))
        .with_columns(share=pl.col("tokens") / total_tokens)
        .select("lang", "docs", "tokens", "share", "unique_docs", *extra)
        .sort(["tokens", "lang"], descending=[True, False])
    )
    per_lang.write_parquet(out_dir / TOKENS_PER_LANGUAGE)

    info = {
        "format": "datatrove DocumentTokenizer (.ds tokens + .ds.index uint64 document ends); read with ShardReader",
        "stage": stage,
        "seed": seed,
        "vocab_size": vocab_size,
        "token_size": token_size,
        "dtype": dtype.str,
        "total_tokens": total_tokens,
        "docs": int(ordered.height),
        "unique_docs": int(documents["doc_id"].n_unique()),
        "files": files,
        "special_token_ids": specials,
        "document_template": "[CLS] text [SEP]" if {"cls", "sep"} <= specials.keys() else "tokenizer post-processor",
        "tokenizer_sha256": sha256_file(tok_file),  # training refuses a tokenizer other than this one
        "max_tokens_per_file": max_tokens_per_file,
        "order": "seeded shuffle of sampled copies; files in rank order, documents in file order",
    }
    (out_dir / SHARDS_JSON).write_text(json.dumps(info, indent=1))
    seconds = time.perf_counter() - t0
    shares = {row["lang"]: round(row["share"], 6) for row in per_lang.iter_rows(named=True)}
    log(f"shards[{stage}]: {total_tokens:,} tokens in {ordered.height} documents, {len(files)} file(s), "
        f"{seconds:.1f}s (datatrove {tokenize_seconds:.1f}s)")
    return {
        "stage": stage,
        "total_tokens": total_tokens,
        "docs": int(ordered.height),
        "unique_docs": info["unique_docs"],
        "files": len(files),
        "token_size": token_size,
        "vocab_size": vocab_size,
        "token_share": shares,
        "seconds": round(seconds, 3),
        "tokenize_seconds": round(tokenize_seconds, 3),
        "tokens_per_second": round(total_tokens / max(tokenize_seconds, 1e-9)),
    }
