"""Where documents come from: the embedded sample, local files, or Hugging Face datasets.

Every source yields plain dicts ``{doc_id, source, declared_lang, text}``; ``write_raw_corpus`` streams them into
parquet parts, so a corpus larger than memory never has to be held at once.

Bad input policy (documented in the README):
- a path that does not exist, a glob that matches nothing, or a source that yields no document → ``SourceError``;
- a malformed JSONL line, a file that is not valid UTF-8, or a JSON string holding a lone surrogate escape
  (``"\\ud800"``: valid JSON, but no Unicode text — it cannot be written as UTF-8) → ``SourceError`` naming the file
  and line, unless the source is configured with ``on_bad_record="skip"``: then the record is skipped, counted
  and logged.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

RAW_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("source", pa.string()), ("declared_lang", pa.string()), ("text", pa.string())]
)
HELDOUT_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("source", pa.string()), ("declared_lang", pa.string()), ("article", pa.int64()),
     ("text", pa.string())]
)
UNKNOWN_LANG = "und"
# JSON decodes a surrogate pair to one code point, so a surrogate left in a decoded string is a lone one
_SURROGATE = re.compile("[\ud800-\udfff]")


class SourceError(ValueError):
    """Bad input data; the message names the file (and line) and the problem."""


@dataclass
class SkipCounter:
    """Counts records skipped under ``on_bad_record="skip"``, by reason; the first ``logged`` are logged."""

    counts: dict[str, int] = field(default_factory=dict)
    logged: int = 20

    def skip(self, reason: str, where: str, log: Callable[[str], None]) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if sum(self.counts.values()) <= self.logged:
            log(f"skipped {where}: {reason}")


def embedded_dir() -> Path:
    return Path(str(resources.files("mmbert_dagster.data.embedded")))


def iter_embedded(log: Callable[[str], None] = print) -> Iterator[dict]:
    path = embedded_dir() / "corpus.parquet"
    if not path.is_file():
        raise SourceError(f"{path}: the embedded corpus is missing; rebuild it with scripts/build_embedded_corpus.py")
    pf = pq.ParquetFile(path)
    for i in range(pf.num_row_groups):
        yield from pf.read_row_group(i, columns=RAW_SCHEMA.names).to_pylist()


def embedded_heldout() -> Path:
    return embedded_dir() / "heldout.parquet"


def _expand(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if any(ch in expanded for ch in "*?["):
            matches = sorted(glob.glob(expanded, recursive=True))
            if not matches:
                raise SourceError(f"{pattern}: the glob matches no file")
            files.extend(Path(m) for m in matches if Path(m).is_file())
        else:
            p = Path(expanded)
            if not p.exists():
                raise SourceError(f"{pattern}: the path does not exist")
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    if not files:
        raise SourceError(f"{patterns}: no input files found")
    return files


def _record(doc_id: str, source: str, lang: object, text: object, where: str) -> dict:
    if not isinstance(text, str):
        raise SourceError(f"{where}: text field is {type(text).__name__}, expected a string")
    lang = str(lang) if lang else UNKNOWN_LANG
    return {"doc_id": doc_id, "source": source, "declared_lang": lang, "text": unicodedata.normalize("NFC", text)}


def iter_local_files(
    patterns: list[str],
    *,
    text_field: str = "text",
    lang_field: str | None = None,
    default_lang: str = UNKNOWN_LANG,
    id_field: str | None = None,
    on_bad_record: str = "error",
    skips: SkipCounter | None = None,
    log: Callable[[str], None] = print,
) -> Iterator[dict]:
    """Documents from JSONL (``.jsonl``/``.json``/``.jsonl.gz``), Parquet or plain-text files (one document per
    ``.txt`` file). ``lang_field`` names an optional per-record language column (ISO 639-3 + script)."""
    if on_bad_record not in ("error", "skip"):
        raise SourceError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    skips = skips if skips is not None else SkipCounter()

    def bad(where: str, reason: str) -> None:
        if on_bad_record == "error":
            raise SourceError(f"{where}: {reason} (set on_bad_record='skip' to skip and count such records)")
        skips.skip(reason, where, log)

    paths = _expand(patterns)
    total = 0
    for path in paths:
        before = total
        for doc in _iter_file(path, text_field, lang_field, default_lang, id_field, bad):
            total += 1
            yield doc
        if total == before:
            log(f"warning: {path}: no documents (empty file?)")
    if not total:
        raise SourceError(f"{', '.join(map(str, paths))}: no documents in the input file(s) (empty?)")


def _lone_surrogate(obj: dict, fields: tuple[str | None, ...]) -> str | None:
    """The problem with the first of ``fields`` whose string holds a lone surrogate, or None."""
    for name in fields:
        value = obj.get(name) if name else None
        m = _SURROGATE.search(value) if isinstance(value, str) else None
        if m:
            return (f"field {name!r} holds a lone surrogate \\u{ord(m.group()):04x} at character {m.start()} "
                    "(an unpaired UTF-16 escape: not Unicode text)")
    return None


def _iter_file(path: Path, text_field: str, lang_field: str | None, default_lang: str, id_field: str | None,
               bad: Callable[[str, str], None]) -> Iterator[dict]:
    name = path.name.lower()
    source = f"local:{path.stem.split('.')[0]}"
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        import gzip

        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad(where, f"invalid UTF-8 at byte {e.start}")
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    bad(where, f"malformed JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    bad(where, f"record has no string field {text_field!r}")
                    continue
                surrogate = _lone_surrogate(obj, (text_field, lang_field, id_field))
                if surrogate:
                    bad(where, surrogate)
                    continue
                doc_id = str(obj[id_field]) if id_field and id_field in obj else f"{path.name}:{lineno}"
                lang = obj.get(lang_field) if lang_field else default_lang
                yield _record(doc_id, source, lang or default_lang, obj[text_field], where)
    elif name.endswith(".parquet"):
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a non-parquet file
            raise SourceError(f"{path}: not a readable parquet file ({e})") from e
        if text_field not in pf.schema_arrow.names:
            raise SourceError(f"{path}: no column {text_field!r}; columns are {pf.schema_arrow.names}")
        if lang_field and lang_field not in pf.schema_arrow.names:
            raise SourceError(f"{path}: no column {lang_field!r} (lang_field); columns are {pf.schema_arrow.names}")
        row = 0
        for batch in pf.iter_batches(batch_size=2048):
            for rec in batch.to_pylist():
                row += 1
                where = f"{path}:row {row}"
                if not isinstance(rec.get(text_field), str):
                    bad(where, f"{text_field!r} is not a string")
                    continue
                doc_id = str(rec[id_field]) if id_field and rec.get(id_field) is not None else f"{path.name}:{row}"
                lang = rec.get(lang_field) if lang_field else default_lang
                yield _record(doc_id, source, lang or default_lang, rec[text_field], where)
    elif name.endswith((".txt", ".text", ".md")):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            bad(str(path), f"invalid UTF-8 at byte {e.start}")
            return
        yield _record(path.name, source, default_lang, text, str(path))
    else:
        raise SourceError(f"{path}: unsupported file type; use .jsonl, .jsonl.gz, .parquet or .txt")


def iter_huggingface(
    dataset: str,
    configs: list[str],
    *,
    split: str = "train",
    text_field: str = "text",
    max_docs_per_config: int | None = None,
    log: Callable[[str], None] = print,
) -> Iterator[dict]:
    """FineWeb-2-style per-language subsets streamed with `datasets`: one config per language (``deu_Latn``...).

    ``dataset`` may also be a local folder laid out like the hub dataset (``data/<config>/<split>/*.parquet``).
    """
    try:
        import datasets
    except ImportError as e:
        raise SourceError("the huggingface source needs the `datasets` package: pip install 'mmbert-dagster[hf]'") from e
    if not configs:
        raise SourceError(f"{dataset}: the huggingface source needs at least one config (language subset)")
    local = Path(dataset).expanduser()
    for config in configs:
        try:
            if local.is_dir():
                files = sorted(str(p) for p in (local / "data" / config / split).glob("*.parquet"))
                if not files:
                    raise SourceError(f"{local}/data/{config}/{split}: no parquet files for config {config!r}")
                ds = datasets.load_dataset("parquet", data_files={split: files}, split=split, streaming=True)
            else:
                if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
                    raise SourceError(
                        f"{dataset} ({config}): the Hugging Face source needs the network, but HF_HUB_OFFLINE=1 is "
                        "set (the default pipeline runs offline); unset it to stream from the hub, or use the "
                        "embedded or local source"
                    )
                ds = datasets.load_dataset(dataset, name=config, split=split, streaming=True)
        except SourceError:
            raise
        except Exception as e:  # datasets raises many types for network/config failures
            raise SourceError(f"{dataset} ({config}): cannot open the dataset: {type(e).__name__}: {e}") from e
        log(f"streaming {dataset} config {config}")
        for i, rec in enumerate(ds):
            if max_docs_per_config is not None and i >= max_docs_per_config:
                break
            if text_field not in rec:
                raise SourceError(f"{dataset} ({config}): record has no field {text_field!r}; fields are {list(rec)}")
            doc_id = str(rec.get("id") or f"{config}:{i}")
            yield _record(doc_id, f"hf:{dataset.rstrip('/').split('/')[-1]}", config, rec[text_field], f"{dataset}:{config}:{i}")


def write_raw_corpus(
    docs: Iterator[dict], out_dir: Path, *, rows_per_part: int = 20_000, log: Callable[[str], None] = print
) -> dict:
    """Stream documents into ``out_dir/docs/part-00000.parquet``...; returns counts. Duplicate doc_ids and empty
    texts are rejected: downstream tables join on doc_id."""
    parts = Path(out_dir) / "docs"
    parts.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    buffer: list[dict] = []
    n_docs = n_bytes = n_parts = 0
    langs: dict[str, int] = {}

    def flush() -> None:
        nonlocal n_parts, buffer
        if buffer:
            table = pa.Table.from_pylist(buffer, schema=RAW_SCHEMA)
            pq.write_table(table, parts / f"part-{n_parts:05d}.parquet", compression="zstd")
            n_parts += 1
            buffer = []

    for doc in docs:
        if doc["doc_id"] in seen:
            raise SourceError(f"duplicate doc_id {doc['doc_id']!r} (source {doc['source']}); doc ids must be unique")
        seen.add(doc["doc_id"])
        if not doc["text"].strip():
            continue
        buffer.append(doc)
        n_docs += 1
        n_bytes += len(doc["text"].encode("utf-8"))
        langs[doc["declared_lang"]] = langs.get(doc["declared_lang"], 0) + 1
        if len(buffer) >= rows_per_part:
            flush()
            log(f"raw_corpus: {n_docs} documents, {n_bytes / 1e6:.1f} MB written")
    flush()
    if n_docs == 0:
        raise SourceError("the source yielded no documents (empty input files?)")
    log(f"raw_corpus: {n_docs} documents, {n_bytes / 1e6:.1f} MB written in {n_parts} part(s)")
    return {"docs": n_docs, "bytes": n_bytes, "parts": n_parts, "declared_languages": len(langs)}


def raw_docs_files(raw_corpus_dir: Path) -> list[Path]:
    """The document parts of a raw_corpus artifact (``docs/part-*.parquet``)."""
    return sorted((Path(raw_corpus_dir) / "docs").glob("*.parquet"))


def read_docs(folder: Path, columns: list[str] | None = None) -> pl.LazyFrame:
    """The documents of a corpus artifact (``raw_corpus`` or ``filtered_corpus``) as a lazy polars frame."""
    files = sorted((Path(folder) / "docs").glob("*.parquet")) or sorted(Path(folder).glob("docs*.parquet"))
    if not files:
        raise SourceError(f"{folder}: no document parquet files")
    lf = pl.scan_parquet(files)
    return lf.select(columns) if columns else lf


HELDOUT_FILE = "heldout.parquet"  # in raw_corpus: held-out evaluation text no training stage sees


def read_heldout(raw_corpus_dir: Path, langs: list[str] | None = None) -> pl.DataFrame | None:
    """The held-out evaluation text of a raw_corpus artifact (only ``langs`` if given), or None if it has none."""
    path = Path(raw_corpus_dir) / HELDOUT_FILE
    if not path.is_file():
        return None
    heldout = pl.read_parquet(path)
    return heldout.filter(pl.col("declared_lang").is_in(langs)) if langs is not None else heldout


def build_raw_corpus(docs: Iterator[dict], out_dir: Path, heldout: Path | None, *,
                     log: Callable[[str], None] = print) -> dict:
    """The raw_corpus artifact in ``out_dir``: ``docs/part-*.parquet`` (:func:`write_raw_corpus`) and, if given,
    the held-out evaluation text (``heldout.parquet``, checked for the columns of ``HELDOUT_SCHEMA``)."""
    stats = write_raw_corpus(docs, out_dir, log=log)
    stats["heldout_rows"] = 0
    if heldout is not None:
        missing = set(HELDOUT_SCHEMA.names) - set(pq.read_schema(heldout).names)
        if missing:
            raise SourceError(f"{heldout}: held-out file lacks column(s) {sorted(missing)}")
        shutil.copyfile(heldout, Path(out_dir) / HELDOUT_FILE)
        stats["heldout_rows"] = pq.read_metadata(heldout).num_rows
    return stats


def language_sizes(folder: Path, lang_column: str = "declared_lang") -> pl.DataFrame:
    """(lang, docs, bytes) of a corpus artifact, largest first."""
    return (read_docs(folder).group_by(lang_column).agg(docs=pl.len(), bytes=pl.col("text").str.len_bytes().sum())
            .sort(["bytes", lang_column], descending=[True, False]).collect())


def heldout_leaks(folder: Path, probe_chars: int = 200) -> tuple[int, list[tuple[str, str]]]:
    """Held-out texts of a raw_corpus artifact that occur in its training documents of the same language:
    ``(probes compared, [(lang, start of the leaked probe)])``. A probe is ``probe_chars`` from the middle of
    each held-out text (at least 50)."""
    heldout = read_heldout(folder)
    if heldout is None:
        return 0, []
    half = probe_chars // 2
    probes = heldout.select("declared_lang", probe=pl.col("text").str.slice(
        pl.col("text").str.len_chars() // 2 - half, probe_chars)).filter(pl.col("probe").str.len_chars() >= 50)
    docs = read_docs(folder, ["declared_lang", "text"]).filter(
        pl.col("declared_lang").is_in(probes["declared_lang"].unique().to_list())).collect()
    by_lang = {lang: " ".join(g["text"].to_list()) for (lang,), g in docs.group_by("declared_lang")}
    leaks = [(lang, p[:60]) for lang, p in probes.iter_rows() if p in by_lang.get(lang, "")]
    return probes.height, leaks


def heldout_texts(raw_corpus_dir: Path, langs: list[str], max_docs: int) -> list[str]:
    """Up to ``max_docs`` held-out texts of ``langs``, evenly spaced in doc_id order (a fixed sample: the held-out
    loss of every run of a stage is measured on the same texts); empty if the corpus has no held-out text."""
    heldout = read_heldout(raw_corpus_dir, langs)
    if heldout is None:
        return []
    heldout = heldout.sort("doc_id")
    step = max(1, heldout.height // max_docs)
    return heldout["text"].to_list()[::step][:max_docs]
