"""Full fine-tuning of a checkpoint on a classification task, several seeds, scored per language (mmBERT's protocol).

The linear probes of ``suite.py`` / ``hf_tasks.py`` score frozen embeddings; here every weight is trained, as the
paper does for GLUE / XNLI / WikiANN: a fresh copy of the checkpoint gets a classification head
(``AutoModelFor{Sequence,Token}Classification``, SDPA attention, never ``trust_remote_code``), is fine-tuned with
``transformers.Trainer`` (AdamW, linear decay after ``warmup_ratio`` warm-up; mmBERT's checklist: lr 1-2e-5, 3-5
epochs) on the training language(s), and is scored on every test language — accuracy for sentence tasks,
entity-level F1 (``seqeval``) for token tasks. Each seed fine-tunes the same checkpoint again; the score table
reports the mean and the sample standard deviation (ddof 1) over the seeds.

Data (:class:`FinetuneTask` says which; every loader returns a :class:`TaskData`: train examples, test examples
per language, label names):

* ``kind = "sequence"``, GLUE / XNLI layout: ``datasets.load_dataset(dataset[, config])`` — a hub name, a local
  folder of per-split files ``<split>.{jsonl,json,csv,parquet}`` (e.g. ``train.jsonl``, ``test.jsonl``), a folder
  ``load_dataset`` understands, or a ``save_to_disk`` folder. One text field, or two joined as a pair
  (``[CLS] premise [SEP] hypothesis [SEP]``); labels ints, ``ClassLabel`` or strings (rows labelled -1 / null,
  GLUE's unlabelled test rows, are dropped).
* ``kind = "token"``, WikiANN layout: the same sources with a word-list field (``tokens``) and a tag-list field
  (``ner_tags``, a sequence of ``ClassLabel`` — or tag strings); or CoNLL layout: a folder with one plain text file
  per language and split, ``<dataset>/<lang>/<split>.txt`` (also ``.conll`` / ``.iob`` / ``.iob2`` / ``.bio`` /
  ``.tsv``), one token per line with its tag in the LAST whitespace-separated column, a blank line between
  sentences, ``-DOCSTART-`` lines skipped (``<dataset>/<split>.txt`` directly: one language).
* Languages: a ``language_field`` (rows grouped by its value; a list value, as WikiANN's ``langs``, counts by its
  first entry), or ``{lang}`` in ``dataset`` or ``config`` (one dataset / config per language, as XNLI's and
  WikiANN's hub configs ``en``, ``de``, ...), or the per-language folders of the CoNLL layout, or one language
  (``train_languages = [its code]``). ``language_codes`` maps a dataset's codes to the score table's
  (``{en = "eng_Latn"}``) so that tiers apply.
* ``dataset = ""``: the OFFLINE STAND-IN, task ``udhr_article_standin`` — which UDHR article (25-30, 6 classes,
  chance 1/6) a sentence-sized piece of a held-out text comes from. Fine-tuned on the English pieces (the
  ``train_languages``), tested zero-shot on every other language's pieces (the languages the caller names, e.g.
  the benchmark's tiers): XNLI's "train on English, test on all" on data every install has. The held-out texts
  are aligned across languages, so the languages are scored on the same content.

:func:`run_task` fine-tunes one checkpoint with one seed; :func:`finetune_items` runs every task x model x seed
(one row per seed and language), :func:`finetune_table` turns those into the long score table of ``suite.py``
(``<metric>_mean`` / ``<metric>_sd`` per language, plus tier means at lang ``"*"``), :func:`finetune_scores` does
both.

Module-level imports are light (``recipe.py`` imports :class:`FinetuneTask`); torch, transformers, datasets,
seqeval and polars are imported where they are used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from pathlib import Path

    import polars as pl

KINDS = ("sequence", "token")
METRIC = {"sequence": "accuracy", "token": "f1"}
STANDIN_NAME = "udhr_article_standin"
STANDIN_PIECE_WORDS = 16  # a held-out sentence longer than this many words is cut into near-equal pieces
STANDIN_PIECE_CHARS = 60  # ... and a text without spaces (Chinese, Japanese, Thai) into pieces of this many chars
STANDIN_MIN_CHARS = 8  # shorter pieces (stray numbers, headings) are dropped
CONLL_SUFFIXES = (".txt", ".conll", ".iob", ".iob2", ".bio", ".tsv")
IGNORE = -100  # labels the loss skips (transformers' convention)
ITEM_SCHEMA_SPEC = (("model", "str"), ("task", "str"), ("lang", "str"), ("tier", "str"), ("seed", "int"),
                    ("metric", "str"), ("value", "float"), ("n", "int"))


class FinetuneTaskError(ValueError):
    """A bad fine-tuning task (table, data files or fields); the message names where and the key."""

    def __init__(self, message: str, key: str = "", problem: str = ""):
        super().__init__(message)
        self.key, self.problem = key, problem


class TaskUnavailable(RuntimeError):
    """A hub dataset that could not be loaded (offline, unknown name): the task is skipped with a note."""


@dataclass(frozen=True)
class FinetuneTask:
    """One fine-tuning task. ``dataset = ""`` is the offline stand-in (build it with :func:`standin_task`)."""

    name: str  # the row's task name in the score table, e.g. "xnli"
    kind: str = "sequence"  # "sequence" (sentence / pair classification, accuracy) | "token" (tagging, entity F1)
    dataset: str = ""  # hub name, local folder or file; may hold "{lang}"; "" = the offline stand-in
    config: str = ""  # load_dataset's second argument (e.g. "sst2", or "{lang}" for XNLI); empty = none
    text_fields: tuple[str, ...] = ("sentence",)  # one, or two joined as a pair; token tasks: the word list
    label_field: str = "label"  # token tasks: the tag list
    train_split: str = "train"
    test_split: str = "test"
    train_languages: tuple[str, ...] = ()  # fine-tuned on these (dataset codes); empty = every row of train_split
    test_languages: tuple[str, ...] = ()  # scored on these; empty = every language present (the caller may narrow)
    language_field: str = ""  # the column naming a row's language ("language", "lang", ...); "" = none
    language_codes: tuple[tuple[str, str], ...] = ()  # dataset code -> score-table code (TOML: a table)
    lr: float = 2e-5  # mmBERT's checklist: lr 1-2e-5, 3-5 epochs
    epochs: float = 3.0
    batch_size: int = 32
    max_length: int = 128  # tokens per example (capped at the model's context)
    warmup_ratio: float = 0.1  # share of the steps of linear warm-up, then linear decay to 0
    weight_decay: float = 0.01
    seeds: tuple[int, ...] = (1, 2, 3)
    max_train: int = 20_000  # training examples (a fixed random subset, the same for every model and seed)
    max_test: int = 2_000  # test examples per language (likewise)
    add_prefix_space: bool = True  # token tasks: each word is tokenized as " word" (as in running text) rather
    # than bare "word" (what a pre-tokenized word list gives a byte-level / SentencePiece tokenizer such as
    # mmBERT's Gemma-2 one without a prefix space): the two give different pieces, and NER / POS scores of such
    # tokenizers depend on it

    def __post_init__(self):
        for name in ("text_fields", "train_languages", "test_languages", "seeds"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.language_codes, dict):
            object.__setattr__(self, "language_codes", tuple(sorted(self.language_codes.items())))
        elif isinstance(self.language_codes, list):
            object.__setattr__(self, "language_codes", tuple(tuple(p) for p in self.language_codes))
        problems = _problems(self)
        if problems:
            key, msg = problems[0]
            raise FinetuneTaskError(f"finetune task {self.name!r}.{key}: {msg}", key, msg)

    @property
    def is_standin(self) -> bool:
        return self.dataset == ""

    @property
    def metric(self) -> str:
        return METRIC[self.kind]

    def table_lang(self, code: str) -> str:
        """The score table's code of a dataset language code."""
        return dict(self.language_codes).get(code, code)

    @classmethod
    def from_table(cls, table: dict, where: str) -> FinetuneTask:
        """Validate and build a task from a TOML table (errors name ``where`` and the bad key).

        Keys left out take the dataclass defaults — for the stand-in (``dataset`` absent or ``""``) those of
        :data:`STANDIN`; for ``kind = "token"`` the text / label fields default to ``tokens`` / ``ner_tags``."""
        return task_from_table(table, where)


_STR = ("name", "kind", "dataset", "config", "label_field", "train_split", "test_split", "language_field")
_STRS = ("text_fields", "train_languages", "test_languages")
_POS_INT = ("batch_size", "max_length", "max_train", "max_test")
_FLOAT = ("lr", "epochs", "warmup_ratio", "weight_decay")


def _problems(t: FinetuneTask) -> list[tuple[str, str]]:
    """(key, what is wrong) of a task, in field order; empty when it is valid."""
    out: list[tuple[str, str]] = []
    for k in _STR:
        if not isinstance(getattr(t, k), str):
            out.append((k, f"must be a string, got {getattr(t, k)!r}"))
    for k in _STRS:
        v = getattr(t, k)
        if not isinstance(v, tuple) or not all(isinstance(x, str) and x for x in v):
            out.append((k, f"must be a list of non-empty strings, got {v!r}"))
    for k in _POS_INT:
        v = getattr(t, k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            out.append((k, f"must be a positive integer, got {v!r}"))
    for k in _FLOAT:
        v = getattr(t, k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            out.append((k, f"must be a number, got {v!r}"))
    if out:
        return out
    if not t.name.strip():
        out.append(("name", "must not be empty"))
    if t.kind not in KINDS:
        out.append(("kind", f"must be one of {list(KINDS)}, got {t.kind!r}"))
    if not (isinstance(t.seeds, tuple) and t.seeds and all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in t.seeds)):
        out.append(("seeds", f"must be a list of at least one integer, got {t.seeds!r}"))
    elif len(set(t.seeds)) != len(t.seeds):
        out.append(("seeds", f"must not repeat a seed, got {list(t.seeds)}"))
    if not isinstance(t.add_prefix_space, bool):
        out.append(("add_prefix_space", f"must be true or false, got {t.add_prefix_space!r}"))
    if not (isinstance(t.language_codes, tuple) and all(
            isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, str) and x for x in p)
            for p in t.language_codes)):
        out.append(("language_codes", f"must be a table of dataset code = score-table code, got "
                                      f"{t.language_codes!r}"))
    if not t.lr > 0:
        out.append(("lr", f"must be > 0, got {t.lr}"))
    if not t.epochs > 0:
        out.append(("epochs", f"must be > 0, got {t.epochs}"))
    if not 0 <= t.warmup_ratio < 1:
        out.append(("warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}"))
    if not t.weight_decay >= 0:
        out.append(("weight_decay", f"must be >= 0, got {t.weight_decay}"))
    if t.max_length < 8:
        out.append(("max_length", f"must be at least 8 tokens, got {t.max_length}"))
    if t.kind == "sequence" and not 1 <= len(t.text_fields) <= 2:
        out.append(("text_fields", f"a sequence task takes one text field or a pair, got {list(t.text_fields)}"))
    if t.kind == "token" and len(t.text_fields) != 1:
        out.append(("text_fields", f"a token task takes one field (the word list), got {list(t.text_fields)}"))
    if t.is_standin:
        if t.kind != "sequence":
            out.append(("kind", "the offline stand-in (dataset = \"\") is a sequence task"))
        for k in ("config", "language_field"):
            if getattr(t, k):
                out.append((k, f"has no meaning for the offline stand-in (dataset = \"\"), got {getattr(t, k)!r}"))
        if not t.train_languages:
            out.append(("train_languages", "the offline stand-in needs its training language(s), e.g. "
                                           "[\"eng_Latn\"]"))
    templated = "{lang}" in t.dataset or "{lang}" in t.config
    if templated and t.language_field:
        out.append(("language_field", "either a language field or \"{lang}\" in dataset / config, not both"))
    if templated and not t.train_languages:
        out.append(("train_languages", "\"{lang}\" in dataset / config needs the training language(s)"))
    return out


def task_from_table(table: dict, where: str) -> FinetuneTask:
    """:meth:`FinetuneTask.from_table`."""
    if not isinstance(table, dict):
        raise FinetuneTaskError(f"{where}: must be a table, got {type(table).__name__}")
    names = [f.name for f in dataclasses.fields(FinetuneTask)]
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise FinetuneTaskError(f"{where}: unknown key(s) {unknown}; allowed: {names}")
    table = dict(table)
    for k, v in table.items():  # TOML lists -> tuples; shapes checked here so the message names the key
        if k in (*_STRS, "seeds"):
            if not isinstance(v, (list, tuple)):
                raise FinetuneTaskError(f"{where}.{k}: must be a list, got {v!r}")
            table[k] = tuple(v)
        elif k == "language_codes":
            if not isinstance(v, dict):
                raise FinetuneTaskError(f"{where}.{k}: must be a table of dataset code = score-table code, got "
                                        f"{v!r}")
            table[k] = tuple(sorted(v.items()))
    if table.get("dataset", "") == "":
        base = {f.name: getattr(STANDIN, f.name) for f in dataclasses.fields(FinetuneTask)}
    else:
        if "name" not in table:
            raise FinetuneTaskError(f"{where}.name: missing (the task's name in the score table)")
        base = {}
        if table.get("kind") == "token":
            base = {"text_fields": ("tokens",), "label_field": "ner_tags"}
    try:
        task = FinetuneTask(**{**base, **table})
    except FinetuneTaskError as e:
        raise FinetuneTaskError(f"{where}.{e.key}: {e.problem}", e.key, e.problem) from None
    return task


def standin_task(**overrides) -> FinetuneTask:
    """The offline stand-in, with any field overridden (e.g. ``seeds=(1,)``, ``train_languages=(...)``)."""
    return dataclasses.replace(STANDIN, **overrides)


# The stand-in's defaults, sized for tiny checkpoints (~1M parameters) on a couple of CPU cores. ~34 English pieces
# of <= 16 words (<= 43 tokens with the tiny preset's 4k BPE); max_length stays 128 because the same content takes
# up to ~2.5x the tokens in Devanagari or CJK (64 would cut half the Hindi pieces) and costs no more time (test
# pieces are batched by length); at most 64 pieces per test language (there are 12-63, median 32). Batch 8 and 6
# epochs: ~26 optimizer steps, with lr 1e-3 — at the paper's 2e-5 (or 1e-4) so few steps leave a tiny model at
# chance even on its English training pieces; at 1e-3 it fits them (loss ~0.8) and transfers above chance (~0.28
# on 16 languages for the tiny preset's 4 x 128 checkpoints, sd over seeds ~0.02-0.05, against 0.27 at 3e-4 x 10
# epochs), ~1.9 s per (model, seed). A base-size checkpoint wants the paper's lr (2e-5 to 5e-5): set it in the
# task's table.
STANDIN = FinetuneTask(
    name=STANDIN_NAME, kind="sequence", dataset="", text_fields=("text",), label_field="article",
    train_split="train", test_split="test", train_languages=("eng_Latn",),
    lr=1e-3, epochs=6.0, batch_size=8, max_length=128, warmup_ratio=0.1, weight_decay=0.01, seeds=(1, 2, 3),
    max_train=2_000, max_test=64)


# ------------------------------------------------------------------------------------------------------- data

class Example(NamedTuple):
    """``inputs``: the text(s) of a sequence example, or the words of a token example; ``label``: a class id, or
    a tuple of tag ids (one per word)."""

    inputs: tuple[str, ...]
    label: Any


@dataclass
class TaskData:
    """What every loader returns. ``test`` is keyed by the DATASET's language codes (``FinetuneTask.table_lang``
    maps them)."""

    labels: tuple[str, ...]  # class / tag names; the index is the id
    train: list[Example]
    test: dict[str, list[Example]]
    source: str = ""
    notes: list[str] = field(default_factory=list)


def _subset(items: list, limit: int, *key) -> list:
    """At most ``limit`` items: a fixed random subset (seeded by ``key``, not by the run), in the original order."""
    if len(items) <= limit:
        return items
    import numpy as np

    from mmbert_dagster.seeding import stable_seed

    keep = np.random.default_rng(stable_seed("finetune-subset", *key)).choice(len(items), limit, replace=False)
    return [items[i] for i in sorted(keep.tolist())]


def _finish(task: FinetuneTask, labels: Sequence[str], train: list[Example], test: dict[str, list[Example]],
            source: str, notes: list[str] | None = None) -> TaskData:
    if not train:
        raise FinetuneTaskError(f"{task.name}: no training examples in {source} (split {task.train_split!r}, "
                                f"languages {list(task.train_languages) or 'all'})")
    test = {lang: _subset(rows, task.max_test, task.name, "test", lang) for lang, rows in sorted(test.items())
            if rows}
    if not test:
        raise FinetuneTaskError(f"{task.name}: no test examples in {source} (split {task.test_split!r})")
    if len(labels) < 2:
        raise FinetuneTaskError(f"{task.name}: {source} has {len(labels)} label(s) {list(labels)}; need >= 2")
    return TaskData(tuple(labels), _subset(train, task.max_train, task.name, "train"), test, source, notes or [])


# --- the offline stand-in

def sentence_pieces(text: str, max_words: int = STANDIN_PIECE_WORDS, max_chars: int = STANDIN_PIECE_CHARS,
                    min_chars: int = STANDIN_MIN_CHARS) -> list[str]:
    """A held-out text (title line dropped) cut into sentence-sized pieces: split after sentence punctuation
    (Latin, CJK, Devanagari, Ethiopic, Myanmar, Arabic, Syriac) and at line breaks; a sentence of more than
    ``max_words`` words is cut into near-equal runs of words, one without spaces longer than ``2 * max_chars``
    into runs of ``max_chars`` characters; pieces under ``min_chars`` characters are dropped."""
    import re

    from mmbert_dagster.evaluate.suite import strip_header

    out: list[str] = []
    for sentence in re.split(r"(?<=[.!?;。！？；।॥။።܁۔؟])\s*|\n+", strip_header(text)):
        sentence = sentence.strip()
        if not sentence:
            continue
        words = sentence.split()
        if len(words) == 1 and len(sentence) > 2 * max_chars:
            out += [sentence[i:i + max_chars] for i in range(0, len(sentence), max_chars)]
            continue
        n = -(-len(words) // max_words)
        size = -(-len(words) // n)
        out += [" ".join(words[i:i + size]) for i in range(0, len(words), size)]
    return [p for p in out if len(p) >= min_chars]


def standin_data(task: FinetuneTask, heldout: pl.DataFrame | None = None,
                 test_languages: Sequence[str] | None = None) -> TaskData:
    """UDHR article classification from the held-out table (``declared_lang``, ``article``, ``text``): labels
    ``article_25`` .. ``article_30`` (ids 0..5); train = the pieces of ``task.train_languages``; test = the pieces
    of every other language of ``test_languages`` (else ``task.test_languages``, else every held-out language),
    at most ``task.max_test`` per language."""
    import polars as pl

    if heldout is None:
        from mmbert_dagster.data.sources import embedded_heldout

        heldout = pl.read_parquet(embedded_heldout())
    need = {"declared_lang", "article", "text"}
    if not need <= set(heldout.columns):
        raise FinetuneTaskError(f"{task.name}: held-out table lacks {sorted(need - set(heldout.columns))}; "
                                f"has {heldout.columns}")
    rows = heldout.select("declared_lang", "article", "text").sort("declared_lang", "article").rows()
    articles = sorted({int(a) for _, a, _ in rows})
    labels = [f"article_{a}" for a in articles]
    index = {a: i for i, a in enumerate(articles)}
    present = {lang for lang, _, _ in rows}
    missing = [lang for lang in task.train_languages if lang not in present]
    if missing:
        raise FinetuneTaskError(f"{task.name}: no held-out text in training language(s) {missing}")
    wanted = list(test_languages) if test_languages is not None else list(task.test_languages)
    notes = []
    if wanted:
        absent = sorted(set(wanted) - present)
        if absent:
            notes.append(f"{task.name}: {len(absent)} test language(s) have no held-out text: "
                         f"{', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}")
        tests = set(wanted) & present
    else:
        tests = present
    tests -= set(task.train_languages)  # zero-shot: the training languages are not test languages
    train: list[Example] = []
    test: dict[str, list[Example]] = {}
    for lang, article, text in rows:
        if lang in task.train_languages:
            train += [Example((p,), index[int(article)]) for p in sentence_pieces(text)]
        elif lang in tests:
            test.setdefault(lang, []).extend(Example((p,), index[int(article)]) for p in sentence_pieces(text))
    return _finish(task, labels, train, test, "the held-out UDHR articles", notes)


# --- CoNLL files

def read_conll(path: Path | str) -> list[tuple[list[str], list[str]]]:
    """(words, tags) per sentence of a CoNLL-style file: one token per line, its tag in the last
    whitespace-separated column, blank lines between sentences, ``-DOCSTART-`` lines skipped."""
    from pathlib import Path

    sentences: list[tuple[list[str], list[str]]] = []
    words: list[str] = []
    tags: list[str] = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        cols = line.split()
        if not cols or cols[0] == "-DOCSTART-":
            if words:
                sentences.append((words, tags))
            words, tags = [], []
            continue
        if len(cols) < 2:
            raise FinetuneTaskError(f"{path}:{n}: expected a token and its tag, got {line!r}")
        words.append(cols[0])
        tags.append(cols[-1])
    if words:
        sentences.append((words, tags))
    return sentences


def _conll_file(folder: Path, split: str) -> Path | None:
    for suffix in CONLL_SUFFIXES:
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    return None


def _conll_layout(task: FinetuneTask) -> dict[str, Path] | None:
    """{language: its folder} when ``task.dataset`` is a CoNLL folder, else None."""
    from pathlib import Path

    if task.kind != "token" or "{lang}" in task.config:
        return None
    if "{lang}" in task.dataset:
        langs = set(task.train_languages) | set(task.test_languages)
        folders = {lang: Path(task.dataset.replace("{lang}", lang)) for lang in langs}
        if folders and all(_conll_file(f, task.train_split) or _conll_file(f, task.test_split)
                           for f in folders.values()):
            if not task.test_languages:  # every language the pattern matches
                import glob

                head, _, tail = task.dataset.partition("{lang}")
                for p in glob.glob(glob.escape(head) + "*" + glob.escape(tail)):
                    lang = p[len(head):len(p) - len(tail)] if tail else p[len(head):]
                    if "/" not in lang and _conll_file(Path(p), task.test_split):
                        folders[lang] = Path(p)
            return folders
        return None
    root = Path(task.dataset).expanduser()
    if not root.is_dir():
        return None
    if _conll_file(root, task.train_split) or _conll_file(root, task.test_split):
        if len(task.train_languages) != 1:
            raise FinetuneTaskError(f"{task.name}: {root} holds one language's files; name it as "
                                    f"train_languages = [\"<code>\"]")
        return {task.train_languages[0]: root}
    subs = {p.name: p for p in sorted(root.iterdir()) if p.is_dir()
            and (_conll_file(p, task.train_split) or _conll_file(p, task.test_split))}
    return subs or None


def conll_data(task: FinetuneTask, folders: Mapping[str, Path], test_languages: Sequence[str] | None = None
               ) -> TaskData:
    """A token task from CoNLL files ``<folder of lang>/<split>.txt`` (see :func:`read_conll`)."""
    train_langs = task.train_languages or tuple(sorted(folders))
    wanted = list(test_languages) if test_languages is not None else list(task.test_languages)
    test_langs = wanted or sorted(lang for lang in folders if _conll_file(folders[lang], task.test_split))
    sentences: dict[tuple[str, str], list] = {}
    for split, langs in ((task.train_split, train_langs), (task.test_split, test_langs)):
        for lang in langs:
            file = _conll_file(folders[lang], split) if lang in folders else None
            if file is None:
                raise FinetuneTaskError(f"{task.name}: no {split} file for language {lang!r} in {task.dataset} "
                                        f"(expected <lang>/{split}{{{','.join(CONLL_SUFFIXES)}}})")
            sentences[split, lang] = read_conll(file)
    tags = sorted({t for rows in sentences.values() for _, ts in rows for t in ts})
    index = {t: i for i, t in enumerate(tags)}
    convert = lambda rows: [Example(tuple(w), tuple(index[t] for t in ts)) for w, ts in rows]  # noqa: E731
    train = [ex for lang in train_langs for ex in convert(sentences[task.train_split, lang])]
    test = {lang: convert(sentences[task.test_split, lang]) for lang in test_langs}
    return _finish(task, tags, train, test, f"CoNLL files in {task.dataset}")


# --- Hugging Face datasets

def _is_local(path: str) -> bool:
    from pathlib import Path

    return path.startswith((".", "/", "~")) or Path(path).expanduser().exists()


def _load_splits(task: FinetuneTask, path: str, config: str, splits: Sequence[str], cache_dir: str) -> dict:
    """{split: datasets.Dataset} from a local file / folder / save_to_disk folder, or the hub."""
    import datasets
    from pathlib import Path

    local = Path(path).expanduser()
    builders = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    if _is_local(path):
        if not local.exists():
            raise FinetuneTaskError(f"{task.name}: {local} does not exist")
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.Dataset):
                raise FinetuneTaskError(f"{task.name}: {local} is one saved Dataset; save a DatasetDict with the "
                                        f"splits {list(splits)}")
        elif local.is_dir():
            files = {}
            for split in splits:
                found = [local / f"{split}{s}" for s in builders if (local / f"{split}{s}").is_file()]
                if found:
                    files[split] = found[0]
            kinds = {builders[f.suffix] for f in files.values()}
            if len(files) == len(splits) and len(kinds) == 1:  # <split>.<ext> for every split: exact names
                ds = datasets.load_dataset(kinds.pop(), data_files={s: str(f) for s, f in files.items()},
                                           cache_dir=cache_dir)
            else:  # whatever load_dataset makes of the folder (train/test/validation file name patterns...)
                ds = datasets.load_dataset(str(local), *([config] if config else []), cache_dir=cache_dir)
        elif local.suffix in builders:  # one file: only one split can come from it
            ds = datasets.load_dataset(builders[local.suffix], data_files={splits[0]: str(local)},
                                       cache_dir=cache_dir)
        else:
            raise FinetuneTaskError(f"{task.name}: {local}: not a folder or a .jsonl/.json/.csv/.parquet file")
    else:
        try:
            ds = datasets.load_dataset(path, *([config] if config else []))
        except Exception as e:  # offline (HF_DATASETS_OFFLINE / no network), unknown name or config
            raise TaskUnavailable(f"{task.name}: skipped — could not load {path!r}"
                                  f"{f' ({config!r})' if config else ''}: {type(e).__name__}: {e}") from e
    out = {}
    for split in splits:
        if split not in ds:
            raise FinetuneTaskError(f"{task.name}: split {split!r} not in {path} (has {sorted(ds)})")
        part = ds[split]
        need = [*task.text_fields, task.label_field, *([task.language_field] if task.language_field else [])]
        missing = [f for f in need if f not in part.column_names]
        if missing:
            raise FinetuneTaskError(f"{task.name}: {path}[{split}] has no field(s) {missing} "
                                    f"(has {part.column_names})")
        out[split] = part
    return out


def _label_names(feature) -> list[str] | None:
    """ClassLabel names of a label feature, or of the items of a sequence feature."""
    names = getattr(feature, "names", None)
    if names:
        return list(names)
    inner = getattr(feature, "feature", None)  # datasets' Sequence / List of ClassLabel
    return _label_names(inner) if inner is not None else None


def _lang_of(value) -> str:
    if isinstance(value, (list, tuple)):
        return str(value[0]) if value else ""
    return str(value)


def hf_data(task: FinetuneTask, test_languages: Sequence[str] | None = None) -> TaskData:
    """A sequence or token task through Hugging Face ``datasets`` (see the module docstring for the layouts)."""
    import tempfile

    import datasets

    wanted = list(test_languages) if test_languages is not None else list(task.test_languages)
    templated = "{lang}" in task.dataset or "{lang}" in task.config
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    raw: dict[str, list[tuple[str, dict]]] = {task.train_split: [], task.test_split: []}  # split -> (lang, row)
    names = None
    fields = [*task.text_fields, task.label_field, *([task.language_field] if task.language_field else [])]
    try:
        with tempfile.TemporaryDirectory(prefix="finetune-data-") as cache:  # local files: no cache left behind
            def take(lang_for_rows: str | None, path: str, config: str, splits: Sequence[str]):
                nonlocal names
                parts = _load_splits(task, path, config, splits, cache)
                for split, part in parts.items():
                    names = names or _label_names(part.features[task.label_field])
                    cols = {f: part[f] for f in dict.fromkeys(fields)}
                    for i in range(len(part)):
                        row = {f: cols[f][i] for f in cols}
                        lang = lang_for_rows if lang_for_rows is not None else (
                            _lang_of(row[task.language_field]) if task.language_field else "")
                        raw[split].append((lang, row))

            if templated:
                fill = lambda s, lang: s.replace("{lang}", lang)  # noqa: E731
                if not wanted:
                    raise FinetuneTaskError(f"{task.name}: \"{{lang}}\" in dataset / config: name the test "
                                            f"languages (test_languages)")
                for lang in dict.fromkeys([*task.train_languages, *wanted]):
                    splits = [s for s, langs in ((task.train_split, task.train_languages),
                                                 (task.test_split, wanted)) if lang in langs]
                    take(lang, fill(task.dataset, lang), fill(task.config, lang), splits)
            else:
                if not task.language_field and len(task.train_languages) != 1:
                    raise FinetuneTaskError(
                        f"{task.name}: without a language_field or \"{{lang}}\", the dataset is one language; "
                        f"name it as train_languages = [\"<code>\"]")
                single = None if task.language_field else task.train_languages[0]
                take(single, task.dataset, task.config, [task.train_split, task.test_split])
    finally:
        if bars:
            datasets.utils.logging.enable_progress_bar()

    def usable(row) -> bool:
        label = row[task.label_field]
        if task.kind == "sequence":
            return label is not None and label != -1 and all(row[f] is not None for f in task.text_fields)
        return bool(row[task.text_fields[0]]) and label is not None and len(label) == len(row[task.text_fields[0]])

    train_rows = [(lang, r) for lang, r in raw[task.train_split]
                  if usable(r) and (templated or not task.train_languages or lang in task.train_languages)]
    test_rows = [(lang, r) for lang, r in raw[task.test_split]
                 if usable(r) and (not wanted or lang in wanted)]
    # labels: ClassLabel names (ids as stored), else the sorted distinct values of both splits
    values = ([r[task.label_field] for _, r in train_rows + test_rows] if task.kind == "sequence" else
              [t for _, r in train_rows + test_rows for t in r[task.label_field]])
    if names:
        labels = names
        to_id = lambda v: int(v)  # noqa: E731
    else:
        if task.kind == "token" and any(not isinstance(v, str) for v in values):
            raise FinetuneTaskError(f"{task.name}: tag ids of {task.label_field!r} carry no ClassLabel names; "
                                    f"entity F1 needs BIO tag names (strings or a ClassLabel feature)")
        distinct = sorted(set(values), key=lambda v: (str(type(v)), v))
        labels = [str(v) for v in distinct]
        index = {v: i for i, v in enumerate(distinct)}
        to_id = index.__getitem__
    text_of = lambda r: tuple(str(r[f]) for f in task.text_fields)  # noqa: E731

    def example(row) -> Example:
        if task.kind == "sequence":
            return Example(text_of(row), to_id(row[task.label_field]))
        return Example(tuple(str(w) for w in row[task.text_fields[0]]),
                       tuple(to_id(t) for t in row[task.label_field]))

    test: dict[str, list[Example]] = {}
    for lang, r in test_rows:
        test.setdefault(lang, []).append(example(r))
    source = f"{task.dataset}{f' ({task.config})' if task.config else ''}"
    return _finish(task, labels, [example(r) for _, r in train_rows], test, source)


def load_task_data(task: FinetuneTask, *, test_languages: Sequence[str] | None = None,
                   heldout: pl.DataFrame | None = None) -> TaskData:
    """The task's data in the uniform :class:`TaskData` shape; ``test_languages`` (dataset codes) narrows or
    names the test languages. Raises :class:`TaskUnavailable` for a hub dataset that cannot be reached and
    :class:`FinetuneTaskError` for bad local data or fields."""
    if task.is_standin:
        return standin_data(task, heldout, test_languages)
    folders = _conll_layout(task)
    if folders is not None:
        return conll_data(task, folders, test_languages)
    return hf_data(task, test_languages)


# ------------------------------------------------------------------------------------------ tokenization

@dataclass
class Tokenizer:
    """A checkpoint's ``tokenizers`` tokenizer with the model's [CLS] / [SEP] / pad ids: examples are encoded
    without the tokenizer's template and wrapped here, the same for every tokenizer."""

    backend: Any
    cls: int
    sep: int
    pad: int

    @classmethod
    def from_folder(cls, folder: Path | str) -> Tokenizer:
        import json
        from pathlib import Path

        from mmbert_dagster.data.tokenizer import load_tokenizer, special_token_ids

        folder = Path(folder)
        backend = load_tokenizer(folder)
        backend.encode_special_tokens = True  # a literal "[MASK]" in a text is text
        backend.no_truncation()
        backend.no_padding()
        cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        ids = special_token_ids(folder)
        pick = lambda *keys: next((v for v in keys if v is not None), None)  # noqa: E731
        out = cls(backend,
                  cls=pick(cfg.get("cls_token_id"), ids.get("cls"), ids.get("bos")),
                  sep=pick(cfg.get("sep_token_id"), ids.get("sep"), ids.get("eos")),
                  pad=pick(cfg.get("pad_token_id"), ids.get("pad")))
        if None in (out.cls, out.sep, out.pad):
            raise FinetuneTaskError(f"{folder}: neither config.json nor the tokenizer names the cls / sep / pad "
                                    f"token ids")
        return out

    def encode_texts(self, examples: Sequence[tuple[str, ...]], max_length: int) -> list[list[int]]:
        """``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]``, the longer part cut first to fit ``max_length``."""
        firsts = [e.ids for e in self.backend.encode_batch([ex[0] for ex in examples], add_special_tokens=False)]
        pairs = [ex for ex in examples if len(ex) > 1]
        seconds = iter([e.ids for e in self.backend.encode_batch([ex[1] for ex in pairs], add_special_tokens=False)]
                       if pairs else [])
        out = []
        for ex, a in zip(examples, firsts):
            if len(ex) == 1:
                out.append([self.cls, *a[:max_length - 2], self.sep])
                continue
            b = next(seconds)
            budget = max_length - 3
            while len(a) + len(b) > budget:  # longest first
                if len(a) >= len(b):
                    a = a[:-1]
                else:
                    b = b[:-1]
            out.append([self.cls, *a, self.sep, *b, self.sep])
        return out

    def encode_words(self, sentences: Sequence[Sequence[str]], max_length: int, add_prefix_space: bool
                     ) -> list[tuple[list[int], list[int | None]]]:
        """(input ids, word index of each token — None for [CLS] / [SEP]) per sentence. Every word is tokenized
        on its own, as ``" " + word`` when ``add_prefix_space`` else bare; words that no longer fit in
        ``max_length`` are left out (they are scored as predicted "O")."""
        flat = [(" " + w) if add_prefix_space else w for s in sentences for w in s]
        pieces = iter(e.ids for e in self.backend.encode_batch(flat, add_special_tokens=False)) if flat else iter(())
        out = []
        for words in sentences:
            ids, word_ids = [self.cls], [None]
            full = False
            for i in range(len(words)):
                p = next(pieces)
                if full or len(ids) + len(p) > max_length - 1:
                    full = True
                    continue
                ids += p
                word_ids += [i] * len(p)
            out.append((ids + [self.sep], word_ids + [None]))
        return out


def tokenize_words(folder: Path | str, words: Sequence[str], *, add_prefix_space: bool, max_length: int = 512
                   ) -> list[str]:
    """The sub-word tokens of one sentence's words as a token task sees them (for inspection and tests)."""
    tok = Tokenizer.from_folder(folder)
    ids, _ = tok.encode_words([list(words)], max_length, add_prefix_space)[0]
    return [tok.backend.id_to_token(i) for i in ids]


def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Token labels: each word's label on its FIRST sub-token, ``IGNORE`` (-100) on its other sub-tokens and on
    special tokens."""
    out, previous = [], None
    for w in word_ids:
        out.append(IGNORE if w is None or w == previous else int(word_labels[w]))
        previous = w
    return out


def word_predictions(word_ids: Sequence[int | None], token_predictions: Sequence[int], n_words: int,
                     outside: int) -> list[int]:
    """Word predictions read at each word's first sub-token; ``outside`` (the "O" tag) for a word without tokens
    (cut by ``max_length``, or tokenized to nothing)."""
    out = [outside] * n_words
    previous = None
    for w, p in zip(word_ids, token_predictions):
        if w is not None and w != previous:
            out[w] = int(p)
        previous = w
    return out


# ---------------------------------------------------------------------------------------------- training

@dataclass
class _Prepared:
    """One (model, task)'s encoded data: reused by every seed."""

    task: FinetuneTask
    folder: Path
    labels: tuple[str, ...]
    train: list[dict]
    test: list[dict]  # every language's examples, sorted by length (less padding); "lang" / "i" say whose
    gold: dict[str, list]  # per language: the gold labels (sequence: ids; token: tag-name lists)
    word_ids: list  # token tasks: per test example, the word index of each token
    pad: int


def _prepare(task: FinetuneTask, folder: Path | str, data: TaskData, max_positions: int) -> _Prepared:
    from pathlib import Path

    tok = Tokenizer.from_folder(folder)
    max_length = min(task.max_length, max_positions)
    train, test, gold, word_ids = [], [], {}, []
    if task.kind == "sequence":
        for ids, ex in zip(tok.encode_texts([ex.inputs for ex in data.train], max_length), data.train):
            train.append({"input_ids": ids, "labels": int(ex.label)})
        for lang, exs in data.test.items():
            gold[lang] = [int(ex.label) for ex in exs]
            for i, ids in enumerate(tok.encode_texts([ex.inputs for ex in exs], max_length)):
                test.append({"input_ids": ids, "labels": gold[lang][i], "lang": lang, "i": i})
    else:
        for (ids, wids), ex in zip(tok.encode_words([ex.inputs for ex in data.train], max_length,
                                                    task.add_prefix_space), data.train):
            train.append({"input_ids": ids, "labels": align_labels(wids, ex.label)})
        for lang, exs in data.test.items():
            gold[lang] = [[data.labels[t] for t in ex.label] for ex in exs]
            encoded = tok.encode_words([ex.inputs for ex in exs], max_length, task.add_prefix_space)
            for i, ((ids, wids), ex) in enumerate(zip(encoded, exs)):
                test.append({"input_ids": ids, "labels": align_labels(wids, ex.label), "lang": lang, "i": i,
                             "word_ids": wids})
    test.sort(key=lambda r: len(r["input_ids"]))
    word_ids = [r.pop("word_ids", None) for r in test]
    return _Prepared(task, Path(folder), data.labels, train, test, gold, word_ids, tok.pad)


def _collate(pad: int, token_task: bool):
    import torch

    def collate(rows: list[dict]) -> dict:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE, dtype=torch.long) if token_task else torch.zeros(
            len(rows), dtype=torch.long)
        for j, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[j, :k] = torch.tensor(r["input_ids"])
            mask[j, :k] = 1
            if token_task:
                labels[j, :k] = torch.tensor(r["labels"])
            else:
                labels[j] = r["labels"]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


class _Rows:
    """A map-style dataset over the encoded rows, exposing only what the model takes."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = self.rows[i]
        return {"input_ids": r["input_ids"], "labels": r["labels"]}


def _quiet_transformers():
    """Silence transformers' load report (the new head's weights are "newly initialized", the MLM head's
    "unused" — both expected here) and its "Loading weights" progress bar for the duration of a load; restores
    both after."""
    import contextlib

    from transformers.utils import logging

    @contextlib.contextmanager
    def quiet():
        level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        try:
            yield
        finally:
            logging.set_verbosity(level)
            if bars:
                logging.enable_progress_bar()

    return quiet()


def _fit_and_score(prep: _Prepared, seed: int, device: str) -> tuple[dict[str, float], dict]:
    """Fine-tune a fresh copy of the checkpoint with ``seed``; score every test language. Returns
    ({dataset lang: metric value}, training info)."""
    import shutil
    import tempfile
    import time

    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, Trainer,
                              TrainingArguments, set_seed)
    from transformers.trainer_callback import PrinterCallback

    task = prep.task
    token_task = task.kind == "token"
    t0 = time.perf_counter()
    set_seed(seed)  # the new head's init
    auto = AutoModelForTokenClassification if token_task else AutoModelForSequenceClassification
    with _quiet_transformers():
        model = auto.from_pretrained(str(prep.folder), num_labels=len(prep.labels),
                                     id2label=dict(enumerate(prep.labels)),
                                     label2id={n: i for i, n in enumerate(prep.labels)},
                                     local_files_only=True, attn_implementation="sdpa", dtype=torch.float32)
    cuda = str(device).startswith("cuda")
    tmp = tempfile.mkdtemp(prefix="finetune-")
    try:
        args = TrainingArguments(
            output_dir=tmp, learning_rate=task.lr, num_train_epochs=task.epochs,
            per_device_train_batch_size=task.batch_size, per_device_eval_batch_size=max(task.batch_size, 64),
            warmup_steps=task.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the steps
            weight_decay=task.weight_decay, lr_scheduler_type="linear", seed=seed, data_seed=seed,
            save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
            use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported(), dataloader_num_workers=0,
            dataloader_pin_memory=cuda, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=_Rows(prep.train),
                          data_collator=_collate(prep.pad, token_task))
        trainer.remove_callback(PrinterCallback)  # with tqdm off it prints the final metrics dict; we log a line
        out = trainer.train()
        t_train = time.perf_counter() - t0
        logits = trainer.predict(_Rows(prep.test)).predictions
        if isinstance(logits, tuple):
            logits = logits[0]
        pred = np.asarray(logits).argmax(-1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    by_lang: dict[str, list] = {lang: [None] * len(g) for lang, g in prep.gold.items()}
    if token_task:
        outside = prep.labels.index("O") if "O" in prep.labels else 0
        for row, wids, p in zip(prep.test, prep.word_ids, pred):
            n_words = len(prep.gold[row["lang"]][row["i"]])
            by_lang[row["lang"]][row["i"]] = [prep.labels[k] for k in word_predictions(wids, p, n_words, outside)]
        scores = {lang: entity_f1(prep.gold[lang], by_lang[lang]) for lang in prep.gold}
    else:
        for row, p in zip(prep.test, pred):
            by_lang[row["lang"]][row["i"]] = int(p)
        scores = {lang: float(np.mean(np.asarray(by_lang[lang]) == np.asarray(prep.gold[lang])))
                  for lang in prep.gold}
    info = {"steps": int(out.global_step), "loss": float(out.training_loss), "train_s": t_train,
            "seconds": time.perf_counter() - t0, "n_train": len(prep.train)}
    del trainer, model
    return scores, info


def entity_f1(gold: list[list[str]], pred: list[list[str]]) -> float:
    """Entity-level (conlleval) F1 of BIO tag sequences; 0 when neither side has an entity."""
    import warnings

    try:
        from seqeval.metrics import f1_score
    except ImportError as e:  # pragma: no cover - a dev / eval dependency
        raise ImportError("token tasks need seqeval for entity-level F1 (pip install seqeval)") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UndefinedMetricWarning when a language has no entity at all
        return float(f1_score(gold, pred))


def _max_positions(folder: Path | str) -> int:
    import json
    from pathlib import Path

    cfg = Path(folder) / "config.json"
    return int(json.loads(cfg.read_text()).get("max_position_embeddings", 512)) if cfg.is_file() else 512


def run_task(task: FinetuneTask, folder: Path | str, *, seed: int, test_languages: Sequence[str] | None = None,
             device: str = "cpu", log: Callable[[str], None] = print, data: TaskData | None = None,
             heldout: pl.DataFrame | None = None) -> dict[str, float]:
    """Fine-tune a copy of the checkpoint in ``folder`` on ``task`` with ``seed``; returns {language (the score
    table's code): accuracy (sequence) or entity F1 (token)} for every test language. ``data`` (from
    :func:`load_task_data`) skips reloading; ``test_languages`` (dataset codes) narrows or names the languages."""
    from pathlib import Path

    problems = _problems(task)
    if problems:
        raise FinetuneTaskError(f"finetune task {task.name!r}.{problems[0][0]}: {problems[0][1]}")
    if data is None:
        data = load_task_data(task, test_languages=test_languages, heldout=heldout)
    elif test_languages is not None:
        data = dataclasses.replace(data, test={k: v for k, v in data.test.items() if k in set(test_languages)})
    prep = _prepare(task, folder, data, _max_positions(folder))
    scores, info = _fit_and_score(prep, seed, device)
    log(_run_line(Path(folder).name, task, seed, scores, info))
    return {task.table_lang(lang): v for lang, v in scores.items()}


def _run_line(model: str, task: FinetuneTask, seed: int, scores: Mapping[str, float], info: dict) -> str:
    import numpy as np

    return (f"finetune {task.name} / {model} / seed {seed}: {info['n_train']} training examples, {info['steps']} "
            f"steps (loss {info['loss']:.3f}); {task.metric} {np.mean(list(scores.values())):.3f} over "
            f"{len(scores)} language(s); {info['seconds']:.1f}s ({info['train_s']:.1f}s loading + training)")


# ------------------------------------------------------------------------------------------ score tables

def item_schema() -> dict:
    import polars as pl

    kinds = {"str": pl.String, "int": pl.Int64, "float": pl.Float64}
    return {name: kinds[k] for name, k in ITEM_SCHEMA_SPEC}


def finetune_items(tasks: Iterable[FinetuneTask], folders: Mapping[str, Path | str], tiers: Mapping[str, str], *,
                   english: str = "eng_Latn", heldout: pl.DataFrame | None = None, device: str = "cpu",
                   log: Callable[[str], None] = print, notes: list[str] | None = None) -> pl.DataFrame:
    """One row per (model, task, test language, seed): ``model, task, lang, tier, seed, metric, value, n`` (the
    language's test examples). Tiers: ``english`` is "english", else ``tiers.get(lang, "unseen")`` (score-table
    codes). The stand-in is tested on the languages of ``tiers`` (e.g. the benchmark's chosen languages) unless
    the task names its own. A hub dataset that cannot be loaded is skipped with a note (logged, and appended to
    ``notes``); every other error is raised."""
    import time

    import polars as pl

    rows: list[dict] = []
    for task in tasks:
        t0 = time.perf_counter()
        langs = None
        if task.is_standin and not task.test_languages:
            langs = [lang for lang in tiers if lang not in task.train_languages]
        try:
            data = load_task_data(task, test_languages=langs, heldout=heldout)
        except TaskUnavailable as e:
            log(str(e))
            if notes is not None:
                notes.append(str(e))
            continue
        for note in data.notes:
            log(note)
            if notes is not None:
                notes.append(note)
        log(f"finetune {task.name}: {len(data.train)} training examples, {len(data.labels)} labels, "
            f"{sum(map(len, data.test.values()))} test examples in {len(data.test)} language(s) from {data.source} "
            f"({time.perf_counter() - t0:.1f}s)")
        for model, folder in folders.items():
            prep = _prepare(task, folder, data, _max_positions(folder))
            for seed in task.seeds:
                scores, info = _fit_and_score(prep, seed, device)
                log(_run_line(model, task, seed, scores, info))
                for lang, value in scores.items():
                    code = task.table_lang(lang)
                    rows.append({"model": model, "task": task.name, "lang": code,
                                 "tier": "english" if code == english else tiers.get(code, "unseen"),
                                 "seed": int(seed), "metric": task.metric, "value": float(value),
                                 "n": len(data.test[lang])})
    return pl.DataFrame(rows, schema=item_schema()).sort("model", "task", "lang", "seed")


def finetune_table(items: pl.DataFrame) -> pl.DataFrame:
    """The long score table (``suite.SCHEMA``: model, task, lang, tier, metric, value) of :func:`finetune_items`'
    rows: per (model, task, lang) ``<metric>_mean`` and ``<metric>_sd`` over the seeds (ddof 1; NaN for one
    seed); per tier and over all languages (tier "all"), at lang ``"*"``, the mean over seeds of the seed's
    mean over the tier's languages, and its sd over the seeds."""
    import polars as pl

    from mmbert_dagster.evaluate.suite import SCHEMA

    def stats(frame: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
        agg = frame.group_by(keys).agg(pl.col("value").mean().alias("mean"),
                                       pl.col("value").std(ddof=1).fill_null(float("nan")).alias("sd"))
        others = [k for k in keys if k != "metric"]
        return pl.concat([agg.select(*others, (pl.col("metric") + "_" + s).alias("metric"), pl.col(s).alias("value"))
                          for s in ("mean", "sd")])

    per_lang = stats(items, ["model", "task", "lang", "tier", "metric"])
    per_seed_tier = items.group_by("model", "task", "tier", "metric", "seed").agg(pl.col("value").mean())
    per_seed_all = items.group_by("model", "task", "metric", "seed").agg(pl.col("value").mean()).with_columns(
        pl.lit("all").alias("tier"))
    summary = pl.concat([per_seed_tier, per_seed_all.select(per_seed_tier.columns)])
    summary = stats(summary, ["model", "task", "tier", "metric"]).with_columns(pl.lit("*").alias("lang"))
    table = pl.concat([per_lang.select(list(SCHEMA)), summary.select(list(SCHEMA))]).cast(SCHEMA)
    return table.sort("model", "task", "tier", "lang", "metric")


def finetune_scores(tasks: Iterable[FinetuneTask], folders: Mapping[str, Path | str], tiers: Mapping[str, str], *,
                    english: str = "eng_Latn", heldout: pl.DataFrame | None = None, device: str = "cpu",
                    log: Callable[[str], None] = print, notes: list[str] | None = None) -> pl.DataFrame:
    """:func:`finetune_table` of :func:`finetune_items`: the score table of every task x model (seeds summarized).
    Call the two yourself to keep the per-seed rows too."""
    return finetune_table(finetune_items(tasks, folders, tiers, english=english, heldout=heldout, device=device,
                                         log=log, notes=notes))
