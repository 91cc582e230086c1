"""The tokenizer: train a byte-level BPE on a per-language sample, or adopt a user-supplied tokenizer.

Either way the result is a Hugging Face tokenizer folder that loads offline with
``transformers.AutoTokenizer.from_pretrained(folder)`` and also holds ``folder/tokenizer.json`` (the plain
``tokenizers`` file that datatrove's ``DocumentTokenizer`` needs). Its post-processor wraps every document as
``[CLS] text [SEP]`` (or the tokenizer's own start/end tokens), so the token shards carry document boundaries
in the token stream as well as in their index files.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # polars is imported where a table is built: training reads shards without it
    import polars as pl

from mmbert_dagster.recipe import TokenizerConfig
from mmbert_dagster.seeding import stable_seed

# ModernBERT's special tokens. Ids 0..4 in this order in a tokenizer we train.
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
MODEL_MAX_LENGTH = 8192  # ModernBERT's; the training core decides the real context length per stage
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]  # ModernBERT takes no token_type_ids
ROLES = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")
TOKENIZER_FILE = "tokenizer.json"  # the tokenizers-library file every tokenizer folder (and checkpoint) holds


class TokenizerError(ValueError):
    """A missing or unusable tokenizer; the message names the path."""


def _script(lang: str) -> str:
    return lang.split("_", 1)[1] if "_" in lang else lang


def sample_budgets(available: dict[str, int], per_lang: int, tau: float) -> dict[str, int]:
    """Bytes to sample per language. The total is that of ``per_lang`` bytes from every language (all of a
    smaller one), so the tokenizer's training time does not depend on τ; it is shared ∝ ``available ** tau`` —
    as the mixtures share tokens — never giving a language more than it has, the rest going to the others
    (water-filling). τ = 0 gives exactly ``min(available, per_lang)``."""
    budgets = {lang: 0 for lang in available}
    left = sum(min(n, per_lang) for n in available.values())
    open_langs = {lang for lang, n in available.items() if n > 0}
    while open_langs and left > 0:
        weight = {lang: float(available[lang]) ** tau for lang in open_langs}
        total = sum(weight.values())
        full = {lang for lang in open_langs if left * weight[lang] / total >= available[lang]}
        if not full:
            for lang in sorted(open_langs):
                budgets[lang] = int(left * weight[lang] / total)
            break
        for lang in full:  # takes all it has; the others share what is left
            budgets[lang] = available[lang]
            left -= available[lang]
        open_langs -= full
    return budgets


def sample_for_tokenizer(docs: pl.DataFrame, cfg: TokenizerConfig, seed: int) -> Iterator[tuple[str, str]]:
    """Yield ``(lang, text)`` pairs: a language's budget of UTF-8 bytes (:func:`sample_budgets`: on average
    ``cfg.sample_bytes_per_lang``, shared ∝ bytes ** ``cfg.sample_tau``) from every language.

    Each language's documents, sorted by text, are visited in an order seeded by ``(seed, lang)``; documents are
    taken whole until the budget is reached, the last one cut at a character boundary to fit. Languages come in
    sorted order. The same documents, ``cfg`` and ``seed`` always give the same sample, in whatever row order
    ``docs`` holds them (a polars join returns its rows in a different order on every run).
    """
    import polars as pl
    missing = {"lang", "text"} - set(docs.columns)
    if missing:
        raise ValueError(f"sample_for_tokenizer: docs lack column(s) {sorted(missing)}; has {docs.columns}")
    if int(cfg.sample_bytes_per_lang) <= 0:
        return
    docs = docs.select("lang", "text").filter(pl.col("text").is_not_null() & (pl.col("text").str.len_bytes() > 0))
    docs = docs.sort("lang", "text")  # the permutation below must not depend on the incoming row order
    parts = sorted(docs.partition_by("lang", as_dict=True, maintain_order=True).items())
    budgets = sample_budgets({lang: int(part["text"].str.len_bytes().sum()) for (lang,), part in parts},
                             int(cfg.sample_bytes_per_lang), float(cfg.sample_tau))
    for (lang,), part in parts:
        texts = part["text"].to_list()
        order = np.random.default_rng(stable_seed(seed, "tokenizer-sample", lang)).permutation(len(texts))
        left = budgets[lang]
        if left <= 0:
            continue
        for i in order:
            text = texts[i]
            raw = text.encode("utf-8")
            if len(raw) > left:
                text = raw[:left].decode("utf-8", errors="ignore")
                if text:
                    yield lang, text
                break
            yield lang, text
            left -= len(raw)
            if left <= 0:
                break


def _fertility(tok, pairs: list[tuple[str, str]], top_langs: int = 10, bytes_per_lang: int = 50_000) -> dict:
    """Tokens (without special tokens) per 100 characters, by script and for the largest languages.

    Measured on the first ``bytes_per_lang`` bytes of each language's training sample (in-sample: an
    optimistic figure, fine for comparing scripts and tokenizers).
    """
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for lang, text in pairs:
        if seen[lang] < bytes_per_lang:
            kept.append((lang, text))
            seen[lang] += len(text.encode("utf-8"))
    pairs = kept
    texts = [t for _, t in pairs]
    counts = [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
    by_script: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_lang: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for (lang, text), n in zip(pairs, counts):
        for acc in (by_script[_script(lang)], by_lang[lang]):
            acc[0] += n
            acc[1] += len(text)
    rate = lambda acc: round(100.0 * acc[0] / max(acc[1], 1), 2)  # noqa: E731
    biggest = sorted(by_lang, key=lambda k: (-by_lang[k][1], k))[:top_langs]
    return {
        "per_script": {s: rate(by_script[s]) for s in sorted(by_script)},
        "per_lang_top": {lang: rate(by_lang[lang]) for lang in biggest},
        "overall": rate([sum(counts), sum(len(t) for t in texts)]),
    }


def _save_hf(tok, out_dir: Path, roles: dict[str, str | None]) -> None:
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer and save it to ``out_dir``."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {f"{r}_token": t for r, t in roles.items() if t}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=MODEL_MAX_LENGTH,
        model_input_names=MODEL_INPUT_NAMES,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    # save_pretrained writes the backend's tokenizer.json; make sure it is the one datatrove will read,
    # with no truncation or padding that would silently cut documents.
    tok.no_truncation()
    tok.no_padding()
    tok.save(str(out_dir / TOKENIZER_FILE))


def train_tokenizer(
    texts_by_lang: Iterable[tuple[str, str]], out_dir: Path, cfg: TokenizerConfig, *, log=print
) -> dict:
    """Train a byte-level BPE tokenizer on ``(lang, text)`` pairs and save it as a HF folder in ``out_dir``.

    NFC normalizer, GPT-2-style ByteLevel pre-tokenizer and decoder (lossless: every string round-trips),
    ``cfg.vocab_size`` entries including the special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0..4),
    ``cfg.min_frequency``, and a ``[CLS] $A [SEP]`` post-processor. ``[MASK]`` strips the space before it,
    like ModernBERT's, so ``"Paris is the [MASK] of France."`` fills naturally.

    Returns metadata: vocab size, bytes/characters/documents trained on, languages, seconds, and fertility
    (tokens per 100 characters) per script and for the largest languages.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    pairs = [(lang, text) for lang, text in texts_by_lang if text]
    if not pairs:
        raise ValueError("train_tokenizer: no text to train on (empty sample)")
    n_bytes = sum(len(t.encode("utf-8")) for _, t in pairs)
    langs = sorted({lang for lang, _ in pairs})
    log(f"tokenizer: training byte-level BPE (vocab {cfg.vocab_size}) on {len(pairs)} texts, "
        f"{n_bytes / 1e6:.2f} MB, {len(langs)} languages")

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[
            AddedToken(t, special=True, lstrip=(t == MASK), normalized=False) for t in SPECIAL_TOKENS
        ],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t for _, t in pairs), trainer=trainer, length=len(pairs))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if any(v is None for v in ids.values()) or len(set(ids.values())) != len(SPECIAL_TOKENS):
        raise RuntimeError(f"tokenizer: special tokens not distinct in the trained vocab: {ids}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, ids[CLS]), (SEP, ids[SEP])],
    )
    train_seconds = time.perf_counter() - t0
    _save_hf(tok, out_dir, {"pad": PAD, "unk": UNK, "cls": CLS, "sep": SEP, "mask": MASK})
    fertility = _fertility(tok, pairs)
    meta = {
        "kind": "trained-bpe",
        "vocab_size": tok.get_vocab_size(),
        "vocab_size_target": cfg.vocab_size,
        "min_frequency": cfg.min_frequency,
        "bytes_trained": n_bytes,
        "chars_trained": sum(len(t) for _, t in pairs),
        "texts_trained": len(pairs),
        "langs": langs,
        "n_langs": len(langs),
        "special_token_ids": special_token_ids(out_dir),
        "fertility_tokens_per_100_chars": fertility,
        "train_seconds": round(train_seconds, 3),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log(f"tokenizer: vocab {meta['vocab_size']} in {meta['train_seconds']:.1f}s; "
        f"tokens/100 chars by script {fertility['per_script']}")
    return meta


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not readable JSON: {e}") from e


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _declared_roles(folder: Path) -> dict[str, str | None]:
    """Special-token roles declared by a HF folder's tokenizer_config.json / special_tokens_map.json."""
    roles: dict[str, str | None] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # tokenizer_config wins
        data = _read_json(folder / name)
        for r in ROLES:
            content = _token_content(data.get(f"{r}_token"))
            if content:
                roles[r] = content
    return roles


def special_token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """``{"pad": id, "cls": id, ...}`` for the roles a tokenizer folder declares (no transformers import)."""
    from tokenizers import Tokenizer

    tokenizer_dir = Path(tokenizer_dir)
    tok = Tokenizer.from_file(str(tokenizer_dir / TOKENIZER_FILE))
    out = {}
    for role, content in _declared_roles(tokenizer_dir).items():
        tid = tok.token_to_id(content) if content else None
        if tid is not None:
            out[role] = tid
    return out


def _first_present(tok, *candidates: str | None) -> str | None:
    for c in candidates:
        if c and tok.token_to_id(c) is not None:
            return c
    return None


def load_pretrained_tokenizer(path: str, out_dir: Path, *, log=print) -> dict:
    """Copy a user tokenizer (a ``tokenizer.json`` file or a HF folder with one) into ``out_dir``, offline.

    The result is a HF folder plus ``out_dir/tokenizer.json``. Roles come from the folder's
    ``tokenizer_config.json`` / ``special_tokens_map.json`` where present, else from common token names
    (``[CLS]``/``<s>``/``<bos>``...). A missing mask or pad token is added as a new special token (the
    vocabulary grows by one; fine for a model trained from scratch). If encoding a document adds no special
    tokens, a ``cls $A sep`` post-processor is installed so that shards keep document boundaries in-stream.
    Truncation and padding are switched off (they would cut documents when building shards).
    """
    from tokenizers import AddedToken, Tokenizer, processors

    src = Path(str(path)).expanduser()
    if not str(path).strip():
        raise TokenizerError("load_pretrained_tokenizer: empty path")
    if src.is_dir():
        file = src / TOKENIZER_FILE
        if not file.is_file():
            raise TokenizerError(
                f"{src}: tokenizer folder has no tokenizer.json (only fast tokenizers are supported; "
                f"convert a slow/sentencepiece tokenizer to tokenizer.json first)"
            )
        folder = src
    elif src.is_file():
        file, folder = src, None
    else:
        raise TokenizerError(f"{src}: tokenizer path does not exist (expected a tokenizer.json file or a HF folder)")
    t0 = time.perf_counter()
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise TokenizerError(f"{file}: not a valid tokenizers JSON file: {e}") from e

    declared = _declared_roles(folder) if folder else {}
    roles = {
        "pad": _first_present(tok, declared.get("pad"), PAD, "<pad>", "<|pad|>"),
        "unk": _first_present(tok, declared.get("unk"), UNK, "<unk>", "<|unk|>"),
        "cls": _first_present(tok, declared.get("cls"), CLS, "<cls>", declared.get("bos"), "<s>", "<bos>"),
        "sep": _first_present(tok, declared.get("sep"), SEP, "<sep>", declared.get("eos"), "</s>", "<eos>"),
        "mask": _first_present(tok, declared.get("mask"), MASK, "<mask>", "<|mask|>"),
        "bos": _first_present(tok, declared.get("bos")),
        "eos": _first_present(tok, declared.get("eos")),
    }
    added = []
    for role, default in (("pad", PAD), ("mask", MASK)):
        if roles[role] is None:
            tok.add_special_tokens([AddedToken(default, special=True, lstrip=(role == "mask"), normalized=False)])
            roles[role] = default
            added.append(default)
    if added:
        log(f"tokenizer: {src} lacks {added}; added as special tokens")
    specials = sum(tok.encode("a b").special_tokens_mask)
    installed_template = False
    if specials == 0 and roles["cls"] and roles["sep"]:
        c, s = roles["cls"], roles["sep"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{c} $A {s}", pair=f"{c} $A {s} $B:1 {s}:1",
            special_tokens=[(c, tok.token_to_id(c))] + ([(s, tok.token_to_id(s))] if s != c else []),
        )
        installed_template = True
        log(f"tokenizer: {src} added no special tokens; installed post-processor '{c} $A {s}'")
    elif specials == 0:
        log(f"tokenizer: WARNING {src} adds no special tokens and has no cls/sep; documents are not delimited "
            f"in-stream (the shard index files still keep boundaries)")
    _save_hf(tok, Path(out_dir), roles)
    meta = {
        "kind": "pretrained",
        "source": str(src),
        "vocab_size": tok.get_vocab_size(),
        "added_tokens": added,
        "installed_post_processor": installed_template,
        "special_token_ids": special_token_ids(Path(out_dir)),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log(f"tokenizer: adopted {src} (vocab {meta['vocab_size']})")
    return meta


FERTILITY_FILE = "stats/fertility.parquet"  # where the tokenizer asset keeps tokens_per_byte in its folder


def tokens_per_byte(tokenizer_dir: Path, docs: pl.DataFrame, cfg: TokenizerConfig, seed: int) -> pl.DataFrame:
    """Measured fertility per language: (lang, tokens_per_byte), tokens without special tokens divided by UTF-8
    bytes, on the same deterministic per-language sample the tokenizer is trained on (``docs``: lang, text).

    language_stats uses it to turn each language's bytes into tokens, so stage budgets (in tokens) are met by the
    shards whatever the script: a Chinese byte and a Latin byte cost very different numbers of tokens.
    """
    import polars as pl

    tok = load_tokenizer(tokenizer_dir)
    tokens: dict[str, int] = defaultdict(int)
    nbytes: dict[str, int] = defaultdict(int)
    batch: list[tuple[str, str]] = []

    def flush() -> None:
        for (lang, text), enc in zip(batch, tok.encode_batch([t for _, t in batch], add_special_tokens=False)):
            tokens[lang] += len(enc.ids)
            nbytes[lang] += len(text.encode("utf-8"))
        batch.clear()

    for pair in sample_for_tokenizer(docs, cfg, seed):
        batch.append(pair)
        if len(batch) >= 512:
            flush()
    flush()
    langs = sorted(nbytes)
    return pl.DataFrame(
        {"lang": langs, "tokens_per_byte": [tokens[lang] / max(nbytes[lang], 1) for lang in langs]},
        schema={"lang": pl.String, "tokens_per_byte": pl.Float64},
    )



def load_tokenizer(folder: Path):
    """The ``tokenizers.Tokenizer`` of a tokenizer folder (or checkpoint)."""
    from tokenizers import Tokenizer

    file = Path(folder) / TOKENIZER_FILE
    if not file.is_file():
        raise TokenizerError(f"{file}: missing; {folder} is not a tokenizer folder")
    return Tokenizer.from_file(str(file))


def build_tokenizer(docs: pl.DataFrame, out_dir: Path, cfg: TokenizerConfig, seed: int, *, user_path: str = "",
                    log: Callable[[str], None] = print) -> dict:
    """The tokenizer artifact in ``out_dir``: a byte-level BPE trained on a per-language sample of ``docs``
    (lang, text), or the user's tokenizer (``user_path``, e.g. Gemma-2's), as a Hugging Face tokenizer folder; plus
    the measured tokens per byte of every language (``FERTILITY_FILE``, in a subfolder: checkpoints copy the
    folder's files, not its folders). Returns the tokenizer's metadata."""
    if user_path:
        info = load_pretrained_tokenizer(user_path, out_dir, log=log)
    else:
        info = train_tokenizer(sample_for_tokenizer(docs, cfg, seed), out_dir, cfg, log=log)
    fertility = tokens_per_byte(out_dir, docs, cfg, seed)
    (Path(out_dir) / FERTILITY_FILE).parent.mkdir(parents=True, exist_ok=True)
    fertility.write_parquet(Path(out_dir) / FERTILITY_FILE)
    return {**info, "user_supplied": bool(user_path)}


def read_fertility(folder: Path) -> pl.DataFrame:
    """(lang, tokens_per_byte) measured by the tokenizer asset."""
    import polars as pl

    return pl.read_parquet(Path(folder) / FERTILITY_FILE)
