"""Fine-tuning (mmbert_dagster/evaluate/finetune.py): tiny local data in each layout the loaders accept — a jsonl
folder with a language field, CoNLL files per language, a WikiANN-style saved dataset per language, the UDHR
stand-in — fine-tuned end to end on a tiny ModernBERT (4 layers x 32 hidden, a byte-level BPE like the project's),
scored per language, summarized over seeds in the suite's long table."""

from __future__ import annotations

import json
import math
import random
import re

import numpy as np
import polars as pl
import pytest
import torch

from mmbert_dagster.evaluate import finetune as F
from mmbert_dagster.evaluate.finetune import (
    FinetuneTask,
    FinetuneTaskError,
    align_labels,
    entity_f1,
    finetune_items,
    finetune_scores,
    finetune_table,
    load_task_data,
    read_conll,
    run_task,
    standin_data,
    standin_task,
    tokenize_words,
    word_predictions,
)
from mmbert_dagster.evaluate.suite import SCHEMA

from test_composer import hf_config, tokenizer_dir

QUIET = lambda *_: None  # noqa: E731

EN = "the cat sat on a mat dog ran far away house tree big small red blue green".split()
DE = "der die das hund lief weit haus baum gross klein rot blau gruen katze".split()
ENTITIES = {"PER": [["Anna"], ["Peter", "Smith"], ["Maria"]], "LOC": [["Paris"], ["New", "York"], ["Berlin"]],
            "ORG": [["Acme"], ["United", "Widgets"]]}
WIKIANN_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]  # WikiANN's ClassLabel order


def keyword_rows(words, n, rng, lang):
    """Label "yes" iff the sentence holds "alpha", "no" iff "beta" (one of the two at a random place)."""
    rows = []
    for i in range(n):
        kw = "alpha" if i % 2 == 0 else "beta"
        s = [rng.choice(words) for _ in range(rng.randint(4, 9))]
        s.insert(rng.randint(0, len(s)), kw)
        rows.append({"sentence": " ".join(s), "label": "yes" if kw == "alpha" else "no", "lang": lang})
    return rows


def ner_sentences(words, n, rng):
    """(words, BIO tags): filler words with one or two named entities."""
    out = []
    for _ in range(n):
        toks, tags = [], []
        for _ in range(rng.randint(1, 2)):
            toks += [rng.choice(words) for _ in range(rng.randint(1, 3))]
            tags += ["O"] * (len(toks) - len(tags))
            kind = rng.choice(sorted(ENTITIES))
            ent = rng.choice(ENTITIES[kind])
            toks += ent
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(ent) - 1)
        toks.append(rng.choice(words))
        tags.append("O")
        out.append((toks, tags))
    return out


def write_conll(path, sentences):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["-DOCSTART- -X- -X- O", ""]
    for toks, tags in sentences:
        lines += [f"{w} X {t}" for w, t in zip(toks, tags)] + [""]  # a middle column: the tag is the LAST one
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def save_wikiann(folder, lang, splits):
    import datasets

    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=WIKIANN_TAGS)),
                                  "langs": datasets.Sequence(datasets.Value("string"))})
    dd = datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {"tokens": [w for w, _ in rows], "ner_tags": [[WIKIANN_TAGS.index(t) for t in ts] for _, ts in rows],
             "langs": [[lang] * len(w) for w, _ in rows]}, features=features)
        for split, rows in splits.items()})
    dd.save_to_disk(str(folder / lang))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Every layout on disk, and a checkpoint (two inits) whose BPE was trained on all of it."""
    root = tmp_path_factory.mktemp("finetune")
    rng = random.Random(0)
    # (a) sequence classification: a jsonl folder, train / test splits, a language field, two languages
    kw = root / "keyword"
    kw.mkdir()
    train = keyword_rows(EN, 256, rng, "en")
    test = keyword_rows(EN, 40, rng, "en") + keyword_rows(DE, 40, rng, "de")
    for split, rows in (("train", train), ("test", test)):
        (kw / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # (b) CoNLL files per language
    conll = root / "conll"
    ner = {("en", "train"): ner_sentences(EN, 160, rng), ("en", "test"): ner_sentences(EN, 30, rng),
           ("de", "train"): ner_sentences(DE, 20, rng), ("de", "test"): ner_sentences(DE, 30, rng)}
    for (lang, split), rows in ner.items():
        write_conll(conll / lang / f"{split}.txt", rows)
    # (c) WikiANN-style saved datasets, one per language
    wikiann = root / "wikiann"
    for lang in ("en", "de"):
        save_wikiann(wikiann, lang, {"train": ner[lang, "train"], "validation": ner[lang, "test"][:5],
                                     "test": ner[lang, "test"]})
    texts = [r["sentence"] for r in train + test] + [" ".join(w) for rows in ner.values() for w, _ in rows]
    folders = {name: checkpoint(root, texts, name, seed) for name, seed in (("tiny_a", 0), ("tiny_b", 1))}
    return {"root": root, "keyword": kw, "conll": conll, "wikiann": wikiann, "ner": ner, "folders": folders}


def checkpoint(root, texts, name, seed):
    """A random ModernBERT (test_composer's shape) with a byte-level BPE as the project trains one."""
    from tokenizers import Tokenizer
    from transformers import ModernBertForMaskedLM

    from mmbert_dagster.data.tokenizer import special_token_ids, train_tokenizer
    from mmbert_dagster.recipe import TokenizerConfig

    tok = root / f"tok_{name}"
    train_tokenizer([("x", t) for t in texts], tok, TokenizerConfig(vocab_size=400, min_frequency=1), log=QUIET)
    ids = special_token_ids(tok)
    cfg = hf_config()
    cfg.vocab_size = Tokenizer.from_file(str(tok / "tokenizer.json")).get_vocab_size()
    cfg.pad_token_id, cfg.cls_token_id, cfg.sep_token_id = ids["pad"], ids["cls"], ids["sep"]
    cfg.bos_token_id, cfg.eos_token_id = ids["cls"], ids["sep"]
    torch.manual_seed(seed)
    folder = root / name
    ModernBertForMaskedLM(cfg).save_pretrained(str(folder))
    for f in tok.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def keyword_task(data, **kw):
    return FinetuneTask(**{"name": "keyword", "dataset": str(data["keyword"]), "language_field": "lang",
                           "label_field": "label", "text_fields": ("sentence",), "train_languages": ("en",),
                           "lr": 2e-3, "epochs": 4, "batch_size": 16, "seeds": (1,), **kw})


def conll_task(data, **kw):
    return FinetuneTask(**{"name": "ner_conll", "kind": "token", "dataset": str(data["conll"]),
                           "text_fields": ("tokens",), "label_field": "ner_tags", "train_languages": ("en",),
                           "lr": 3e-3, "epochs": 6, "batch_size": 16, "seeds": (1, 2), **kw})


# ------------------------------------------------------------------------------------------- the task table

def test_a_task_table_is_validated_and_errors_name_the_key():
    t = FinetuneTask.from_table({"name": "xnli", "dataset": "facebook/xnli", "config": "{lang}",
                                 "text_fields": ["premise", "hypothesis"], "train_languages": ["en"],
                                 "test_languages": ["en", "de"], "seeds": [1, 2],
                                 "language_codes": {"en": "eng_Latn", "de": "deu_Latn"}}, "eval.finetune[0]")
    assert t.text_fields == ("premise", "hypothesis") and t.seeds == (1, 2) and t.lr == 2e-5 and t.epochs == 3
    assert t.table_lang("de") == "deu_Latn" and t.table_lang("fr") == "fr" and t.metric == "accuracy"
    ner = FinetuneTask.from_table({"name": "wikiann", "kind": "token", "dataset": "unimelb-nlp/wikiann",
                                   "config": "{lang}", "train_languages": ["en"]}, "w")
    assert (ner.text_fields, ner.label_field, ner.metric) == (("tokens",), "ner_tags", "f1")
    standin = FinetuneTask.from_table({"seeds": [7]}, "eval.finetune[1]")  # dataset "" = the stand-in's defaults
    assert standin == standin_task(seeds=(7,)) and standin.name == "udhr_article_standin"

    where = "recipe.toml: eval.finetune[2]"
    base = {"name": "sst2", "dataset": "nyu-mll/glue", "config": "sst2", "train_languages": ["eng_Latn"]}
    bad = [({"lrate": 1e-5}, r"unknown key\(s\) \['lrate'\]"),
           ({"kind": "span"}, r"\.kind: must be one of \['sequence', 'token'\]"),
           ({"seeds": []}, r"\.seeds: must be a list of at least one integer"),
           ({"seeds": 3}, r"\.seeds: must be a list"),
           ({"seeds": [1, 1]}, r"\.seeds: must not repeat"),
           ({"seeds": [1.5]}, r"\.seeds: must be a list of at least one integer"),
           ({"lr": -1.0}, r"\.lr: must be > 0"),
           ({"epochs": "3"}, r"\.epochs: must be a number"),
           ({"batch_size": 0}, r"\.batch_size: must be a positive integer"),
           ({"max_length": True}, r"\.max_length: must be a positive integer"),
           ({"warmup_ratio": 1.0}, r"\.warmup_ratio: must be in \[0, 1\)"),
           ({"text_fields": "sentence"}, r"\.text_fields: must be a list"),
           ({"text_fields": ["a", "b", "c"]}, r"\.text_fields: a sequence task takes one text field or a pair"),
           ({"add_prefix_space": "yes"}, r"\.add_prefix_space: must be true or false"),
           ({"language_codes": ["en"]}, r"\.language_codes: must be a table"),
           ({"config": "{lang}", "language_field": "lang"}, r"\.language_field: either a language field or"),
           ({"kind": "token", "text_fields": ["a", "b"]}, r"\.text_fields: a token task takes one field")]
    for change, message in bad:
        with pytest.raises(FinetuneTaskError, match=rf"^{re.escape(where)}.*{message}"):
            FinetuneTask.from_table({**base, **change}, where)
    with pytest.raises(FinetuneTaskError, match=rf"^{re.escape(where)}\.name: missing"):
        FinetuneTask.from_table({"dataset": "nyu-mll/glue"}, where)
    with pytest.raises(FinetuneTaskError, match=rf"^{re.escape(where)}\.kind: the offline stand-in"):
        FinetuneTask.from_table({"kind": "token"}, where)
    with pytest.raises(FinetuneTaskError, match=r"finetune task 'x'\.seeds"):  # direct construction too
        FinetuneTask(name="x", dataset="d", seeds=())


# ------------------------------------------------------------------------------------- alignment and metric

def test_first_sub_token_alignment_gives_the_word_labels_back_exactly(data):
    folder = data["folders"]["tiny_a"]
    tok = F.Tokenizer.from_folder(folder)
    sentences = [w for w, _ in data["ner"]["en", "test"]] + [["Peter", "Smithsonian", "unbelievably", "x"]]
    for words, (ids, wids) in zip(sentences, tok.encode_words(sentences, 128, True)):
        assert ids[0] == tok.cls and ids[-1] == tok.sep and wids[0] is None and wids[-1] is None
        labels = list(range(1, len(words) + 1))
        aligned = align_labels(wids, labels)
        assert sum(a != F.IGNORE for a in aligned) == len(words)  # exactly one labelled token per word ...
        first = [i for i, w in enumerate(wids) if w is not None and (i == 0 or wids[i - 1] != w)]
        assert [aligned[i] for i in first] == labels  # ... its first sub-token
        assert word_predictions(wids, aligned, len(words), outside=0) == labels
    [(ids, wids)] = tok.encode_words([["Smithsonian", "unbelievably"]], 128, True)
    assert len(ids) - 2 > 2 and align_labels(wids, [5, 6]).count(F.IGNORE) > 2  # the words really were split
    # words cut by max_length are predicted "outside"
    ids, wids = tok.encode_words([["Peter", "Smithsonian", "unbelievably", "x"]], 6, True)[0]
    assert len(ids) <= 6 and word_predictions(wids, align_labels(wids, [1, 2, 3, 4]), 4, outside=9)[-1] == 9


def test_seqeval_f1_is_over_entities_not_tokens():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "O"]]
    assert entity_f1(gold, gold) == 1.0
    # 6 of 7 tags right, but the cut PER entity is wrong as a whole: 2 of 3 entities found, 2 of 4 predicted
    pred = [["B-PER", "O", "O", "B-LOC"], ["O", "B-ORG", "B-LOC"]]
    assert entity_f1(gold, pred) == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    assert entity_f1(gold, [["O"] * 4, ["O"] * 3]) == 0.0


def test_the_prefix_space_setting_changes_how_words_are_tokenized(data, tmp_path):
    words = ["Peter", "Smith", "lives", "in", "Paris"]
    spaced = tokenize_words(data["folders"]["tiny_a"], words, add_prefix_space=True)
    bare = tokenize_words(data["folders"]["tiny_a"], words, add_prefix_space=False)
    assert spaced != bare
    assert sum(t.startswith("Ġ") for t in spaced) == len(words) and "ĠParis" in spaced  # one per word's start
    assert not any(t.startswith("Ġ") for t in bare) and spaced[0] == bare[0] == "[CLS]"
    # a tokenizer without a pre-tokenizer (test_composer's word-level one) knows only the bare words
    wl = tokenizer_dir(tmp_path)
    (wl / "config.json").write_text(json.dumps({"cls_token_id": 2, "sep_token_id": 1, "pad_token_id": 0}))
    assert tokenize_words(wl, ["w5", "w6"], add_prefix_space=False) == ["<bos>", "w5", "w6", "<eos>"]
    assert tokenize_words(wl, ["w5", "w6"], add_prefix_space=True) == ["<bos>", "<unk>", "<unk>", "<eos>"]


def test_a_pair_is_encoded_as_cls_a_sep_b_sep_cut_longest_first(data):
    tok = F.Tokenizer.from_folder(data["folders"]["tiny_a"])
    long, short = " ".join(EN * 3), "alpha beta"
    [ids] = tok.encode_texts([(long, short)], 16)
    b = tok.backend.encode(short, add_special_tokens=False).ids
    assert len(ids) == 16 and ids[0] == tok.cls and ids[-1] == tok.sep and ids.count(tok.sep) == 2
    assert ids[-len(b) - 1:-1] == b  # the short part survives whole
    [single] = tok.encode_texts([(long,)], 10)
    assert len(single) == 10 and single[0] == tok.cls and single[-1] == tok.sep


# --------------------------------------------------------------------------------------------------- loaders

def test_each_layout_loads_into_the_same_shape(data):
    seq = load_task_data(keyword_task(data))
    assert seq.labels == ("no", "yes") and len(seq.train) == 256 and sorted(seq.test) == ["de", "en"]
    assert all(len(ex.inputs) == 1 and ex.label in (0, 1) for ex in seq.train)
    assert load_task_data(keyword_task(data), test_languages=["de"]).test.keys() == {"de"}

    conll = load_task_data(conll_task(data))
    assert set(conll.labels) == {"O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"}
    assert sorted(conll.test) == ["de", "en"] and len(conll.train) == 160  # en only: train_languages
    words, tags = data["ner"]["en", "test"][0]
    ex = conll.test["en"][0]
    assert ex.inputs == tuple(words) and [conll.labels[t] for t in ex.label] == tags
    assert read_conll(data["conll"] / "en" / "train.txt")[0] == data["ner"]["en", "train"][0]  # DOCSTART skipped

    wiki = load_task_data(FinetuneTask(name="wikiann", kind="token", dataset=str(data["wikiann"] / "{lang}"),
                                       text_fields=("tokens",), label_field="ner_tags",
                                       train_languages=("en",), test_languages=("en", "de")))
    assert wiki.labels == tuple(WIKIANN_TAGS) and sorted(wiki.test) == ["de", "en"]  # ClassLabel names, in order
    assert [wiki.labels[t] for t in wiki.test["en"][0].label] == tags

    with pytest.raises(FinetuneTaskError, match=r"has no field\(s\) \['text'\]"):
        load_task_data(keyword_task(data, text_fields=("text",)))


def test_an_xnli_style_pair_task_with_int_labels_loads_from_csv_files(tmp_path):
    import csv

    for split in ("train", "test"):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["premise", "hypothesis", "label", "language"])
            for i in range(12):
                w.writerow([f"the cat sat {i}", "alpha" if i % 3 else "beta", i % 3, ("en", "fr")[i % 2]])
    task = FinetuneTask(name="xnli_local", dataset=str(tmp_path), text_fields=("premise", "hypothesis"),
                        language_field="language", train_languages=("en",))
    d = load_task_data(task)
    assert d.labels == ("0", "1", "2") and len(d.train) == 6 and sorted(d.test) == ["en", "fr"]
    assert d.train[0] == F.Example(("the cat sat 0", "beta"), 0)


def test_an_unreachable_hub_dataset_is_skipped_with_a_note(data):
    notes = []
    task = FinetuneTask(name="sst2", dataset="nyu-mll/glue", config="sst2", test_split="validation",
                        train_languages=("eng_Latn",))
    items = finetune_items([task], {"tiny_a": data["folders"]["tiny_a"]}, {}, log=QUIET, notes=notes)
    assert items.height == 0 and len(notes) == 1 and notes[0].startswith("sst2: skipped — could not load")
    assert finetune_table(items).schema == pl.Schema(SCHEMA)


# ------------------------------------------------------------------------------------------- end to end

def test_a_keyword_task_is_learned_and_an_untrained_one_is_not(data):
    """The label is a keyword: fine-tuning must get the training language near 100 % (chance 50 %); the same run
    at a learning rate too small to move the weights stays near chance — the check can fail."""
    folder = data["folders"]["tiny_a"]
    scores = run_task(keyword_task(data), folder, seed=1, log=QUIET)
    assert set(scores) == {"en", "de"} and scores["en"] >= 0.9
    untrained = run_task(keyword_task(data, lr=1e-9), folder, seed=1, log=QUIET)
    assert untrained["en"] <= 0.7


def test_token_tasks_score_entity_f1_over_seeds_in_the_suite_schema(data):
    lines = []
    tasks = [conll_task(data, language_codes=(("en", "eng_Latn"), ("de", "deu_Latn"))),
             FinetuneTask(name="wikiann", kind="token", dataset=str(data["wikiann"] / "{lang}"),
                          text_fields=("tokens",), label_field="ner_tags", train_languages=("en",),
                          test_languages=("en", "de"), lr=3e-3, epochs=6, batch_size=16, seeds=(3,))]
    items = finetune_items(tasks, data["folders"], {"deu_Latn": "high"}, english="eng_Latn", log=lines.append)
    table = finetune_table(items)
    assert table.schema == pl.Schema(SCHEMA)
    assert set(items["model"]) == {"tiny_a", "tiny_b"} and set(items["metric"]) == {"f1"}
    conll = items.filter(pl.col("task") == "ner_conll")
    assert set(conll["lang"]) == {"eng_Latn", "deu_Latn"} and sorted(set(conll["seed"])) == [1, 2]
    assert dict(conll.select("lang", "tier").unique().iter_rows()) == {"eng_Latn": "english", "deu_Latn": "high"}
    # entity F1 on the training language: learned (entities are fixed words), above what no entity gives (0)
    assert conll.filter(pl.col("lang") == "eng_Latn")["value"].mean() > 0.5
    # mean and sd over the seeds, per (model, task, lang)
    for (model, lang), part in conll.group_by("model", "lang"):
        got = dict(table.filter((pl.col("model") == model) & (pl.col("task") == "ner_conll")
                                & (pl.col("lang") == lang)).select("metric", "value").iter_rows())
        assert got["f1_mean"] == pytest.approx(part["value"].mean())
        assert got["f1_sd"] == pytest.approx(np.std(part["value"].to_numpy(), ddof=1))
    one_seed = table.filter((pl.col("task") == "wikiann") & (pl.col("metric") == "f1_sd"))
    assert one_seed.height and all(math.isnan(v) for v in one_seed["value"])  # one seed: no sd
    summary = table.filter((pl.col("lang") == "*") & (pl.col("task") == "ner_conll") & (pl.col("model") == "tiny_a"))
    assert set(summary["tier"]) == {"english", "high", "all"}
    per_seed_all = conll.filter(pl.col("model") == "tiny_a").group_by("seed").agg(pl.col("value").mean())["value"]
    got = dict(summary.filter(pl.col("tier") == "all").select("metric", "value").iter_rows())
    assert got["f1_mean"] == pytest.approx(per_seed_all.mean())
    assert got["f1_sd"] == pytest.approx(np.std(per_seed_all.to_numpy(), ddof=1))  # sd of the tier mean over seeds
    runs = [line for line in lines if " / seed " in line]  # one line per model x task x seed, with seconds
    assert len(runs) == 2 * (2 + 1)
    assert all(re.search(r"/ seed \d: \d+ training examples, \d+ steps .*; f1 [\d.]+ over 2 language\(s\); "
                         r"[\d.]+s", line) for line in runs)


# ------------------------------------------------------------------------------------------- the stand-in

@pytest.fixture(scope="module")
def heldout():
    from mmbert_dagster.data.sources import embedded_heldout

    return pl.read_parquet(embedded_heldout())


def test_the_standin_builds_six_article_classes_from_english_pieces(heldout):
    task = standin_task()
    d = standin_data(task, heldout, ["eng_Latn", "fra_Latn", "cmn_Hans", "zzz_Zzzz"])
    assert d.labels == tuple(f"article_{a}" for a in range(25, 31)) and len(set(ex.label for ex in d.train)) == 6
    english = heldout.filter(pl.col("declared_lang") == "eng_Latn").sort("article")
    pieces = [p for text in english["text"] for p in F.sentence_pieces(text)]
    assert [ex.inputs[0] for ex in d.train] == pieces and len(pieces) >= 30  # every English piece, no other
    assert not any(p.startswith("Article") for p in pieces)  # the title line (the article number) is dropped
    assert sorted(d.test) == ["cmn_Hans", "fra_Latn"]  # no English in the test languages; unknown ones noted
    assert "zzz_Zzzz" in " ".join(d.notes) and all(len(v) >= 6 for v in d.test.values())
    assert all(len(p) <= 2 * F.STANDIN_PIECE_CHARS for ex in d.test["cmn_Hans"] for p in ex.inputs)  # no spaces


def test_the_standin_runs_through_finetune_scores_on_the_callers_languages(data, heldout):
    tiers = {"eng_Latn": "english", "fra_Latn": "high", "deu_Latn": "high", "swh_Latn": "low"}
    lines = []
    table = finetune_scores([standin_task(seeds=(1,), max_test=12)], {"tiny_a": data["folders"]["tiny_a"]}, tiers,
                            heldout=heldout, log=lines.append)
    assert table.schema == pl.Schema(SCHEMA) and set(table["task"]) == {"udhr_article_standin"}
    per_lang = table.filter(pl.col("lang") != "*")
    assert set(per_lang["lang"]) == {"fra_Latn", "deu_Latn", "swh_Latn"}  # tested zero-shot, English is not
    assert set(per_lang["metric"]) == {"accuracy_mean", "accuracy_sd"}
    means = per_lang.filter(pl.col("metric") == "accuracy_mean")["value"]
    assert ((means >= 0) & (means <= 1)).all()
    assert set(table.filter(pl.col("lang") == "*")["tier"]) == {"high", "low", "all"}
    assert any(line.startswith("finetune udhr_article_standin / tiny_a / seed 1: ") for line in lines)
