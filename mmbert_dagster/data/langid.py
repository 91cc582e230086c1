"""fastText language identification: train on labelled text (or take a user model such as GlotLID), calibrate
per-language confidence thresholds on held-out text, and label every document.

Language ID only labels (datatrove's "a language step can label without dropping"): a document below its
language's threshold is marked ``passed = false``; which languages a stage keeps is decided in ``sql/``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import polars as pl
from datatrove.pipeline.base import PipelineStep

from mmbert_dagster.child import ChildProcessFailed, python_command, run_child
from mmbert_dagster.recipe import LanguageIdConfig

LABEL = "__label__"
_WS = re.compile(r"\s+")
CHUNK_CHARS = 300  # fastText learns from short lines; documents are cut into ~300-char pieces at line breaks
PREDICT_CHARS = 4000  # a document's language is predicted from its first 4000 characters


class LanguageIdError(ValueError):
    pass


def _load_fasttext():
    import fasttext

    # fastText prints a warning for every load_model of a model without this attribute; silence it.
    fasttext.FastText.eprint = lambda *args, **kwargs: None
    return fasttext


# Scripts written without spaces between words. fastText averages one vector per whitespace token, so a
# 100-character Chinese run would weigh as much as one Latin word; splitting these scripts into characters
# (and learning character bigrams through wordNgrams=2) makes them count per character.
_UNSPACED = re.compile(
    "([\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u31a0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u0f00-\u0fff\U00020000-\U0002fa1f])"
)


def _clean(text: str) -> str:
    return _WS.sub(" ", _UNSPACED.sub(r" \1 ", text)).strip()


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut a document into pieces of about ``size`` characters at line boundaries (long lines are cut hard)."""
    out, cur = [], ""
    for line in text.splitlines():
        line = line.strip()
        while len(line) > 2 * size:
            out.append(line[:size])
            line = line[size:]
        if not line:
            continue
        cur = f"{cur} {line}" if cur else line
        if len(cur) >= size:
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    return [_clean(c) for c in out if len(c) >= 20]


def _hash_unit(key: str) -> float:
    """A stable pseudo-random number in [0, 1) from a string."""
    return int(hashlib.md5(key.encode()).hexdigest()[:8], 16) / 2**32


def split_labelled(docs: pl.DataFrame | pl.LazyFrame, cfg: LanguageIdConfig
                   ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(lang, chunk) pairs for training and held-out evaluation from documents (doc_id, declared_lang, text).

    The split is by a hash of (doc_id, chunk index), so it is stable and every language is on both sides.
    Text per language is capped on both sides — ``max_train_chars_per_lang`` for training,
    ``max_heldout_chars_per_lang`` held out — by keeping each chunk with probability cap / language chars (again
    by hash), so the sample spreads over all of a language's sources and documents and its size does not grow
    with the corpus. A LazyFrame is read in batches (memory stays flat however large the corpus).
    """
    lf = docs.lazy().filter(pl.col("declared_lang") != "und")
    lang_chars = dict(lf.group_by("declared_lang").agg(pl.col("text").str.len_chars().sum()).collect().iter_rows())
    keep = {lang: min(1.0, cfg.max_train_chars_per_lang / max(n, 1)) for lang, n in lang_chars.items()}
    keep_held = {lang: min(1.0, cfg.max_heldout_chars_per_lang / max(n * cfg.holdout_fraction, 1))
                 for lang, n in lang_chars.items()}
    train, held = [], []
    for batch in lf.select("doc_id", "declared_lang", "text").collect_batches(chunk_size=5000):
        for doc_id, lang, text in batch.iter_rows():
            for i, piece in enumerate(chunks(text)):
                key = f"{doc_id}#{i}"
                if _hash_unit(key) < cfg.holdout_fraction:
                    if _hash_unit("held:" + key) < keep_held[lang]:
                        held.append((lang, piece))
                elif _hash_unit("train:" + key) < keep[lang]:
                    train.append((lang, piece))
    return train, held


def train_model(train: list[tuple[str, str]], out_path: Path, cfg: LanguageIdConfig, seed: int,
                held: list[tuple[str, str]] | None = None, log: Callable[[str], None] = print) -> float:
    """Train a supervised fastText classifier on (lang, text) pairs, in a fresh process (see ``_TRAIN_CHILD``);
    returns seconds.

    A training that diverges — loudly ("Encountered NaN") or silently, into a model whose held-out accuracy on
    ``held`` is below ``cfg.min_heldout_accuracy`` — is retried with the learning rate halved (what fastText's
    docs suggest for NaN), down to ``cfg.lr / 8``, then refused with a LanguageIdError.
    """
    if not train:
        raise LanguageIdError("no labelled text to train language ID on (all documents are 'und'?)")
    _load_fasttext()  # fail here, with the install hint, if fastText is missing
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.txt"
        with open(data, "w", encoding="utf-8") as f:
            for i in order:
                lang, text = train[i]
                f.write(f"{LABEL}{lang} {text}\n")
        start = time.perf_counter()
        lr = cfg.lr
        while True:
            params = dict(input=str(data), epoch=cfg.epochs, dim=cfg.dim, minCount=cfg.min_count,
                          minn=cfg.char_ngrams[0], maxn=cfg.char_ngrams[1], wordNgrams=cfg.word_ngrams,
                          bucket=cfg.buckets, lr=lr, loss="softmax", thread=cfg.threads, seed=seed, verbose=0)
            error = _train_in_fresh_process(params, Path(tmp) / "model.bin")
            if error and "NaN" not in error:
                raise LanguageIdError(f"fastText training failed at lr={lr}: {error}")
            problem = "diverged (NaN)" if error else _collapsed(load_model(Path(tmp) / "model.bin"), held,
                                                                 cfg.min_heldout_accuracy)
            if problem is None:
                break
            if lr / 2 < cfg.lr / 8:
                raise LanguageIdError(f"fastText training {problem} at every learning rate from {cfg.lr} down to {lr}; "
                                      "check the corpus' declared languages or lower [lid] lr")
            log(f"fastText training {problem} at lr={lr}; retrying at lr={lr / 2}")
            lr /= 2
        seconds = time.perf_counter() - start
        shutil.move(Path(tmp) / "model.bin", out_path)
    return seconds


# Why a fresh process: in a long-lived process fastText's training can start from garbage. Measured on the
# embedded corpus: after the raw_corpus asset ran in the same Python process, train_supervised raised
# "Encountered NaN" within a second at every learning rate from 0.8 to 0.1 (or, in other runs, silently gave a
# model passing 2 languages), while the same data in a fresh process reaches 0.93 held-out accuracy; whether it
# happens depends on what the process allocated before (one extra polars query made it go away) — the signature
# of reading uninitialized memory. A fresh interpreter per training costs ~1 s.
def _train_child(params_json: str, out: str) -> None:
    """In the fresh interpreter: train fastText with ``params`` and save the model to ``out``."""
    try:
        _load_fasttext().train_supervised(**json.loads(params_json)).save_model(out)
    except RuntimeError as e:
        sys.exit(f"fastText: {e}")


def _train_in_fresh_process(params: dict, out: Path) -> str | None:
    """Train in a new interpreter and save to ``out``; the error message, or None on success."""
    try:
        run_child(python_command("mmbert_dagster.data.langid:_train_child", json.dumps(params), str(out)),
                  what="fastText training", show=lambda line: None)
    except ChildProcessFailed as e:
        return (e.tail.strip().splitlines() or [f"exit code {e.returncode}"])[-1]
    return None if out.is_file() else "fastText wrote no model file"


def _collapsed(model, held: list[tuple[str, str]] | None, floor: float) -> str | None:
    """Why ``model`` looks diverged (held-out accuracy below ``floor``), or None."""
    if not held or floor <= 0:
        return None
    pred, _ = predict(model, [t for _, t in held])
    accuracy = float(np.mean([p == g for p, (g, _) in zip(pred, held)]))
    if accuracy < floor:
        return f"collapsed (held-out accuracy {accuracy:.3f} < min_heldout_accuracy {floor})"
    return None


def load_model(path: Path | str):
    path = Path(path).expanduser()
    if not path.is_file():
        raise LanguageIdError(f"{path}: language ID model file does not exist")
    try:
        return _load_fasttext().load_model(str(path))
    except ValueError as e:
        raise LanguageIdError(f"{path}: not a fastText model ({e})") from e


def model_labels(model) -> list[str]:
    return [label.removeprefix(LABEL) for label in model.get_labels()]


def predict(model, texts: list[str]) -> tuple[list[str], np.ndarray]:
    if not texts:
        return [], np.zeros(0, dtype=np.float32)
    labels, probs = model.predict([_clean(t[:PREDICT_CHARS]) for t in texts], k=1)
    return [lab[0].removeprefix(LABEL) for lab in labels], np.array([p[0] for p in probs], dtype=np.float32).clip(0, 1)


def calibrate(model, held: list[tuple[str, str]], cfg: LanguageIdConfig) -> tuple[pl.DataFrame, dict]:
    """Per-language thresholds and held-out accuracy.

    threshold(lang) = the ``threshold_quantile`` quantile of the scores of held-out chunks correctly predicted
    as ``lang``, clipped to [min_threshold, max_threshold] (FineWeb-2-style per-language thresholds); languages
    without such chunks get ``min_threshold``.
    """
    known = set(model_labels(model))
    pred, score = predict(model, [t for _, t in held])
    gold = [lang for lang, _ in held]
    frame = pl.DataFrame({"lang": gold, "pred": pred, "score": score}).with_columns(
        correct=pl.col("lang") == pl.col("pred")
    )
    per_lang = (
        frame.group_by("lang")
        .agg(heldout_chunks=pl.len(), accuracy=pl.col("correct").mean())
        .sort("lang")
    )
    correct_q = (
        frame.filter("correct")
        .group_by("pred")
        .agg(q=pl.col("score").quantile(cfg.threshold_quantile, "nearest"))
        .rename({"pred": "lang"})
    )
    thresholds = (
        pl.DataFrame({"lang": sorted(known)})
        .join(correct_q, on="lang", how="left")
        .with_columns(
            threshold=pl.col("q").fill_null(cfg.min_threshold).clip(cfg.min_threshold, cfg.max_threshold).cast(pl.Float32)
        )
        .drop("q")
        .join(per_lang, on="lang", how="left")
    )
    summary = {
        "heldout_chunks": frame.height,
        "heldout_accuracy": float(frame["correct"].mean()) if frame.height else float("nan"),
        "heldout_macro_accuracy": float(per_lang["accuracy"].mean()) if per_lang.height else float("nan"),
        "heldout_languages_unknown_to_model": sorted(set(gold) - known),
    }
    return thresholds, summary


def label_documents(
    model, thresholds: pl.DataFrame, docs: Iterable[pl.DataFrame], *, log: Callable[[str], None] = print
) -> pl.DataFrame:
    """Label each document: (doc_id, source, declared_lang, lang, lid_score, threshold, passed)."""
    th = dict(zip(thresholds["lang"].to_list(), thresholds["threshold"].to_list()))
    default = min(th.values()) if th else 0.5
    out = []
    n = 0
    for batch in docs:
        langs, scores = predict(model, batch["text"].to_list())
        out.append(
            batch.select("doc_id", "source", "declared_lang").with_columns(
                lang=pl.Series(langs, dtype=pl.String),
                lid_score=pl.Series(scores, dtype=pl.Float32),
                threshold=pl.Series([th.get(lang, default) for lang in langs], dtype=pl.Float32),
            )
        )
        n += batch.height
        log(f"language_id_table: {n} documents labelled")
    if not out:
        raise LanguageIdError("no documents to label")
    table = pl.concat(out).with_columns(passed=pl.col("lid_score") >= pl.col("threshold"))
    return table.sort("doc_id")


def agreement(table: pl.DataFrame, known_labels: set[str]) -> tuple[dict, pl.DataFrame]:
    """Agreement of predicted with declared language, over documents whose declared language the model knows."""
    declared_known = table.filter(pl.col("declared_lang").is_in(sorted(known_labels)))
    per_lang = (
        declared_known.group_by("declared_lang")
        .agg(docs=pl.len(), agreement=(pl.col("lang") == pl.col("declared_lang")).mean(), passed=pl.col("passed").mean())
        .sort("declared_lang")
    )
    unknown = table.filter(~pl.col("declared_lang").is_in(sorted(known_labels)) & (pl.col("declared_lang") != "und"))
    summary = {
        "docs": table.height,
        "passed_share": float(table["passed"].mean()),
        "agreement_with_declared": float((declared_known["lang"] == declared_known["declared_lang"]).mean())
        if declared_known.height else float("nan"),
        "declared_languages_unknown_to_model": sorted(unknown["declared_lang"].unique().to_list()),
        "docs_with_declared_language_unknown_to_model": unknown.height,
    }
    return summary, per_lang


def install_user_model(path: str, out_path: Path) -> None:
    """Copy a user-supplied fastText model (e.g. GlotLID's model.bin) into the artifact folder."""
    load_model(path)  # fails fast with a clear message if it is not a fastText model
    shutil.copyfile(Path(path).expanduser(), out_path)


# ---------------------------------------------------------------------------------------------------------------
# The two artifacts: language_id_model (model + thresholds + report) and language_id_table (labels per document)

MODEL_FILE = "model.bin"
THRESHOLDS_FILE = "thresholds.parquet"
REPORT_FILE = "report.json"
TABLE_FILE = "language_id.parquet"
AGREEMENT_FILE = "agreement.parquet"


def build_model(docs: pl.LazyFrame, out_dir: Path, cfg: LanguageIdConfig, seed: int, *, user_model: str = "",
                log: Callable[[str], None] = print, warn: Callable[[str], None] = print) -> dict:
    """The language_id_model artifact in ``out_dir``: a fastText model trained on the declared languages of
    ``docs`` (doc_id, declared_lang, text), or ``user_model`` (e.g. GlotLID), with per-language thresholds
    calibrated on held-out chunks. Returns the report (+ ``train_seconds``, not written: it varies per run)."""
    train, held = split_labelled(docs, cfg)  # streams the documents
    out_dir = Path(out_dir)
    if user_model:
        log(f"using the user-supplied language ID model {user_model}")
        install_user_model(user_model, out_dir / MODEL_FILE)
        seconds = 0.0
    else:
        log(f"training fastText on {len(train)} chunks in {len({lang for lang, _ in train})} languages")
        seconds = train_model(train, out_dir / MODEL_FILE, cfg, seed, held=held, log=warn)
    model = load_model(out_dir / MODEL_FILE)
    thresholds, summary = calibrate(model, held, cfg)
    thresholds.write_parquet(out_dir / THRESHOLDS_FILE)
    summary.update(labels=len(model.get_labels()), train_chunks=len(train))
    (out_dir / REPORT_FILE).write_text(json.dumps(summary, indent=1))
    log(f"language ID held-out accuracy {summary['heldout_accuracy']:.3f}")
    return {**summary, "train_seconds": round(seconds, 1), "thresholds": thresholds}


def read_model(folder: Path):
    """``(fastText model, thresholds)`` of a language_id_model artifact."""
    return load_model(Path(folder) / MODEL_FILE), pl.read_parquet(Path(folder) / THRESHOLDS_FILE)


class LabelStep(PipelineStep):
    """datatrove step of a cluster run: label this task's documents (``filtering.ParquetInput`` deals them by row)
    with the fastText model and write ``<labels_dir>/<rank:05d>.parquet`` (doc_id, source, declared_lang, lang,
    lid_score; a rerun task overwrites it). Yields nothing."""

    name = "language_id"
    type = "🏷 - LABELLER"

    def __init__(self, model_file: str, labels_dir: str, batch: int = 5000):
        super().__init__()
        self.model_file, self.labels_dir, self.batch = model_file, labels_dir, batch

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        model = load_model(self.model_file)
        parts, pending = [], []

        def flush() -> None:
            langs, scores = predict(model, [d.text for d in pending])
            parts.append(pl.DataFrame({
                "doc_id": [d.id for d in pending], "source": [d.metadata["source"] for d in pending],
                "declared_lang": [d.metadata["declared_lang"] for d in pending],
                "lang": pl.Series(langs, dtype=pl.String), "lid_score": pl.Series(scores, dtype=pl.Float32)},
                schema_overrides={"declared_lang": pl.String, "source": pl.String}))
            self.stat_update("documents", value=len(pending))
            pending.clear()

        for doc in data or ():
            pending.append(doc)
            if len(pending) >= self.batch:
                flush()
        if pending:
            flush()
        frame = pl.concat(parts) if parts else pl.DataFrame(schema=_LABEL_SCHEMA)
        Path(self.labels_dir).mkdir(parents=True, exist_ok=True)
        frame.write_parquet(Path(self.labels_dir) / f"{rank:05d}.parquet")
        return iter(())


_LABEL_SCHEMA = {"doc_id": pl.String, "source": pl.String, "declared_lang": pl.String, "lang": pl.String,
                 "lid_score": pl.Float32}


def _label_on_cluster(model_dir: Path, docs_files: list[Path], thresholds: pl.DataFrame, work_dir: Path, executor,
                      tasks: int, log: Callable[[str], None]) -> pl.DataFrame:
    """The labels of :func:`label_documents`, computed as ``tasks`` datatrove tasks on ``executor``'s cluster, in
    a work folder named after the model and the inputs (a rerun after a kill runs only the missing tasks)."""
    from mmbert_dagster.data.executors import resumable_run_dir, retire_run_dir, run_pipeline
    from mmbert_dagster.data.filtering import ParquetInput

    run = resumable_run_dir(work_dir, executor.kind, docs_files, tasks=tasks,
                            model=hashlib.sha256((Path(model_dir) / MODEL_FILE).read_bytes()).hexdigest())
    pipeline = [ParquetInput([str(f) for f in docs_files]),
                LabelStep(str(Path(model_dir) / MODEL_FILE), str(run / "labels"))]
    run_pipeline(pipeline, executor, tasks=tasks, logging_dir=run / "logs", name="language-id", log=log)
    th = dict(zip(thresholds["lang"].to_list(), thresholds["threshold"].to_list()))
    default = min(th.values()) if th else 0.5
    labels = pl.read_parquet(sorted((run / "labels").glob("*.parquet")))
    if labels.height == 0:
        raise LanguageIdError("no documents to label")
    table = labels.with_columns(
        threshold=pl.col("lang").replace_strict(th, default=default, return_dtype=pl.Float32)
    ).with_columns(passed=pl.col("lid_score") >= pl.col("threshold"))
    retire_run_dir(run)
    return table.sort("doc_id")


def build_table(model_dir: Path, docs: pl.LazyFrame, out_dir: Path, *, log: Callable[[str], None] = print,
                warn: Callable[[str], None] = print, docs_files: list[Path] | None = None, executor=None,
                work_dir: Path | None = None, tasks: int = 1) -> dict:
    """The language_id_table artifact in ``out_dir``: every document of ``docs`` (doc_id, source, declared_lang,
    text) labelled with the model of ``model_dir``; streamed in batches. Returns the agreement summary
    (+ ``table`` and ``per_lang`` frames for metadata). On a cluster (``executor``: Ray or Slurm settings,
    ``data/executors.py``) the documents of ``docs_files`` are labelled there as ``tasks`` datatrove tasks, with
    ``work_dir`` for their folders; the table is the same."""
    model, thresholds = read_model(model_dir)
    if executor is not None and executor.kind != "local":
        table = _label_on_cluster(Path(model_dir), [Path(f) for f in docs_files], thresholds, Path(work_dir),
                                  executor, tasks, log)
    else:
        table = label_documents(model, thresholds, docs.collect_batches(chunk_size=5000), log=log)
    summary, per_lang = agreement(table, set(model_labels(model)))
    if summary["declared_languages_unknown_to_model"]:
        warn(f"{summary['docs_with_declared_language_unknown_to_model']} documents declare languages the model does "
             f"not know: {summary['declared_languages_unknown_to_model'][:20]} (labelled anyway; excluded from "
             f"agreement)")
    table.write_parquet(Path(out_dir) / TABLE_FILE, compression="zstd")
    per_lang.write_parquet(Path(out_dir) / AGREEMENT_FILE)
    return {**summary, "table": table, "per_lang": per_lang}


def table_file(folder: Path) -> Path:
    """The labels parquet of a language_id_table artifact (doc_id, source, declared_lang, lang, lid_score,
    threshold, passed)."""
    return Path(folder) / TABLE_FILE


def passed_labels(folder: Path) -> pl.LazyFrame:
    """(doc_id, lang) of the documents that passed their language's threshold."""
    return pl.scan_parquet(table_file(folder)).filter("passed").select("doc_id", "lang")


def labelled_documents(filtered_corpus_dir: Path, language_id_dir: Path) -> pl.LazyFrame:
    """(doc_id, lang, text) of the filtered documents that passed language ID, in doc_id order (a join's row
    order is not fixed, and samples drawn from this frame must not depend on it)."""
    from mmbert_dagster.data.sources import read_docs

    docs = read_docs(filtered_corpus_dir, ["doc_id", "text"])
    return docs.join(passed_labels(language_id_dir), on="doc_id").select("doc_id", "lang", "text").sort("doc_id")
