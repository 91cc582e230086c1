"""MTEB through sentence-transformers (mmbert_dagster/evaluate/embeddings.py), offline: the wrapper is exactly mean
pooling of the checkpoint's last hidden state (SDPA even when config.json names our packed attention), and mteb
tasks run end to end from local files — a BEIR folder (a task mteb does not know, or a known one's data), a local
copy of a task's Hugging Face dataset, the datasets cache an online run leaves — or are skipped with the reason."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch

from mmbert_dagster.evaluate.embeddings import (
    RESULTS_DIR,
    is_beir_folder,
    local_retrieval_task,
    run_mteb,
    sentence_model,
)
from mmbert_dagster.evaluate.suite import SCHEMA
from mmbert_dagster.recipe import ModelShape, TokenizerConfig
from mmbert_dagster.train.attention import ATTN_NAME

QUIET = lambda *_: None  # noqa: E731

# Latin and Cyrillic (UDHR articles 25-26): the texts to embed, the documents and the queries
TEXTS = {
    "eng_Latn": ["Everyone has the right to a standard of living adequate for the health and well-being of himself.",
                 "Motherhood and childhood are entitled to special care and assistance.",
                 "Everyone has the right to education.",
                 "Education shall be free, at least in the elementary and fundamental stages."],
    "rus_Cyrl": ["Каждый человек имеет право на такой жизненный уровень, который необходим для поддержания здоровья.",
                 "Материнство и младенчество дают право на особое попечение и помощь.",
                 "Каждый человек имеет право на образование.",
                 "Образование должно быть бесплатным по меньшей мере в том, что касается начального образования."],
}
SHAPE = ModelShape(layers=3, hidden=32, intermediate=48, heads=2, global_every=3, local_window=8)  # 1 global, 2 local


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint folder as our training writes it (byte-level BPE, ``write_hf_folder``), whose config.json also
    names our packed attention — as a config saved by another transformers version may."""
    from mmbert_dagster.data.tokenizer import special_token_ids, train_tokenizer
    from mmbert_dagster.train.export import write_hf_folder
    from mmbert_dagster.train.model import build_model

    root = tmp_path_factory.mktemp("ckpt")
    pairs = [(lang, t) for lang, texts in TEXTS.items() for t in texts] * 5
    meta = train_tokenizer(pairs, root / "tok", TokenizerConfig(vocab_size=400, min_frequency=1), log=QUIET)
    torch.manual_seed(0)
    model = build_model(SHAPE, meta["vocab_size"], special_token_ids(root / "tok"), 512, 10000.0)
    with torch.no_grad():  # non-trivial norms: mean pooling over the wrong tokens cannot go unnoticed
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert model.config._attn_implementation == ATTN_NAME
    folder = root / "model"
    write_hf_folder(model, root / "tok", folder)
    config = json.loads((folder / "config.json").read_text())
    config["_attn_implementation"] = ATTN_NAME
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def st_model(checkpoint):
    return sentence_model(checkpoint)


def write_beir(folder, docs: list[str], queries: list[str], pairs: list[tuple[int, int]], split: str = "test"):
    """corpus.jsonl / queries.jsonl / qrels/<split>.tsv (BEIR) — query i relevant to document j for (i, j)."""
    (folder / "qrels").mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}, ensure_ascii=False) + "\n")
    with (folder / "queries.jsonl").open("w", encoding="utf-8") as f:
        for i, text in enumerate(queries):
            f.write(json.dumps({"_id": f"q{i}", "text": text}, ensure_ascii=False) + "\n")
    (folder / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{j}\t1\n" for i, j in pairs))
    return folder


def write_hf_copy(folder, docs: list[str], queries: list[str]):
    """A local copy of a Hugging Face retrieval dataset repository as mteb's loader reads it: README ``configs``
    default (qrels) / corpus / queries."""
    (folder / "qrels").mkdir(parents=True)
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: default\n  data_files:\n  - split: test\n    path: qrels/test.jsonl\n"
        "- config_name: corpus\n  data_files:\n  - split: corpus\n    path: corpus.jsonl\n"
        "- config_name: queries\n  data_files:\n  - split: queries\n    path: queries.jsonl\n---\n")
    rows = {"corpus.jsonl": [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(docs)],
            "queries.jsonl": [{"_id": f"q{i}", "text": t} for i, t in enumerate(queries)],
            "qrels/test.jsonl": [{"query-id": f"q{i}", "corpus-id": f"d{i}", "score": 1} for i in range(len(docs))]}
    for name, items in rows.items():
        (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items), encoding="utf-8")
    return folder


ALL = TEXTS["eng_Latn"] + TEXTS["rus_Cyrl"]


# ---------------------------------------------------------------------------------------------------------------

def test_the_wrapper_is_mean_pooling_of_the_last_hidden_state_over_non_padding_tokens(checkpoint, st_model):
    from transformers import AutoTokenizer, ModernBertForMaskedLM

    assert st_model[0].model.config._attn_implementation == "sdpa"  # not the config's ATTN_NAME
    texts = [TEXTS["eng_Latn"][0], TEXTS["rus_Cyrl"][2], TEXTS["eng_Latn"][2], TEXTS["rus_Cyrl"][0]]
    got = st_model.encode(texts, batch_size=4, convert_to_numpy=True)

    tok = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    batch = tok(texts, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    lengths = mask.sum(1)
    assert lengths.min() < lengths.max() and lengths.max() > 2 * SHAPE.local_window  # padding; local layers matter
    assert (batch["input_ids"][:, 0] == tok.cls_token_id).all()
    ref = ModernBertForMaskedLM.from_pretrained(str(checkpoint), attn_implementation="sdpa", dtype=torch.float32,
                                                local_files_only=True).eval()
    with torch.no_grad():
        hidden = ref.model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
    want = ((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy()

    assert got.shape == (4, SHAPE.hidden)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # the comparison tells poolings apart: over all positions (padding included), or the [CLS] vector, differ
    assert not np.allclose(got, hidden.mean(1).numpy(), atol=1e-3)
    assert not np.allclose(got, hidden[:, 0].numpy(), atol=1e-3)
    # one text alone (no padding) gets the same vector as in the padded batch
    np.testing.assert_allclose(st_model.encode(texts[1:2], convert_to_numpy=True)[0], got[1], atol=1e-5, rtol=0)


def test_a_local_beir_task_runs_end_to_end_and_identical_texts_retrieve_perfectly(tmp_path, checkpoint,
                                                                                   monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    cache = tmp_path / "cache"
    write_beir(cache / "tasks" / "TinyRetrieval", ALL, ALL, [(i, i) for i in range(len(ALL))])
    # the control: the same texts, each query's relevant document another one -> far from perfect
    shifted = write_beir(tmp_path / "shifted", ALL, ALL, [(i, (i + 1) % len(ALL)) for i in range(len(ALL))])
    assert is_beir_folder(cache / "tasks" / "TinyRetrieval") and not is_beir_folder(cache)

    logged = []
    table, notes = run_mteb(["TinyRetrieval", local_retrieval_task("Shifted", shifted)], checkpoint,
                            cache_dir=cache, name="tiny", log=logged.append)

    assert notes == []
    assert table.schema == pl.Schema(SCHEMA)
    assert table.height == 2 and set(table["model"]) == {"tiny"} and set(table["metric"]) == {"ndcg_at_10"}
    values = dict(zip(table["task"], table["value"]))
    assert all(0.0 <= v <= 1.0 for v in values.values())
    assert values["TinyRetrieval"] == pytest.approx(1.0, abs=1e-6)
    assert values["Shifted"] < 0.7
    row = table.filter(pl.col("task") == "TinyRetrieval").row(0, named=True)
    assert (row["lang"], row["tier"]) == ("eng-Latn", "english")
    assert any("TinyRetrieval: ndcg_at_10 1.0000" in line for line in logged)
    # mteb's results: under the cache folder, per model name and weights digest; nothing in ~ or the cwd
    saved = list((cache / RESULTS_DIR).rglob("TinyRetrieval.json"))
    assert len(saved) == 1 and "mmbert-dagster__tiny" in str(saved[0])
    assert json.loads(saved[0].read_text())["scores"]["test"][0]["ndcg_at_10"] == pytest.approx(1.0)
    assert list(cwd.iterdir()) == [] and list(home.iterdir()) == []


def test_multilingual_local_task_rows_carry_subset_tier_and_the_language_filter(tmp_path, checkpoint, st_model):
    root = tmp_path / "tasks" / "TinyMulti"
    for lang, texts in TEXTS.items():
        write_beir(root / lang, texts, texts, [(i, i) for i in range(len(texts))])
    task = local_retrieval_task("TinyMulti", root)
    assert sorted(task.hf_subsets) == ["eng_Latn", "rus_Cyrl"]
    assert task.metadata.eval_langs == {"eng_Latn": ["eng-Latn"], "rus_Cyrl": ["rus-Cyrl"]}

    table, notes = run_mteb(["TinyMulti"], checkpoint, cache_dir=tmp_path, tiers={"rus_Cyrl": "high"}, log=QUIET,
                            model=st_model)
    assert notes == []
    assert sorted(table.select("lang", "tier").rows()) == [("eng_Latn", "english"), ("rus_Cyrl", "high")]
    assert table["value"].to_list() == pytest.approx([1.0, 1.0])

    only, _ = run_mteb(["TinyMulti"], checkpoint, cache_dir=tmp_path, languages=["rus_Cyrl"], log=QUIET,
                       model=st_model)
    assert only["lang"].to_list() == ["rus_Cyrl"] and only["tier"].to_list() == ["unseen"]  # no tiers given


def test_an_mteb_task_reads_a_local_copy_of_its_dataset_or_beir_files(tmp_path, checkpoint, st_model):
    data = tmp_path / "data"
    write_hf_copy(data / "SciFact", ALL, ALL)  # the registry's SciFact (mteb/scifact) from a local copy
    write_beir(data / "NFCorpus", ALL, ALL, [(i, i) for i in range(len(ALL))])  # another, from BEIR files
    logged = []
    table, notes = run_mteb(["SciFact", "NFCorpus"], checkpoint, cache_dir=tmp_path / "cache", data_dir=data,
                            log=logged.append, model=st_model)
    assert notes == []
    assert sorted(table.select("task", "lang", "metric").rows()) == [("NFCorpus", "eng-Latn", "ndcg_at_10"),
                                                                     ("SciFact", "eng-Latn", "ndcg_at_10")]
    assert table["value"].to_list() == pytest.approx([1.0, 1.0])
    assert any(f"local copy of its Hugging Face dataset in {data / 'SciFact'}" in line for line in logged)
    # datasets' Arrow cache of the copy went under the cache folder
    assert list((tmp_path / "cache" / "hf" / "datasets").glob("sci_fact/*/*/*/*.arrow"))

    # reuse: the same weights' results come from mteb's result cache — offline, without the data
    shutil.rmtree(data / "SciFact")
    again, notes = run_mteb(["SciFact"], checkpoint, cache_dir=tmp_path / "cache", data_dir=data, log=QUIET,
                            model=st_model, reuse=True)
    assert notes == [] and again.equals(table.filter(pl.col("task") == "SciFact"))
    _, notes = run_mteb(["SciFact"], checkpoint, cache_dir=tmp_path / "cache", data_dir=data, log=QUIET,
                        model=st_model)
    assert len(notes) == 1 and "could not load its data" in notes[0]


def test_offline_the_datasets_cache_of_an_online_run_is_used(tmp_path, checkpoint, st_model):
    """What ``load_dataset("mteb/scifact", config)`` online leaves in the datasets cache
    (``<cache>/mteb___scifact/<config>/0.0.0/<hash>/scifact-<split>.arrow``), made here from a local copy."""
    from datasets import load_dataset

    copy = write_hf_copy(tmp_path / "scifact", ALL, ALL)
    datasets_cache = tmp_path / "cache" / "hf" / "datasets"
    for config in ("default", "corpus", "queries"):
        load_dataset(str(copy), config, cache_dir=str(datasets_cache))
    (datasets_cache / "scifact").rename(datasets_cache / "mteb___scifact")
    shutil.rmtree(copy)

    table, notes = run_mteb(["SciFact"], checkpoint, cache_dir=tmp_path / "cache", log=QUIET, model=st_model)
    assert notes == []
    assert table.select("task", "lang", "metric").rows() == [("SciFact", "eng-Latn", "ndcg_at_10")]
    assert table["value"][0] == pytest.approx(1.0)


def test_tasks_that_cannot_run_are_skipped_with_the_reason(tmp_path, checkpoint):
    broken = write_beir(tmp_path / "tasks" / "Broken", ALL[:2], ALL[:2], [(0, 0), (1, 7)])  # d7 does not exist
    assert is_beir_folder(broken)
    table, notes = run_mteb(["SciFact", "NoSuchTask", "Broken"], checkpoint, cache_dir=tmp_path, log=QUIET)
    assert table.is_empty() and table.schema == pl.Schema(SCHEMA)
    assert [n.split(":")[0] for n in notes] == ["SciFact", "NoSuchTask", "Broken"]
    offline, unknown, bad = notes
    assert "could not load its data" in offline and "Couldn't reach 'mteb/scifact'" in offline
    assert str(tmp_path / "tasks" / "SciFact") in offline  # where a local copy would be read from
    assert "not an mteb task" in unknown
    assert "could not load its data" in bad and "'d7'" in bad and "not in corpus.jsonl" in bad

    table, notes = run_mteb(["SciFact"], checkpoint, cache_dir=tmp_path, languages=["rus_Cyrl"], log=QUIET)
    assert table.is_empty() and len(notes) == 1 and "no subset in the requested languages" in notes[0]
