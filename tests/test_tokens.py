"""Tokenizer training/adoption and token shards (mmbert_dagster.data.tokenizer / .shards)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mmbert_dagster.data.shard_reader import ShardReader
from mmbert_dagster.data.shards import ShardError, build_shards
from mmbert_dagster.data.tokenizer import (
    SPECIAL_TOKENS,
    TokenizerError,
    load_pretrained_tokenizer,
    sample_for_tokenizer,
    train_tokenizer,
)
from mmbert_dagster.recipe import TokenizerConfig

WORDS = {
    "eng_Latn": "the of and to in is was for that with as on by language people world right free".split(),
    "deu_Latn": "der die und das ist nicht mit für auf dem eine Menschen Würde Recht frei gleich".split(),
    "fra_Latn": "le la les et est des une dans pour être égaux droits dignité liberté personne".split(),
    "rus_Cyrl": "все люди рождаются свободными равными своем достоинстве правах они наделены разумом".split(),
    "cmn_Hani": "人人 生而 自由 在 尊严 和 权利 上 一律 平等 他们 赋有 理性 良心 并 应 以 兄弟 关系".split(),
    "arb_Arab": "يولد جميع الناس أحرارا متساوين في الكرامة والحقوق وقد وهبوا عقلا وضميرا".split(),
}
JOINER = {"cmn_Hani": ""}
PUNCT = {"cmn_Hani": "。", "arb_Arab": ".", "rus_Cyrl": "."}


def make_text(lang: str, rng: np.random.Generator, n_words: int) -> str:
    words = WORDS[lang]
    sentences = []
    while n_words > 0:
        k = int(min(n_words, rng.integers(4, 12)))
        s = JOINER.get(lang, " ").join(words[i] for i in rng.integers(0, len(words), k))
        sentences.append(s + PUNCT.get(lang, ".") + (f" {int(rng.integers(0, 1000))}" if rng.random() < 0.2 else ""))
        n_words -= k
    return JOINER.get(lang, " ").join(sentences)


def make_corpus(n_per_lang: dict[str, int], seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for lang, n in n_per_lang.items():
        for i in range(n):
            rows.append({"doc_id": f"{lang}-{i:04d}", "source": "synthetic", "declared_lang": lang,
                         "text": make_text(lang, rng, int(rng.integers(10, 60))), "lang": lang})
    return pl.DataFrame(rows)


@pytest.fixture(scope="module")
def corpus() -> pl.DataFrame:
    df = make_corpus({"eng_Latn": 40, "deu_Latn": 30, "fra_Latn": 30, "rus_Cyrl": 30, "cmn_Hani": 30,
                      "arb_Arab": 30})
    # Edge cases that must survive the shards: decomposed accents (NFC), emoji, a literal special token.
    extra = [
        ("eng_Latn", "Cafe\u0301 de\u0301ja\u0300 vu, an e\u0301le\u0300ve said \u00e9l\u00e8ve; 🙂 ok."),
        ("eng_Latn", "A web page that mentions [MASK] and [CLS] tokens literally, and [SEP]."),
        ("eng_Latn", "  leading and trailing spaces\n\nand blank lines\t tabs  "),
    ]
    df = pl.concat([df, pl.DataFrame([
        {"doc_id": f"extra-{i}", "source": "synthetic", "declared_lang": lang, "text": t, "lang": lang}
        for i, (lang, t) in enumerate(extra)
    ])])
    return df


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    cfg = TokenizerConfig(vocab_size=1000, sample_bytes_per_lang=50_000, min_frequency=2)
    meta = train_tokenizer(sample_for_tokenizer(corpus, cfg, seed=1), out, cfg, log=lambda *_: None)
    (out.parent / "meta.json").write_text(json.dumps(meta))
    return out


def write_inputs(folder: Path, corpus: pl.DataFrame, lid: pl.DataFrame | None = None) -> tuple[list[Path], Path]:
    folder.mkdir(parents=True, exist_ok=True)
    half = corpus.height // 2
    files = [folder / "docs-0.parquet", folder / "docs-1.parquet"]
    corpus.select("doc_id", "source", "declared_lang", "text")[:half].write_parquet(files[0])
    corpus.select("doc_id", "source", "declared_lang", "text")[half:].write_parquet(files[1])
    if lid is None:
        lid = corpus.select("doc_id", "lang", pl.lit(0.99).alias("lid_score"), pl.lit(True).alias("passed"))
    lid.write_parquet(folder / "lid.parquet")
    return files, folder / "lid.parquet"


def mixture(rf: dict[str, float], stage: str = "pretrain") -> pl.DataFrame:
    return pl.DataFrame({
        "stage": [stage] * len(rf), "lang": list(rf), "tokens_available": [1000] * len(rf),
        "share": [1 / len(rf)] * len(rf), "tokens_target": [1000] * len(rf), "repeat_factor": list(rf.values()),
    })


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus, tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("shards")
    files, lid = write_inputs(root / "in", corpus)
    out = root / "out"
    out.mkdir()
    build_shards(files, lid, mixture({lang: 1.0 for lang in WORDS}), tokenizer_dir, out, seed=7,
                 log=lambda *_: None)
    return out


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_sample_caps_bytes_per_language_and_is_deterministic(corpus):
    cfg = TokenizerConfig(sample_bytes_per_lang=1000)
    a = list(sample_for_tokenizer(corpus, cfg, seed=3))
    assert a == list(sample_for_tokenizer(corpus, cfg, seed=3))
    assert a != list(sample_for_tokenizer(corpus, cfg, seed=4))
    assert a == list(sample_for_tokenizer(corpus.sample(fraction=1.0, shuffle=True, seed=5), cfg, seed=3))
    per_lang = Counter()
    for lang, text in a:
        per_lang[lang] += len(text.encode())
    assert set(per_lang) == set(WORDS)
    assert all(950 <= b <= 1000 for b in per_lang.values()), per_lang


def test_tokenizer_sample_shares_bytes_like_the_mixtures_with_sample_tau():
    from mmbert_dagster.data.tokenizer import sample_budgets

    have = {"big": 1_000_000, "mid": 100_000, "small": 5_000, "empty": 0}
    assert sample_budgets(have, 10_000, 0.0) == {"big": 10_000, "mid": 10_000, "small": 5_000, "empty": 0}
    b = sample_budgets(have, 10_000, 0.7)
    assert sum(b.values()) <= 25_000 and sum(b.values()) > 24_990  # the same total as τ = 0
    assert b["big"] / b["mid"] == pytest.approx(10 ** 0.7, rel=0.01) and b["small"] < 5_000
    flat = sample_budgets({"a": 50_000, "b": 2_000, "c": 50_000}, 10_000, 0.5)  # b has less than its share
    assert flat == {"a": 10_000, "b": 2_000, "c": 10_000}  # b takes all it has; a and c share the rest


def test_trained_tokenizer_round_trips_multilingual_text(tokenizer_dir, corpus):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert tok.get_vocab_size() <= 1000
    tok.encode_special_tokens = True  # as in the shards: a literal "[MASK]" in a document is text
    for text in corpus["text"].to_list():
        ids = tok.encode(text).ids
        assert ids[0] == tok.token_to_id("[CLS]") and ids[-1] == tok.token_to_id("[SEP]")
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    meta = json.loads((tokenizer_dir.parent / "meta.json").read_text())
    assert set(meta["fertility_tokens_per_100_chars"]["per_script"]) == {"Latn", "Cyrl", "Hani", "Arab"}
    assert meta["bytes_trained"] > 0 and meta["n_langs"] == len(WORDS)


def test_trained_tokenizer_loads_offline_with_autotokenizer_and_has_distinct_special_tokens(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert (tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token) == SPECIAL_TOKENS
    enc = tok("Paris is the [MASK] of France.")
    assert "token_type_ids" not in enc  # ModernBERT takes none
    assert enc["input_ids"][0] == tok.cls_token_id and enc["input_ids"][-1] == tok.sep_token_id
    assert enc["input_ids"].count(tok.mask_token_id) == 1
    # lstrip: the space before [MASK] belongs to the mask, as in ModernBERT
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "Paris is the of France."


def test_pretrained_tokenizer_is_adopted_from_file_or_folder(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    meta = load_pretrained_tokenizer(str(tokenizer_dir / "tokenizer.json"), tmp_path / "a", log=lambda *_: None)
    assert (tmp_path / "a" / "tokenizer.json").is_file()
    assert meta["special_token_ids"]["mask"] == AutoTokenizer.from_pretrained(str(tmp_path / "a")).mask_token_id
    meta2 = load_pretrained_tokenizer(str(tokenizer_dir), tmp_path / "b", log=lambda *_: None)
    assert meta2["special_token_ids"] == meta["special_token_ids"]


def test_pretrained_tokenizer_without_mask_or_delimiters_gets_them(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    bare = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}, unk_token="<unk>"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    bare.save(str(tmp_path / "bare.json"))
    meta = load_pretrained_tokenizer(str(tmp_path / "bare.json"), tmp_path / "out", log=lambda *_: None)
    assert set(meta["added_tokens"]) == {"[PAD]", "[MASK]"} and meta["installed_post_processor"]
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert tok.encode("a b").ids == [1, 3, 4, 2]


def test_pretrained_tokenizer_missing_or_invalid_path_names_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="nowhere/tokenizer.json"):
        load_pretrained_tokenizer(str(tmp_path / "nowhere" / "tokenizer.json"), tmp_path / "o")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        load_pretrained_tokenizer(str(tmp_path / "bad.json"), tmp_path / "o")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(TokenizerError, match="empty_folder"):
        load_pretrained_tokenizer(str(tmp_path / "empty_folder"), tmp_path / "o")


# ------------------------------------------------------------------------------------------ shards


def test_shards_decode_back_to_every_original_document(shards, corpus, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    reader = ShardReader(shards)
    docs = reader.documents()
    texts = dict(zip(corpus["doc_id"].to_list(), corpus["text"].to_list()))
    assert len(reader) == docs.height == corpus.height  # repeat_factor 1.0 everywhere: each doc exactly once
    assert sorted(docs["doc_id"].to_list()) == sorted(texts)
    assert docs["position"].to_list() == list(range(len(reader)))
    special = reader.special_token_ids
    for i, doc_id in enumerate(docs["doc_id"].to_list()):
        ids = reader.document(i)
        assert ids[0] == special["cls"] and ids[-1] == special["sep"]
        assert np.count_nonzero(np.isin(ids, [special["cls"], special["sep"]])) == 2  # literal "[CLS]" is text
        assert reader.decode_document(i, tok) == unicodedata.normalize("NFC", texts[doc_id]), doc_id
    assert reader.lengths.tolist() == docs["n_tokens"].to_list()
    assert reader.total_tokens == int(reader.lengths.sum())


def test_shards_folder_holds_datatrove_files_and_summaries(shards):
    info = json.loads((shards / "shards.json").read_text())
    assert info["token_size"] == 2 and info["dtype"] == "<u2"
    names = sorted(p.name for p in shards.iterdir())
    for f in info["files"]:
        assert f["name"] in names and f["index"] in names
        # datatrove names the tokenizer by its absolute path; the folder must not depend on the artifact root
        assert (shards / f"{f['name']}.metadata").read_text().startswith("tokenizer/tokenizer.json|2\n")
    assert str(shards.parent.parent) not in (shards / "shards.json").read_text()
    assert not [n for n in names if "log" in n or n.startswith(".")]  # no datatrove logging/scratch left
    per_lang = pl.read_parquet(shards / "tokens_per_language.parquet")
    assert per_lang.columns[:4] == ["lang", "docs", "tokens", "share"]
    assert per_lang["share"].sum() == pytest.approx(1.0)
    assert per_lang["tokens"].sum() == info["total_tokens"]
    assert not [p for p in shards.parent.iterdir() if ".tmp-scratch" in p.name]


def test_repeat_factors_repeat_drop_and_subsample_documents(tmp_path, corpus, tokenizer_dir):
    rf = {"eng_Latn": 3.0, "deu_Latn": 0.0, "rus_Cyrl": 0.5, "cmn_Hani": 0.5}
    big = make_corpus({"eng_Latn": 5, "deu_Latn": 5, "rus_Cyrl": 200, "cmn_Hani": 5, "arb_Arab": 5}, seed=2)
    # language ID decides the language: an "English-declared" doc identified as Russian counts as Russian;
    # a failed doc is dropped.
    lid = big.select("doc_id", "lang", pl.lit(0.9).alias("lid_score"),
                     (pl.col("doc_id") != "cmn_Hani-0000").alias("passed"))
    lid = lid.with_columns(pl.when(pl.col("doc_id") == "eng_Latn-0000").then(pl.lit("rus_Cyrl"))
                           .otherwise(pl.col("lang")).alias("lang"))
    files, lid_path = write_inputs(tmp_path / "in", big, lid)

    def run(seed, name):
        out = tmp_path / name
        out.mkdir()
        meta = build_shards(files, lid_path, mixture(rf), tokenizer_dir, out, seed=seed, log=lambda *_: None)
        return out, meta, pl.read_parquet(out / "documents.parquet")

    out, meta, docs = run(11, "a")
    counts = Counter(docs["doc_id"].to_list())
    assert all(counts[f"eng_Latn-{i:04d}"] == 3 for i in range(1, 5))
    assert counts["eng_Latn-0000"] in (0, 1)  # now Russian: 0.5
    assert not [d for d in counts if d.startswith(("deu_", "arb_"))]  # 0.0 and not in the mixture
    assert "cmn_Hani-0000" not in counts  # failed language ID
    rus = [d for d in counts if d.startswith("rus_")]
    assert all(counts[d] == 1 for d in rus) and 70 <= len(rus) <= 130
    assert sorted(docs.filter(pl.col("doc_id") == "eng_Latn-0001")["copy"].to_list()) == [0, 1, 2]
    assert set(docs["lang"].unique().to_list()) <= {"eng_Latn", "rus_Cyrl", "cmn_Hani"}
    assert docs.filter(pl.col("doc_id") == "eng_Latn-0000")["lang"].to_list() in ([], ["rus_Cyrl"])
    assert meta["docs"] == docs.height and meta["token_share"]["deu_Latn"] == 0.0

    # deterministic for a seed: identical bytes; another seed samples/orders differently
    out_b, _, docs_b = run(11, "b")
    for f in json.loads((out / "shards.json").read_text())["files"]:
        assert (out / f["name"]).read_bytes() == (out_b / f["name"]).read_bytes()
        assert (out / f["index"]).read_bytes() == (out_b / f["index"]).read_bytes()
    assert docs.equals(docs_b)
    _, _, docs_c = run(12, "c")
    assert not docs.equals(docs_c)


def test_small_max_tokens_per_file_splits_shards_in_order(tmp_path, corpus, tokenizer_dir, shards):
    files, lid = write_inputs(tmp_path / "in", corpus)
    out = tmp_path / "out"
    out.mkdir()
    build_shards(files, lid, mixture({lang: 1.0 for lang in WORDS}), tokenizer_dir, out, seed=7,
                 max_tokens_per_file=2000, log=lambda *_: None)
    info = json.loads((out / "shards.json").read_text())
    assert len(info["files"]) >= 3
    one, many = ShardReader(shards), ShardReader(out)
    # same seed, same documents, same order, whatever the file split
    assert one.documents()["doc_id"].equals(many.documents()["doc_id"])
    for a, b in zip(one, many, strict=True):
        assert np.array_equal(a, b)


def test_iter_from_resumes_at_document_k(shards):
    reader = ShardReader(shards)
    k = len(reader) // 3
    resumed = list(reader.iter_from(k))
    assert len(resumed) == len(reader) - k
    for j, doc in enumerate(resumed):
        assert np.array_equal(doc, reader.document(k + j))
    assert list(reader.iter_from(len(reader))) == []
    assert np.array_equal(next(iter(reader)), reader.document(0))


def test_truncated_shard_file_raises_error_naming_the_file(tmp_path, shards):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    name = json.loads((copy / "shards.json").read_text())["files"][0]["name"]
    with open(copy / name, "r+b") as f:
        f.truncate((copy / name).stat().st_size - 2)
    with pytest.raises(ShardError, match=name):
        ShardReader(copy)


def test_shard_with_wrong_token_size_raises_error_naming_the_file(tmp_path, shards):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    info = json.loads((copy / "shards.json").read_text())
    info["token_size"], info["dtype"] = 4, "<u4"
    (copy / "shards.json").write_text(json.dumps(info))
    with pytest.raises(ShardError, match=info["files"][0]["name"]):
        ShardReader(copy)
