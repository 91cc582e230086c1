"""Quality filtering and deduplication of the raw corpus with datatrove (FineWeb-2 style), offline and for any script.

Pipeline (datatrove steps run by ``LocalPipelineExecutor``; every dropped document is recorded with its step and
datatrove's reason code):

1. ``normalize``: ftfy fixes (mojibake, HTML entities, terminal escapes, NFC) through datatrove's ``FTFYFormatter``,
   then control characters are stripped and line ends unified; documents shorter than ``min_doc_chars`` are dropped
   (reason ``too_short``).
2. ``fineweb_quality``, ``gopher_quality``, ``gopher_repetition`` (cheapest first): datatrove's filters, with the thresholds of
   :class:`~mmbert_dagster.recipe.FilterConfig`, applied per *script profile* (see below).
3. ``minhash_dedup``: datatrove's four MinHash stages (signatures, buckets, cluster, filter). Of each cluster
   the document with the smallest ``doc_id`` is kept (datatrove's choice depends on the task layout, so the
   result would otherwise depend on ``workers``). Exact duplicates always collide in every bucket, so MinHash
   removes them too; the drop reason tells ``exact_duplicate`` (same text as the kept document) from
   ``near_duplicate``. A last safety net (step ``exact_dedup``) removes exact duplicates too short to have a
   single MinHash shingle.

Word splitting and script profiles (``data/scripts.py``): every document goes through a regex word splitter
whose unit follows each character's script (datatrove's own word tokenizers need models or downloads offline), and
gets a *script profile* — english, alphabetic, spaced, dense, unspaced — whose datatrove filter instance
(:class:`PerProfileFilter`) has thresholds that fit the script.

Outputs in ``out_dir``: ``docs.parquet`` (surviving documents, input columns, sorted by ``doc_id``, zstd),
``drops.parquet`` (one row per dropped document: ``doc_id, declared_lang, step, reason, bytes``) and
``drop_counts.parquet`` (the aggregated :attr:`FilterReport.drops`). ``bytes`` always counts the document's
*input* UTF-8 bytes, so ``bytes_in == bytes of kept inputs + drop bytes``; ``bytes_out`` counts the normalized
output text.

Execution. ``workers == 1`` runs every stage in this process (datatrove runs a single worker's tasks in a plain
loop, so no ``__main__`` guard is needed: it works from pytest and Dagster assets). ``workers > 1`` runs the
datatrove part in a child Python process (``python -c``), where datatrove's forkserver pool is safe. Each call uses
a fresh folder under ``work_dir`` (datatrove silently skips tasks that a reused logging folder marks complete);
its bulky intermediates are deleted on success, its datatrove logs kept. On a cluster (``executor``: Ray or
Slurm, ``data/executors.py``) the stages run as ``workers`` tasks there, in a folder named after the inputs and
settings, so a rerun after a kill skips every task with a completion marker; the folder gets a fresh name when
the run succeeds. The kept documents do not depend on the executor or the task count (the dedup keeps the
smallest ``doc_id`` of each cluster).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import shutil
import time
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import regex
from datatrove.data import Document, DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import FTFYFormatter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.writers import ParquetWriter
from datatrove.utils.text import TextNormConfig

from mmbert_dagster.child import messages_only, python_command, run_child, say
from mmbert_dagster.data.scripts import PROFILES, WORD_TOKENIZER, script_profile
from mmbert_dagster.recipe import FilterConfig

INPUT_COLUMNS = ("doc_id", "source", "declared_lang", "text")
STEPS = ("normalize", "fineweb_quality", "gopher_quality", "gopher_repetition", "minhash_dedup", "exact_dedup")
DROPS_SCHEMA = {"doc_id": pl.String, "declared_lang": pl.String, "step": pl.String, "reason": pl.String,
                "bytes": pl.Int64}
COUNTS_SCHEMA = {"declared_lang": pl.String, "step": pl.String, "reason": pl.String, "docs": pl.Int64,
                 "bytes": pl.Int64}

# Intermediate files (datatrove writers). text_hash tells exact from near duplicates; cluster is MinHash's
# cluster id (-1: no duplicate).
_DOC_SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("declared_lang", pa.string()),
                         ("text", pa.string()), ("bytes_in", pa.int64()), ("text_hash", pa.string()),
                         ("cluster", pa.int64())])
_DOC_PL_SCHEMA = {"doc_id": pl.String, "source": pl.String, "declared_lang": pl.String, "text": pl.String,
                  "bytes_in": pl.Int64, "text_hash": pl.String, "cluster": pl.Int64}
_DROP_SCHEMA = pa.schema([("doc_id", pa.string()), ("declared_lang", pa.string()), ("step", pa.string()),
                          ("reason", pa.string()), ("bytes", pa.int64())])


# The [filters] settings behind each step's drops, and behind the datatrove reason codes they cause. Thresholds
# not listed here are fixed per script profile (_gopher_quality, _fineweb_quality, _gopher_repetition).
STEP_SETTINGS = {
    "normalize": ("min_doc_chars",),
    "fineweb_quality": (),
    "gopher_quality": ("min_doc_words", "max_doc_words", "max_symbol_word_ratio", "max_non_alpha_words_ratio"),
    "gopher_repetition": ("max_duplicate_line_fraction",),
    "minhash_dedup": ("minhash_ngram", "minhash_buckets", "minhash_hashes_per_bucket"),
    "exact_dedup": (),
}
REASON_SETTINGS = {
    "too_short": ("min_doc_chars",),
    "gopher_short_doc": ("min_doc_words",),
    "gopher_long_doc": ("max_doc_words",),
    "gopher_too_many_hashes": ("max_symbol_word_ratio",),
    "gopher_too_many_ellipsis": ("max_symbol_word_ratio",),
    "gopher_below_alpha_threshold": ("max_non_alpha_words_ratio",),
    "dup_line_frac": ("max_duplicate_line_fraction",),
}
_DOUBLED = {"min_doc_words", "max_doc_words"}  # x2 for dense and unspaced scripts (tokens are characters there)


class FilterError(ValueError):
    """Filter settings that leave nothing to train on; the message names the filter and its settings."""


@dataclass
class FilterReport:
    docs_in: int
    docs_out: int
    bytes_in: int  # UTF-8 bytes of the input texts
    bytes_out: int  # UTF-8 bytes of the output (normalized) texts
    drops: pl.DataFrame  # declared_lang, step, reason, docs, bytes (input bytes): one row per language x step x reason
    seconds_per_step: dict[str, float]


# --------------------------------------------------------------------------------------------------------------
# datatrove filters per script profile (word splitting and profiles: data/scripts.py)

def _gopher_quality(cfg: FilterConfig, profile: str) -> GopherQualityFilter:
    scale = 2 if profile in ("dense", "unspaced") else 1  # tokens are characters there: ≈ 2 per word
    # Gopher's 3–10 characters are English figures: averages run from ~3.3 (Vietnamese, one token per syllable)
    # to over 10 (Greenlandic); abugidas and syllabaries have short words, and char tokens have length 1
    avg = {"english": (3, 10), "alphabetic": (2, 15), "spaced": (None, 20)}.get(profile, (None, None))
    return GopherQualityFilter(
        min_doc_words=cfg.min_doc_words * scale, max_doc_words=cfg.max_doc_words * scale,
        min_avg_word_length=avg[0], max_avg_word_length=avg[1],
        max_symbol_word_ratio=cfg.max_symbol_word_ratio, max_non_alpha_words_ratio=cfg.max_non_alpha_words_ratio,
        min_stop_words=2 if profile == "english" else None,  # datatrove's stop words are English
        language=WORD_TOKENIZER,
    )


def _gopher_repetition(cfg: FilterConfig, profile: str) -> GopherRepetitionFilter:
    scale = 2 if profile in ("dense", "unspaced") else 1  # an n-gram of characters ≈ an n/2-gram of words
    return GopherRepetitionFilter(
        dup_line_frac=cfg.max_duplicate_line_fraction,
        top_n_grams=tuple((n * scale, f) for n, f in ((2, 0.2), (3, 0.18), (4, 0.16))),
        dup_n_grams=tuple(
            (n * scale, f) for n, f in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
        ),
        language=WORD_TOKENIZER,
    )


def _fineweb_quality(cfg: FilterConfig, profile: str) -> FineWebQualityFilter:
    return FineWebQualityFilter(
        line_punct_thr=0.0 if profile == "unspaced" else 0.12,  # Thai and Lao have no sentence-final punctuation
        short_line_length=10 if profile == "dense" else 30,  # 30 Han characters hold ~15 words
        language=WORD_TOKENIZER,
    )


class PerProfileFilter(BaseFilter):
    """A datatrove filter chosen per document by script profile.

    datatrove filters fix their language (word tokenizer, stop words) and thresholds when constructed, but a corpus
    mixes languages document by document. This wrapper holds one instance of the wrapped filter per profile and
    forwards each document to its profile's instance; the drop reasons are the wrapped filter's own."""

    type = "🔻 - FILTER"

    def __init__(self, step: str, make: Callable[[FilterConfig, str], BaseFilter], cfg: FilterConfig, exclusion_writer):
        self.name = step  # before super().__init__: datatrove names the step's stats from it
        super().__init__(exclusion_writer)
        self.filters = {profile: make(cfg, profile) for profile in PROFILES}

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filters[doc.metadata["profile"]].filter(doc)


# --------------------------------------------------------------------------------------------------------------
# Reading, normalization, writing

class ParquetInput(PipelineStep):
    """Reads the input parquet files; task ``rank`` of ``world_size`` takes every ``world_size``-th row (balanced
    even when the corpus is one file). Also assigns the script profile, once per document."""

    name = "read"
    type = "📖 - READER"

    def __init__(self, files: list[str], batch_rows: int = 512):
        super().__init__()
        self.files = list(files)
        self.batch_rows = batch_rows

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        row = 0
        for path in self.files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=self.batch_rows, columns=list(INPUT_COLUMNS)):
                with self.track_time("batch"):
                    cols = batch.to_pydict()
                    docs = []
                    for i in range(batch.num_rows):
                        if (row + i) % world_size != rank:
                            continue
                        text = cols["text"][i] or ""  # a null text is dropped as too short
                        lang = cols["declared_lang"][i]  # written back as it came (null included)
                        docs.append(Document(text=text, id=cols["doc_id"][i], metadata={
                            "source": cols["source"][i], "declared_lang": lang,
                            "bytes_in": len(text.encode("utf-8")), "profile": script_profile(lang, text),
                        }))
                row += batch.num_rows
                for doc in docs:
                    self.stat_update("documents")
                    yield doc


class Ftfy(FTFYFormatter):
    name = "ftfy"


_CONTROL = regex.compile(r"[^\S\n]+(?=\n)|[\p{Cc}--[\n\t]]", regex.VERSION1)


class StripControls(BaseFormatter):
    """Unify line ends (CRLF/CR → LF), drop control characters other than tab and newline (ftfy keeps some) and
    trailing spaces of lines, and NFC-normalize again (the removals can create new compositions)."""

    name = "strip_controls"

    def format(self, text: str) -> str:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = _CONTROL.sub("", text)
        return (text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)).strip()


class MinChars(BaseFilter):
    name = "normalize"

    def __init__(self, min_chars: int, exclusion_writer):
        super().__init__(exclusion_writer)
        self.min_chars = min_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return len(doc.text) >= self.min_chars or (False, "too_short")


def _text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


class DocWriter(ParquetWriter):
    """Documents with their text, one file per task (``00003.parquet``): the survivors of the quality filters
    (the MinHash filter stage reads task r's file back), then the MinHash survivors and the MinHash drops."""

    name = "write"

    def __init__(self, folder: str):
        super().__init__(folder, output_filename="${rank}.parquet", schema=_DOC_SCHEMA, max_file_size=-1,
                         use_content_defined_chunking=False, write_page_index=False)

    def _default_adapter(self, doc: Document) -> dict:
        m = doc.metadata
        return {"doc_id": doc.id, "source": m["source"], "declared_lang": m["declared_lang"], "text": doc.text,
                "bytes_in": m["bytes_in"], "text_hash": _text_hash(doc.text),
                "cluster": m.get("minhash_cluster_id", -1)}


class DropWriter(ParquetWriter):
    """datatrove ``exclusion_writer``: one row per dropped document, with the filter's reason code."""

    name = "drops"

    def __init__(self, folder: str, step: str):
        super().__init__(folder, output_filename="${rank}.parquet", schema=_DROP_SCHEMA, max_file_size=-1,
                         use_content_defined_chunking=False, write_page_index=False)
        self.step = step

    def _default_adapter(self, doc: Document) -> dict:
        m = doc.metadata
        return {"doc_id": doc.id, "declared_lang": m["declared_lang"], "step": self.step,
                "reason": m.get("filter_reason") or "", "bytes": m["bytes_in"]}


class TaskFileInput(PipelineStep):
    """Reads back exactly the file that task ``rank`` wrote (MinHash removals are indexed per task and document)."""

    name = "read_filtered"
    type = "📖 - READER"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = Path(self.folder) / f"{rank:05d}.parquet"
        if not path.is_file():  # the task kept no document
            return
        for batch in pq.ParquetFile(path).iter_batches(batch_size=512):
            cols = batch.to_pydict()
            for i in range(batch.num_rows):
                yield Document(text=cols["text"][i], id=cols["doc_id"][i], metadata={
                    "source": cols["source"][i], "declared_lang": cols["declared_lang"][i],
                    "bytes_in": cols["bytes_in"][i]})


# --------------------------------------------------------------------------------------------------------------
# The datatrove run (in this process or a child)

def _executor(pipeline, logging_dir: Path, tasks: int, workers: int) -> LocalPipelineExecutor:
    return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(logging_dir),
                                 skip_completed=False)


def _execute(pipeline, logging_dir: Path, tasks: int, workers: int, spec: dict, name: str,
             log: Callable[[str], None]) -> None:
    """One datatrove stage: this machine's executor, or the cluster's (``spec["executor"]``: Ray or Slurm,
    ``data/executors.py``, which resumes from the completion markers in ``logging_dir`` and names failed tasks)."""
    if not spec.get("executor"):
        _executor(pipeline, logging_dir, tasks, workers).run()
        return
    from mmbert_dagster.data.executors import DataExecutorSettings, run_pipeline

    run_pipeline(pipeline, DataExecutorSettings(**spec["executor"]), tasks=tasks, logging_dir=logging_dir,
                 name=f"filter-{name}", log=log)


def _stage_stats(logging_dir: Path) -> list[dict]:
    path = logging_dir / "stats.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _count(stat: float | dict, kind: type = int):
    # datatrove's stats.json holds a plain number for a count or time that was never spread, else a dict
    return kind(stat if isinstance(stat, (int, float)) else stat.get("total", 0))


def _run_datatrove(spec: dict, log: Callable[[str], None]) -> dict[str, float]:
    """Run the four datatrove executors described by ``spec``; return seconds per step."""
    run = Path(spec["run_dir"])
    cfg = FilterConfig(**spec["cfg"])
    workers = int(spec["workers"])
    tasks = workers
    excl = run / "excluded"
    # datatrove's default text normalization for shingles also deletes every combining mark (Mn): harmless for
    # Latin accents, but it erases Indic and Thai vowel signs and Arabic harakat (different words would collide),
    # and its per-character loop is the slowest part of hashing. The text is NFC already.
    minhash = MinhashConfig(n_grams=cfg.minhash_ngram, num_buckets=cfg.minhash_buckets,
                            hashes_per_bucket=cfg.minhash_hashes_per_bucket,
                            norm_config=TextNormConfig(norm_unicode_diacritics=False))
    seconds: dict[str, float] = {}

    # 1+2: normalize, quality filters, write survivors and their MinHash signatures in one pass
    steps = {
        "read": ParquetInput(spec["inputs"]),
        "ftfy": Ftfy(normalization="NFC"),
        "strip_controls": StripControls(),
        "normalize": MinChars(cfg.min_doc_chars, DropWriter(str(excl / "normalize"), "normalize")),
        # Cheapest first: each document is dropped by the first filter that rejects it, so putting the cheap
        # FineWeb line checks (≈2 % of the filter time, ≈20 % of the drops on the embedded corpus) before the
        # Gopher repetition n-gram counting (≈45 % of the time) saves that share of the expensive work.
        **{step: PerProfileFilter(step, make, cfg, DropWriter(str(excl / step), step))
           for step, make in (("fineweb_quality", _fineweb_quality), ("gopher_quality", _gopher_quality),
                              ("gopher_repetition", _gopher_repetition))},
        "write_filtered": DocWriter(str(run / "filtered")),
        "minhash_signatures": MinhashDedupSignature(str(run / "minhash" / "signatures"), config=minhash,
                                                    language=WORD_TOKENIZER),
    }
    t0 = time.perf_counter()
    _execute(list(steps.values()), run / "logs" / "filter", tasks, workers, spec, "quality", log)
    wall = time.perf_counter() - t0
    stats = _stage_stats(run / "logs" / "filter")
    if stats:
        log(f"filter read: {_count(stats[0]['stats'].get('documents', 0))} docs")
    for name, st in zip(steps, stats):
        seconds[name] = round(_count(st.get("time_stats", 0), float), 3)
        if name == "minhash_signatures":  # its timer also runs while it pulls documents through the steps above
            seconds[name] = round(max(seconds[name] - sum(v for k, v in seconds.items() if k != name), 0.0), 3)
        counts = st["stats"]
        if name in ("normalize", "fineweb_quality", "gopher_quality", "gopher_repetition"):
            total, kept = (_count(counts.get(k, 0)) for k in ("total", "forwarded"))
            log(f"filter {name}: {total} docs in, {kept} out, {seconds[name]:.1f}s (summed over {tasks} task(s))")
    log(f"filter: normalize + quality filters + signatures took {wall:.1f}s wall")

    # 3: MinHash buckets (one task per bucket), clusters (one task), filter (the first stage's tasks)
    # These are cheap (heap merges, a union-find, a pass over the survivors): running them in this process
    # spares the ~2 s start of a process pool each.
    for name, pipeline, n_tasks, n_workers in (
        ("minhash_buckets", [MinhashDedupBuckets(str(run / "minhash" / "signatures"), str(run / "minhash" / "buckets"),
                                                 config=minhash)], cfg.minhash_buckets, 1),
        ("minhash_cluster", [MinhashDedupCluster(str(run / "minhash" / "buckets"), str(run / "minhash" / "remove"),
                                                 config=minhash, save_cluster_id=True)], 1, 1),
        ("minhash_filter", [TaskFileInput(str(run / "filtered")),
                            MinhashDedupFilter(str(run / "minhash" / "remove"), load_cluster_ids=True,
                                               exclusion_writer=DocWriter(str(excl / "minhash_dedup"))),
                            DocWriter(str(run / "kept"))], tasks, 1),
    ):
        t0 = time.perf_counter()
        if name == "minhash_filter":
            # datatrove's MinhashDedupFilter passes a task's documents through WITHOUT their cluster ids when the
            # task has no .remove file (nothing to remove in it); empty files make every task load its ids
            (run / "minhash" / "remove").mkdir(parents=True, exist_ok=True)
            for rank in range(tasks):
                for suffix in ("remove", "clusters"):
                    (run / "minhash" / "remove" / f"{rank:06d}.{suffix}").touch(exist_ok=True)
        _execute(pipeline, run / "logs" / name, n_tasks, n_workers, spec, name.replace("_", "-"), log)
        seconds[name] = round(time.perf_counter() - t0, 3)
        stats = _stage_stats(run / "logs" / name)
        if name == "minhash_filter" and len(stats) > 1:
            counts = stats[1]["stats"]
            total, kept = (_count(counts.get(k, 0)) for k in ("total", "forwarded"))
            log(f"filter {name}: {total} docs in, {kept} out, {seconds[name]:.1f}s")
        else:
            log(f"filter {name}: {seconds[name]:.1f}s")
    return seconds


def _subprocess_main(spec_path: str) -> None:
    """Entry point of the child process (``workers > 1``): datatrove's forkserver pool needs a guarded main."""
    # datatrove's process pool stops its workers with SIGTERM when a stage ends; under a parent that ignores
    # SIGTERM (nohup-style launchers and supervisors; ignored signals survive exec) the pool waits forever for
    # them (seen: MinHash stage 1 done, the pool's terminate() hung). Workers forked from here get the default.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    spec = json.loads(Path(spec_path).read_text())
    seconds = _run_datatrove(spec, say)
    (Path(spec["run_dir"]) / "seconds.json").write_text(json.dumps(seconds))


def _run_in_subprocess(spec: dict, log: Callable[[str], None]) -> dict[str, float]:
    run = Path(spec["run_dir"])
    (run / "spec.json").write_text(json.dumps(spec))
    run_child(python_command("mmbert_dagster.data.filtering:_subprocess_main", str(run / "spec.json")),
              what="datatrove filtering", log=log, show=messages_only, log_file=run / "subprocess.log")
    return json.loads((run / "seconds.json").read_text())


# --------------------------------------------------------------------------------------------------------------
# Public entry point

def _check_inputs(files: list[Path]) -> None:
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"filter input {f} does not exist")
        names = pq.read_schema(f).names
        missing = [c for c in INPUT_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"filter input {f} lacks column(s) {missing}; expected {list(INPUT_COLUMNS)}")
    if files:
        ids = pl.scan_parquet(files).select("doc_id")
        if ids.select(pl.col("doc_id").null_count()).collect().item():
            raise ValueError("doc_id must not be null in the filter inputs")
        dups = ids.group_by("doc_id").len().filter(pl.col("len") > 1).head(5).collect()
        if dups.height:
            raise ValueError(f"doc_id must be unique across the filter inputs; repeated: {dups['doc_id'].to_list()}")


def _read_folder(folder: Path, schema: dict) -> pl.DataFrame:
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    return pl.read_parquet(files) if files else pl.DataFrame(schema=schema)


def run_filters(
    input_files: list[Path],
    out_dir: Path,
    cfg: FilterConfig,
    work_dir: Path,
    *,
    workers: int = 1,
    executor=None,
    log: Callable[[str], None] = print,
) -> FilterReport:
    """Filter and deduplicate the documents of ``input_files`` into ``out_dir`` (see the module docstring).

    ``input_files``: parquet files with ``doc_id`` (unique), ``source``, ``declared_lang``, ``text``.
    ``out_dir``: an existing (empty) folder; receives ``docs.parquet``, ``drops.parquet``, ``drop_counts.parquet``.
    ``work_dir``: scratch space; each call works in a fresh sub-folder of it.
    ``workers``: datatrove tasks run in parallel (>1 runs datatrove in a child process).
    ``executor``: ``data.executors.DataExecutorSettings`` of a Ray or Slurm cluster (None / ``local``: this
    machine); ``workers`` is then the number of tasks, and a rerun after a kill runs only the unfinished ones.

    Empty input (no files, or files without rows) is not an error: the outputs are written with zero rows and
    ``docs_out == 0``. Missing columns, missing files, null or repeated ``doc_id`` raise ``ValueError`` /
    ``FileNotFoundError`` before any work. Never raises for an unknown language or script.
    """
    files = [Path(f) for f in input_files]
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _check_inputs(files)
    cluster = executor is not None and executor.kind != "local"
    if cluster:
        from mmbert_dagster.data.executors import resumable_run_dir, retire_run_dir

        run = resumable_run_dir(work_dir, executor.kind, files, cfg=dataclasses.asdict(cfg), tasks=workers)
    else:
        run = work_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    resumed = run.exists()
    run.mkdir(parents=True, exist_ok=True)
    spec = {"inputs": [str(f) for f in files], "run_dir": str(run), "cfg": dataclasses.asdict(cfg), "workers": workers,
            "executor": dataclasses.asdict(executor) if cluster else None}
    where = f"{executor.kind}, {workers} task(s)" if cluster else f"{workers} worker(s)"
    log(f"filter: {len(files)} input file(s), {where}, work folder {run}" + (" (resuming)" if resumed else ""))

    if cluster:
        seconds = _run_datatrove(spec, log)
        run = retire_run_dir(run)
    else:
        seconds = _run_datatrove(spec, log) if workers == 1 else _run_in_subprocess(spec, log)

    t0 = time.perf_counter()
    if files:
        totals = pl.scan_parquet(files).select(
            docs=pl.len(), bytes=pl.col("text").str.len_bytes().sum().fill_null(0)
        ).collect().row(0, named=True)
    else:
        totals = {"docs": 0, "bytes": 0}
    drops = pl.concat([_read_folder(run / "excluded" / step, DROPS_SCHEMA) for step in STEPS[:4]],
                      how="vertical_relaxed")
    # MinHash keeps one document per cluster, but which one depends on the task layout: keep the smallest doc_id of
    # each cluster instead, so the result does not depend on `workers`. Drops whose text equals the kept
    # document's are exact duplicates, the others near duplicates.
    pool = pl.concat([_read_folder(run / "kept", _DOC_PL_SCHEMA),
                      _read_folder(run / "excluded" / "minhash_dedup", _DOC_PL_SCHEMA)]).sort("doc_id")
    clustered = pl.col("cluster") >= 0
    pool = pool.with_columns(
        keep=~clustered | (pl.col("doc_id") == pl.col("doc_id").first().over("cluster")),
        exact=pl.col("text_hash") == pl.col("text_hash").first().over("cluster"),
    )
    kept = pool.filter("keep")
    # Safety net: exact duplicates MinHash could not see (fewer words than one shingle); keep the first by doc_id
    first = kept["text_hash"].is_first_distinct()
    dup_drops = [
        pool.filter(~pl.col("keep")).select(
            "doc_id", "declared_lang", step=pl.lit("minhash_dedup"), bytes="bytes_in",
            reason=pl.when("exact").then(pl.lit("exact_duplicate")).otherwise(pl.lit("near_duplicate"))),
        kept.filter(~first).select(
            "doc_id", "declared_lang", step=pl.lit("exact_dedup"), reason=pl.lit("exact_duplicate"), bytes="bytes_in"),
    ]
    kept = kept.filter(first)
    drops = pl.concat([drops, *(d.select(list(DROPS_SCHEMA)) for d in dup_drops)], how="vertical_relaxed").select(
        pl.col(c).cast(t) for c, t in DROPS_SCHEMA.items()
    ).sort(pl.col("step").replace_strict({s: i for i, s in enumerate(STEPS)}, return_dtype=pl.Int32), "doc_id")
    counts = drops.group_by("declared_lang", "step", "reason").agg(docs=pl.len(), bytes=pl.col("bytes").sum()).select(
        pl.col(c).cast(t) for c, t in COUNTS_SCHEMA.items()
    ).sort("declared_lang", "step", "reason", nulls_last=True)

    docs_out = kept.select(INPUT_COLUMNS)
    if totals["docs"] - docs_out.height != drops.height:
        raise RuntimeError(
            f"filter bookkeeping mismatch: {totals['docs']} in, {docs_out.height} out, "
            f"but {drops.height} drops recorded"
        )
    docs_out.write_parquet(out_dir / DOCS_FILE, compression="zstd")
    drops.write_parquet(out_dir / "drops.parquet", compression="zstd")
    counts.write_parquet(out_dir / "drop_counts.parquet", compression="zstd")
    seconds["collect"] = round(time.perf_counter() - t0, 3)
    report = FilterReport(
        docs_in=int(totals["docs"]), docs_out=docs_out.height, bytes_in=int(totals["bytes"]),
        bytes_out=int(docs_out["text"].str.len_bytes().sum() or 0), drops=counts, seconds_per_step=seconds,
    )
    log(f"filter: kept {report.docs_out}/{report.docs_in} docs, {report.bytes_out}/{report.bytes_in} bytes; "
        f"{drops.height} drops, by step: {dict(drops.group_by('step').len().iter_rows())}")
    for sub in ("filtered", "kept", "excluded", "minhash"):  # the datatrove logs stay for inspection
        shutil.rmtree(run / sub, ignore_errors=True)
    return report


def why_nothing_kept(report: FilterReport, cfg: FilterConfig, recipe_file: str = "recipe") -> str | None:
    """Why the filters kept no document — which filter removed the last ones, with which reasons and ``[filters]``
    settings — or None when some document survived (or there was no input: nothing was removed)."""
    if report.docs_out or not report.docs_in:
        return None
    per_step = report.drops.group_by("step", "reason").agg(pl.col("docs").sum())
    steps = [step for step in STEPS if step in set(per_step["step"])]

    def describe(step: str) -> str:
        rows = per_step.filter(pl.col("step") == step).sort("docs", "reason", descending=[True, False])
        reasons = ", ".join(f"{r or 'no reason'}: {n}" for r, n in rows.select("reason", "docs").iter_rows())
        named = [f for r in rows["reason"] for f in REASON_SETTINGS.get(r, ())] or list(STEP_SETTINGS[step])
        settings = ", ".join(
            f"{f} = {getattr(cfg, f)}" + (" (x2 for dense/unspaced scripts)" if f in _DOUBLED else "")
            for f in dict.fromkeys(named)
        )
        how = f"with {settings}" if settings else f"by thresholds fixed per script profile in {__name__}"
        return f"{step} dropped {int(rows['docs'].sum())} ({reasons}) {how}"

    last, earlier = steps[-1], steps[:-1]
    message = (f"{recipe_file}: [filters] removed all {report.docs_in} documents, nothing is left to train on: "
               f"{describe(last)}")
    if earlier:
        message += "; before it, " + "; ".join(describe(step) for step in earlier)
    return message + f". Loosen [filters] in {recipe_file}."


DOCS_FILE = "docs.parquet"  # in filtered_corpus: the kept documents (doc_id, source, declared_lang, text)


def filter_corpus(raw_corpus_dir: Path, out_dir: Path, cfg: FilterConfig, work_dir: Path, *, workers: int = 1,
                  executor=None, recipe_file: str = "recipe", log: Callable[[str], None] = print) -> FilterReport:
    """The filtered_corpus artifact: :func:`run_filters` on a raw_corpus artifact's documents, refused with a
    ``FilterError`` naming filter and settings when it keeps nothing (before the caller commits the folder)."""
    from mmbert_dagster.data.sources import raw_docs_files

    report = run_filters(raw_docs_files(raw_corpus_dir), out_dir, cfg, work_dir, workers=workers, executor=executor,
                         log=log)
    problem = why_nothing_kept(report, cfg, recipe_file)
    if problem:
        raise FilterError(problem)
    return report


def docs_files(filtered_corpus_dir: Path) -> list[Path]:
    """The document parquet files of a filtered_corpus artifact."""
    return [Path(filtered_corpus_dir) / DOCS_FILE]


def drops_summary(report: FilterReport) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(docs and bytes dropped per step and reason, docs dropped per language x step)``, largest first."""
    by_step = report.drops.group_by("step", "reason").agg(pl.col("docs").sum(), pl.col("bytes").sum()).sort(
        ["docs", "step", "reason"], descending=[True, False, False])
    by_lang = report.drops.pivot(on="step", index="declared_lang", values="docs", aggregate_function="sum").fill_null(0)
    by_lang = by_lang.with_columns(total=pl.sum_horizontal(pl.exclude("declared_lang"))).sort(
        ["total", "declared_lang"], descending=[True, False])
    return by_step, by_lang
