"""MTEB benchmarks of a checkpoint: the checkpoint as a sentence-transformers model, scored by ``mteb`` (2.x).

The model: the checkpoint folder's ``ModernBertModel`` (its MLM head unused) + mean pooling over the attention
mask — every non-padding token, ``[CLS]`` and ``[SEP]`` included (``Encoder.embed`` drops the special tokens;
the two differ by those two vectors). Loaded from local files only, without remote code, in fp32 on CPU (bf16 on
CUDA) and always with transformers' SDPA attention: our packed attention (``train/attention.ATTN_NAME``) is a
training-time choice that a saved ``config.json`` may name, and it needs ``cu_seqlens`` that sentence-transformers'
padded batches never carry.

Tasks, each named as in ``mteb.get_task`` (e.g. ``"SciFact"``, ``"MIRACLRetrieval"``), or given as a task object
(:func:`local_retrieval_task`). Where a task's data comes from, first match wins:

==========================================  ====================================================================
``<data_dir>/<task>/`` in the BEIR layout   ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv`` (one set
                                            per subset folder for a multilingual task): read directly — a task
                                            mteb does not know becomes a :func:`local_retrieval_task`
``<data_dir>/<task>/``, anything else       a copy of the task's Hugging Face dataset repository
                                            (``hf download <path> --repo-type dataset --revision <rev>
                                            --local-dir <data_dir>/<task>``): replaces ``metadata.dataset["path"]``,
                                            so ``datasets.load_dataset`` reads the folder (README ``configs:``)
the Hugging Face datasets cache             what an earlier online run left in ``<cache_dir>/hf/datasets`` (or
                                            the user's ``HF_DATASETS_CACHE`` without ``cache_dir``): offline,
                                            ``datasets`` falls back to the latest cached copy of the repository
the Hub                                     online only
==========================================  ====================================================================

A task whose data cannot be loaded (offline and not cached, unknown name, broken files) is skipped with a note
that says why — never an error: the nightly evaluation must not fail because the network is down.

Rows (the suite's long schema): task = the MTEB task name (``name/split`` where a task scores several splits),
lang = mteb's subset (``hf_subset``; for a one-subset task, its languages, e.g. ``"eng-Latn"``), tier = the
subset's language tier (English, else ``tiers`` of the non-English language, ``"unseen"`` when not in it,
``"mixed"`` across tiers), metric = the task's main score (``ndcg_at_10`` for retrieval), value. No summary rows
(``suite._summaries`` makes them for the whole table).

Everything mteb and ``datasets`` write goes under ``cache_dir``: ``results/`` (mteb's result cache, per model
name and weights digest), ``hf/`` (the Hub and datasets caches while a run lasts); without ``cache_dir`` the
results go to a temporary folder and the Hugging Face caches stay the user's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import polars as pl

POOLING = "mean"
MODEL_ORG = "mmbert-dagster"  # mteb wants model names as "org/name"
RESULTS_DIR = "results"  # under cache_dir: mteb's ResultCache
HF_DIR = "hf"  # under cache_dir: the Hugging Face Hub and datasets caches during a run
TASKS_DIR = "tasks"  # under cache_dir: local task data (the default data_dir)
CORPUS_FILE, QUERIES_FILE, QRELS_DIR = "corpus.jsonl", "queries.jsonl", "qrels"
LANG_CODE = re.compile(r"^[a-z]{3}[_-][A-Z][a-z]{3}$")  # eng_Latn (ours) / eng-Latn (mteb)


# --------------------------------------------------------------------------------------------------- the model

def sentence_model(folder: Path | str, *, max_seq_length: int | None = None, device: str = "cpu", dtype=None):
    """A ``SentenceTransformer`` of a checkpoint folder: ``Transformer(folder)`` + mean ``Pooling``, SDPA attention,
    local files only, no remote code. ``max_seq_length`` defaults to the checkpoint's ``max_position_embeddings``
    (capped by the tokenizer's ``model_max_length``); ``dtype`` to fp32 on CPU, bf16 elsewhere."""
    import torch
    from sentence_transformers import SentenceTransformer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json — not a Hugging Face checkpoint folder")
    if dtype is None:
        dtype = torch.float32 if str(device) == "cpu" else torch.bfloat16
    local = {"local_files_only": True, "trust_remote_code": False}
    model_kwargs = {**local, "attn_implementation": "sdpa", "dtype": dtype}
    with _quiet_transformers():  # the load report lists the unused MLM head (head.*, decoder.bias) as UNEXPECTED
        try:
            from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
        except ImportError:  # sentence-transformers 5: the older module path and argument names
            from sentence_transformers.models import Pooling, Transformer

            transformer = Transformer(str(folder), max_seq_length=max_seq_length, model_args=model_kwargs,
                                      tokenizer_args=dict(local), config_args=dict(local))
            dim = transformer.get_word_embedding_dimension()
        else:
            transformer = Transformer(str(folder), max_seq_length=max_seq_length, model_kwargs=model_kwargs,
                                      config_kwargs=dict(local), processor_kwargs=dict(local),
                                      unpad_inputs=False)  # padded batches: SDPA with the attention mask
            dim = transformer.get_embedding_dimension()
    pooling = Pooling(dim, POOLING)
    model = SentenceTransformer(modules=[transformer, pooling], device=device)
    model.eval()
    return model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def weights_digest(folder: Path | str) -> str:
    """The first 16 hex digits of the sha256 of the weights (and config): the model's revision in mteb's cache."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        path = Path(folder) / name
        if path.is_file():
            with path.open("rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------- local retrieval tasks

def _beir_sets(folder: Path) -> dict[str, Path]:
    """subset -> folder of BEIR files: ``{"default": folder}`` or one per subfolder holding a corpus."""
    if (folder / CORPUS_FILE).is_file():
        return {"default": folder}
    return {d.name: d for d in sorted(folder.iterdir()) if d.is_dir() and (d / CORPUS_FILE).is_file()} \
        if folder.is_dir() else {}


def is_beir_folder(folder: Path | str) -> bool:
    """Whether ``folder`` holds BEIR files (``corpus.jsonl``, ``queries.jsonl``, ``qrels/*.tsv``), directly or per
    subset folder."""
    sets = _beir_sets(Path(folder))
    return bool(sets) and all((d / QUERIES_FILE).is_file() and any((d / QRELS_DIR).glob("*.tsv"))
                              for d in sets.values())


def _read_jsonl(path: Path, fields: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {f: [] for f in ("id", *fields)}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            rid = row.get("_id", row.get("id"))
            if rid is None or "text" not in row:
                raise ValueError(f"{path}:{n}: a row needs '_id' (or 'id') and 'text'; has {sorted(row)}")
            out["id"].append(str(rid))
            for f_ in fields:
                out[f_].append(str(row.get(f_) or ""))
    return out


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels: tab-separated ``query-id corpus-id score``, with or without that header line."""
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if not line.strip() or (n == 1 and parts[0] == "query-id"):
                continue
            if len(parts) != 3:
                raise ValueError(f"{path}:{n}: want 'query-id<TAB>corpus-id<TAB>score', got {line!r}")
            qrels.setdefault(parts[0], {})[parts[1]] = int(float(parts[2]))
    return qrels


def load_beir_split(folder: Path | str, split: str) -> dict:
    """mteb's ``RetrievalSplitData`` (corpus, queries, relevant_docs, top_ranked=None) from BEIR files."""
    from datasets import Dataset

    folder = Path(folder)
    qrels_file = folder / QRELS_DIR / f"{split}.tsv"
    for path in (folder / CORPUS_FILE, folder / QUERIES_FILE, qrels_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (BEIR layout: {CORPUS_FILE}, {QUERIES_FILE}, "
                                    f"{QRELS_DIR}/<split>.tsv)")
    corpus = _read_jsonl(folder / CORPUS_FILE, ("title", "text"))
    queries = _read_jsonl(folder / QUERIES_FILE, ("text",))
    qrels = _read_qrels(qrels_file)
    missing_q = sorted(set(qrels) - set(queries["id"]))
    missing_d = sorted({d for docs in qrels.values() for d in docs} - set(corpus["id"]))
    if missing_q or missing_d:
        raise ValueError(f"{qrels_file}: ids not in {QUERIES_FILE} {missing_q[:5]} / not in {CORPUS_FILE} "
                         f"{missing_d[:5]}")
    keep = [i for i, q in enumerate(queries["id"]) if q in qrels]
    queries = {k: [v[i] for i in keep] for k, v in queries.items()}
    return {"corpus": Dataset.from_dict(corpus), "queries": Dataset.from_dict(queries), "relevant_docs": qrels,
            "top_ranked": None}


def _files_digest(folder: Path) -> str:
    """A digest of the files' names, sizes and modification times (cheap for a large corpus)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _mteb_lang(code: str) -> str:
    return code.replace("_", "-")


def _load_beir_task(task, sets: Mapping[str, Path], num_proc=None, **_) -> None:
    """``load_data`` for a retrieval task whose files are BEIR folders (one per subset)."""
    if task.data_loaded:
        return
    task.dataset = {subset: {split: load_beir_split(sets[subset], split) for split in task.eval_splits}
                    for subset in task.hf_subsets}
    task.dataset_transform(num_proc=num_proc)
    task.data_loaded = True


def local_retrieval_task(name: str, folder: Path | str, *, languages: Sequence[str] | Mapping[str, Sequence[str]]
                         | None = None, splits: Sequence[str] | None = None, main_score: str = "ndcg_at_10",
                         description: str = ""):
    """An mteb retrieval task (an ``AbsTaskRetrieval``) from BEIR files in ``folder``.

    One set of files (``corpus.jsonl`` with ``_id``/``title``/``text``, ``queries.jsonl`` with ``_id``/``text``,
    ``qrels/<split>.tsv``) -> one subset ``"default"``; one set per subfolder -> one subset per subfolder
    (multilingual). ``languages``: the task's languages (``eng_Latn`` or ``eng-Latn``) — a list for one subset, a
    mapping subset -> list for several; by default the subset names when they are such codes, else ``eng-Latn``.
    ``splits``: by default those of ``qrels/*.tsv``. The dataset revision is a digest of the files (names, sizes,
    times), so results cached for other data are never reused."""
    _import_mteb()
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    folder = Path(folder)
    sets = _beir_sets(folder)
    if not sets or not is_beir_folder(folder):
        raise FileNotFoundError(f"{folder}: not a BEIR folder ({CORPUS_FILE}, {QUERIES_FILE}, {QRELS_DIR}/<split>.tsv"
                                f", directly or in one folder per subset)")
    if splits is None:
        per_set = [{p.stem for p in (d / QRELS_DIR).glob("*.tsv")} for d in sets.values()]
        splits = sorted(set.intersection(*per_set))
        if not splits:
            raise ValueError(f"{folder}: no qrels split common to every subset")
    if isinstance(languages, Mapping):
        eval_langs = {s: [_mteb_lang(c) for c in languages[s]] for s in sets}
    elif languages is not None:
        eval_langs = {s: [_mteb_lang(c) for c in languages] for s in sets}
    else:
        eval_langs = {s: [_mteb_lang(s) if LANG_CODE.match(s) else "eng-Latn"] for s in sets}
    metadata = TaskMetadata(
        name=name,
        description=description or f"Local BEIR-layout retrieval task read from {folder}.",
        dataset={"path": str(folder), "revision": _files_digest(folder)},
        reference=None,
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=list(splits),
        eval_langs=eval_langs if list(sets) != ["default"] else eval_langs["default"],
        main_score=main_score,
        date=None,
        domains=[],
        task_subtypes=[],
        license="not specified",
        annotations_creators="derived",
        dialect=[],
        sample_creation="found",
        bibtex_citation="",
    )

    def load_data(self, num_proc=None, **kwargs):
        _load_beir_task(self, sets, num_proc=num_proc)

    cls = type(re.sub(r"\W", "_", name), (AbsTaskRetrieval,), {"metadata": metadata, "load_data": load_data})
    return cls()


# ------------------------------------------------------------------------------------------------ running mteb

class TaskUnavailable(LookupError):
    """A task that cannot be run here (unknown name, local files that do not fit it); its note says why."""


@contextlib.contextmanager
def _hf_caches(root: Path | None) -> Iterator[None]:
    """While it lasts, the Hub's and ``datasets``' caches live under ``root`` (nothing changes if it is None)."""
    if root is None:
        yield
        return
    import datasets.config as dcfg
    import huggingface_hub.constants as hcfg

    saved = {(dcfg, k): getattr(dcfg, k) for k in ("HF_DATASETS_CACHE", "DOWNLOADED_DATASETS_PATH",
                                                     "EXTRACTED_DATASETS_PATH")}
    saved[(hcfg, "HF_HUB_CACHE")] = hcfg.HF_HUB_CACHE
    datasets_cache = root / "datasets"
    dcfg.HF_DATASETS_CACHE = datasets_cache
    dcfg.DOWNLOADED_DATASETS_PATH = datasets_cache / dcfg.DOWNLOADED_DATASETS_DIR
    dcfg.EXTRACTED_DATASETS_PATH = dcfg.DOWNLOADED_DATASETS_PATH / dcfg.EXTRACTED_DATASETS_DIR
    hcfg.HF_HUB_CACHE = str(root / "hub")
    try:
        yield
    finally:
        for (mod, key), value in saved.items():
            setattr(mod, key, value)


@contextlib.contextmanager
def _no_datasets_progress_bars() -> Iterator[None]:
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _import_mteb():
    """``import mteb``. Its import makes a default result cache folder (``$MTEB_CACHE`` or ``~/.cache/mteb``) that
    nothing here uses: unless the user set ``MTEB_CACHE``, the first import here makes it in a temporary folder,
    removed again."""
    if "mteb" in sys.modules or os.environ.get("MTEB_CACHE"):
        import mteb

        return mteb
    scratch = tempfile.mkdtemp(prefix="mteb-default-cache-")
    os.environ["MTEB_CACHE"] = scratch
    try:
        import mteb
    finally:
        os.environ.pop("MTEB_CACHE", None)
        shutil.rmtree(scratch, ignore_errors=True)
    return mteb


def _tier(langs: Sequence[str], tiers: Mapping[str, str], english: str) -> str:
    codes = {lang.replace("-", "_") for lang in langs}
    others = codes - {english}
    if not others:
        return "english" if codes else "unseen"
    found = {tiers.get(c, "unseen") for c in others}
    return found.pop() if len(found) == 1 else "mixed"


def _only(task, languages: Sequence[str] | None):
    """``task`` keeping only the subsets in ``languages`` (our codes or mteb's), or TaskUnavailable."""
    if not languages:
        return task
    try:
        task = task.filter_languages([_mteb_lang(c) for c in languages])
    except ValueError:  # mteb: "No subsets were found for <task> with filters: ..."
        task.hf_subsets = []
    if not task.hf_subsets:
        raise TaskUnavailable(f"no subset in the requested languages {list(languages)} (the task has "
                              f"{sorted(task.metadata.languages)})")
    return task


def _resolve(entry, data_dir: Path | None, languages: Sequence[str] | None, mteb):
    """(task object, where its data comes from) for a task name or object; raises with the reason."""
    if not isinstance(entry, str):
        return _only(entry, languages), "given task object"
    local = data_dir / entry if data_dir is not None else None
    try:
        task = _only(mteb.get_task(entry), languages)
    except KeyError as e:
        if local is not None and is_beir_folder(local):
            task = local_retrieval_task(entry, local)
            return _only(task, languages), f"local BEIR files in {local}"
        why = str(e.args[0] if e.args else e).removeprefix("KeyError: ")
        where = f"; {local} holds no BEIR files either" if local is not None else ""
        raise TaskUnavailable(f"not an mteb task ({why}){where}") from None
    if local is None or not local.is_dir():
        return task, f"Hugging Face dataset {task.metadata.dataset['path']}@{task.metadata.dataset['revision'][:12]}"
    from mteb.abstasks.retrieval import AbsTaskRetrieval

    if is_beir_folder(local):
        if not isinstance(task, AbsTaskRetrieval):
            raise TaskUnavailable(f"{local} holds BEIR retrieval files but {entry} is a {task.metadata.type} task")
        sets = _beir_sets(local)
        missing = [s for s in task.hf_subsets if s not in sets]
        if missing:
            raise TaskUnavailable(f"{local}: no BEIR files for subset(s) {missing} (want one folder per subset)")
        task.load_data = lambda num_proc=None, **kw: _load_beir_task(task, sets, num_proc=num_proc)
        return task, f"local BEIR files in {local}"
    task.metadata = task.metadata.model_copy(update={"dataset": {**task.metadata.dataset, "path": str(local)}})
    return task, f"local copy of its Hugging Face dataset in {local}"


def run_mteb(tasks: Sequence, folder: Path | str, *, cache_dir: Path | str | None = None,
             languages: Sequence[str] | None = None, log: Callable[[str], None] = print, name: str | None = None,
             data_dir: Path | str | None = None, tiers: Mapping[str, str] | None = None, english: str = "eng_Latn",
             device: str = "cpu", batch_size: int = 32, max_seq_length: int | None = None, reuse: bool = False,
             model=None) -> tuple[pl.DataFrame, list[str]]:
    """Score one checkpoint on MTEB tasks; returns (rows in the suite's long schema, notes on skipped tasks).

    ``tasks``: mteb task names or task objects. ``languages``: keep only these languages' subsets (``eng_Latn``
    style). ``name``: the rows' model (default: the folder's name). ``data_dir``: local task data, one folder per
    task (default ``<cache_dir>/tasks``). ``reuse``: take results already in ``<cache_dir>/results`` for the same
    weights and task data instead of running again. ``model``: an already built :func:`sentence_model`."""
    from mmbert_dagster.evaluate.suite import SCHEMA

    folder = Path(folder)
    name = name or folder.name
    tiers = tiers or {}
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            root = None
            results_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mteb-results-")))
        else:
            root = Path(cache_dir)
            results_dir = root / RESULTS_DIR
        data_dir = Path(data_dir) if data_dir is not None else (root / TASKS_DIR if root is not None else None)
        mteb = _import_mteb()
        stack.enter_context(_hf_caches(root / HF_DIR if root is not None else None))
        stack.enter_context(_no_datasets_progress_bars())
        stack.enter_context(warnings.catch_warnings())
        for category in (DeprecationWarning, FutureWarning):  # mteb 2.26 / sentence-transformers 6 internals
            warnings.filterwarnings("ignore", category=category, module=r"(mteb|sentence_transformers)(\.|$)")

        rows: list[dict] = []
        notes: list[str] = []
        cache = mteb.ResultCache(results_dir)
        wrapped = None
        for entry in tasks:
            label = entry if isinstance(entry, str) else entry.metadata.name
            try:
                task, source = _resolve(entry, data_dir, languages, mteb)
            except Exception as e:
                notes.append(f"{label}: skipped — {e}" if isinstance(e, TaskUnavailable)
                             else f"{label}: skipped — {type(e).__name__}: {e}")
                log(notes[-1])
                continue
            load_error = None
            try:
                task.load_data()
            except Exception as e:  # offline and not cached, missing / broken local files
                hint = (f"; put its data in {data_dir / label}" if data_dir is not None and isinstance(entry, str)
                        else "")
                load_error = f"could not load its data ({source}): {type(e).__name__}: {e}{hint}"
                if not reuse:  # (with reuse, mteb may still find the task's results in the result cache)
                    notes.append(f"{label}: skipped — {load_error}")
                    log(notes[-1])
                    continue
            if wrapped is None:
                from mteb.models import SentenceTransformerEncoderWrapper

                model = model if model is not None else sentence_model(folder, max_seq_length=max_seq_length,
                                                                       device=device)
                wrapped = SentenceTransformerEncoderWrapper(model)
                wrapped.mteb_model_meta = wrapped.mteb_model_meta.model_copy(
                    update={"name": f"{MODEL_ORG}/{name}", "revision": weights_digest(folder)})
            log(f"{label}: {len(task.hf_subsets)} subset(s) x {len(task.eval_splits)} split(s) from {source}")
            try:
                result = mteb.evaluate(wrapped, task, cache=cache, overwrite_strategy="only-missing" if reuse
                                       else "always", raise_error=False, show_progress_bar=False, co2_tracker=False,
                                       encode_kwargs={"batch_size": batch_size, "show_progress_bar": False})
            finally:
                task.unload_data()
            if result.exceptions or not result.task_results:
                why = load_error or "mteb failed: " + ("; ".join(str(x.exception) for x in result.exceptions)
                                                      or "no result")
                notes.append(f"{label}: skipped — {why}")
                log(notes[-1])
                continue
            res = result.task_results[0]
            splits = [s for s in task.eval_splits if s in res.scores]
            done: list[dict] = []
            for split in splits:
                for score in res.scores[split]:
                    subset = score["hf_subset"]
                    if subset not in task.hf_subsets:
                        continue
                    langs = list(score.get("languages") or [])
                    done.append({"model": name, "task": label if len(splits) == 1 else f"{label}/{split}",
                                 "lang": subset if subset != "default" or not langs else ",".join(langs),
                                 "tier": _tier(langs, tiers, english), "metric": task.metadata.main_score,
                                 "value": float(score["main_score"])})
            rows += done
            if done:
                mean = sum(r["value"] for r in done) / len(done)
                log(f"{label}: {task.metadata.main_score} {mean:.4f} (mean of {len(done)} subset/split rows)")
    return pl.DataFrame(rows, schema=SCHEMA), notes
