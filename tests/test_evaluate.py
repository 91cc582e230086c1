"""Benchmarks (mmbert_dagster.evaluate) on known tiny cases, the report's answers, online tasks, the schedule."""

from __future__ import annotations

import datetime as dt
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import polars as pl
import pytest
import torch

from model_helpers import SHAPE, SPECIALS, VOCAB, random_doc, reference_copy
from mmbert_dagster.evaluate.metrics import (
    mask_for_eval, masked_token_accuracy, masked_token_cross_entropy, probe_accuracy, retrieval_accuracy,
)
from mmbert_dagster.evaluate.encode import Encoder
from mmbert_dagster.evaluate.report import build_report
from mmbert_dagster.evaluate.suite import eval_set, strip_header
from mmbert_dagster.recipe import HfTask
from mmbert_dagster.train.model import build_model
from mmbert_dagster.train.packing import IGNORE


# ----------------------------------------------------------------------------------------------- metrics


def test_eval_masking_hides_the_rate_of_ordinary_tokens_only_and_is_reproducible():
    ids = np.array([2] + list(range(10, 110)) + [3])
    masked, labels = mask_for_eval(ids, 0.15, mask_id=4, never=SPECIALS.values(),
                                   generator=torch.Generator().manual_seed(0))
    asked = labels != IGNORE
    assert asked.sum() == 15  # round(0.15 x 100 maskable)
    assert (masked[asked] == 4).all() and (labels[asked] == ids[asked]).all()
    assert not asked[0] and not asked[-1]  # [CLS] / [SEP] never
    again, _ = mask_for_eval(ids, 0.15, mask_id=4, never=SPECIALS.values(), generator=torch.Generator().manual_seed(0))
    assert (again == masked).all()
    _, short = mask_for_eval(np.array([2, 50, 3]), 0.15, 4, SPECIALS.values(), torch.Generator().manual_seed(0))
    assert (short != IGNORE).sum() == 1  # at least one token is asked


def test_masked_token_cross_entropy_is_the_mean_over_every_masked_token():
    results = [(np.array([1, 2]), np.array([1, 3]), np.array([0.5, 1.5])), (np.array([4]), np.array([4]), np.array([4.0]))]
    assert masked_token_cross_entropy(results) == pytest.approx(2.0)  # (0.5 + 1.5 + 4) / 3, not the mean of means
    assert np.isnan(masked_token_cross_entropy([]))


def test_masked_token_accuracy_counts_exact_guesses():
    acc, n = masked_token_accuracy([(np.array([5, 6, 7]), np.array([5, 0, 7])), (np.array([9]), np.array([9]))])
    assert (acc, n) == (0.75, 4)
    assert np.isnan(masked_token_accuracy([])[0])


def test_retrieval_accuracy_finds_the_aligned_target():
    targets = np.eye(4)
    keys = [25, 26, 27, 28]
    assert retrieval_accuracy(targets + 0.1, keys, targets, keys) == 1.0
    assert retrieval_accuracy(targets[[1, 0, 2, 3]], keys, targets, keys) == 0.5  # two swapped
    assert retrieval_accuracy(targets[:1], [99], targets, keys) != retrieval_accuracy(targets[:1], [99], targets, keys)


def test_probe_learns_separable_classes_and_transfers():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 5
    x = np.concatenate([c + rng.normal(size=(20, 16)) for c in centers])
    y = np.repeat([0, 1, 2], 20)
    test_x = np.concatenate([c + rng.normal(size=(5, 16)) for c in centers])
    scores = probe_accuracy(x, y, {"same": (test_x, np.repeat([0, 1, 2], 5)),
                                   "shuffled": (test_x, np.repeat([1, 2, 0], 5))})
    assert scores["same"] == 1.0 and scores["shuffled"] == 0.0


def test_header_lines_carrying_the_article_number_are_dropped():
    assert strip_header("Article 25\nEveryone has the right.") == "Everyone has the right."
    assert strip_header("One long paragraph without a title line.") == "One long paragraph without a title line."


def test_eval_set_takes_english_and_a_capped_seeded_sample_per_tier():
    langs = ["eng_Latn"] + [f"h{i:02d}_Latn" for i in range(5)] + [f"l{i:02d}_Latn" for i in range(9)] + ["zzz_Latn"]
    heldout = pl.DataFrame({"declared_lang": [lang for lang in langs for _ in range(2)],
                            "article": [a for _ in langs for a in (25, 26)],
                            "text": [f"Art {a}\nbody {lang} {a}" for lang in langs for a in (25, 26)]})
    tiers = {lang: "high" for lang in langs if lang.startswith("h")} | {lang: "low" for lang in langs if lang[0] == "l"}
    s = eval_set(heldout, tiers, "eng_Latn", per_tier=3, seed=1)
    counts = dict(s.group_by("tier").agg(pl.col("lang").n_unique()).iter_rows())
    assert counts == {"english": 1, "high": 3, "low": 3, "unseen": 1}
    assert s.filter(pl.col("text").str.starts_with("Art")).height == 0
    assert s.equals(eval_set(heldout, tiers, "eng_Latn", per_tier=3, seed=1))
    with pytest.raises(ValueError, match="no held-out text in eng_Latn"):
        eval_set(heldout.filter(pl.col("declared_lang") != "eng_Latn"), tiers, "eng_Latn", 3, 1)
    new = ["l00_Latn", "l01_Latn", "l02_Latn", "l03_Latn", "zzz_Latn"]  # a released model's new languages: all kept
    s = eval_set(heldout, tiers, "eng_Latn", per_tier=3, seed=1, new_languages=new)
    assert sorted(s.filter(pl.col("tier") == "new")["lang"].unique()) == new
    assert s.filter(pl.col("tier") == "low")["lang"].n_unique() == 3 and "unseen" not in set(s["tier"])
    with pytest.raises(ValueError, match=r"new_languages \['yor_Latn'\] have no held-out text"):
        eval_set(heldout, tiers, "eng_Latn", 3, 1, new_languages=["yor_Latn"])


# ----------------------------------------------------------------------------------------------- encoder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny ModernBERT with a word-level tokenizer over VOCAB ids ("t5" = id 5)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = build_model(SHAPE, VOCAB, SPECIALS, 512, 160_000.0)
    model.save_pretrained(str(folder))
    vocab = {name: i for name, i in [("[PAD]", 0), ("[UNK]", 1), ("[CLS]", 2), ("[SEP]", 3), ("[MASK]", 4)]}
    vocab |= {f"t{i}": i for i in range(5, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                 ("[SEP]", 3)])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")])
    tok.save(str(folder / "tokenizer.json"))
    return model, folder


def test_packed_embeddings_equal_each_text_encoded_alone(checkpoint):
    model, folder = checkpoint
    rng = np.random.default_rng(0)
    docs = [random_doc(rng, n) for n in (30, 200, 9, 80)]
    texts = [" ".join(f"t{i}" for i in d[1:-1]) for d in docs]
    enc = Encoder(folder, batch_tokens=256)  # forces two packed rows
    packed = enc.embed(texts)
    ref = reference_copy(model)
    with torch.no_grad():
        for d, e in zip(docs, packed):
            h = ref.model(input_ids=torch.from_numpy(d)[None]).last_hidden_state[0, 1:-1].mean(0).numpy()
            assert np.allclose(e, h, atol=1e-4)
    assert enc.throughput.tokens == sum(d.size for d in docs) and enc.throughput.tokens_per_s > 0


def test_masked_predictions_are_the_argmax_of_the_masked_lm(checkpoint):
    model, folder = checkpoint
    enc = Encoder(folder, batch_tokens=128)
    rng = np.random.default_rng(1)
    docs = [random_doc(rng, n) for n in (40, 100, 60)]
    masked = [mask_for_eval(d, 0.2, 4, SPECIALS.values(), torch.Generator().manual_seed(i)) for i, d in enumerate(docs)]
    got = enc.masked_predictions(masked)
    ref = reference_copy(model)
    with torch.no_grad():
        for (ids, labels), (true, pred, nll) in zip(masked, got):
            logits = ref(input_ids=torch.from_numpy(ids)[None]).logits[0]
            where = labels != IGNORE
            assert (true == labels[where]).all()
            assert (pred == logits[torch.from_numpy(where)].argmax(-1).numpy()).all()
            # the cross-entropy of the true token under the model's distribution at each mask
            ref_nll = torch.nn.functional.cross_entropy(logits[torch.from_numpy(where)], torch.from_numpy(true),
                                                        reduction="none").numpy()
            assert np.allclose(nll, ref_nll, atol=1e-4)


# ----------------------------------------------------------------------------------------------- online tasks


def test_online_task_runs_from_a_local_copy_and_is_skipped_with_a_reason_offline(checkpoint, tmp_path):
    pytest.importorskip("datasets")
    from mmbert_dagster.evaluate.hf_tasks import run_hf_task

    _, folder = checkpoint
    rng = np.random.default_rng(0)
    # GLUE/SST-2 layout: sentence, label; train / validation splits. Class 1 texts use tokens t5..t20 only.
    def rows(n):
        labels = rng.integers(0, 2, n)
        return pl.DataFrame({"sentence": [" ".join(f"t{int(t)}" for t in rng.integers(5, 21, 12) + 100 * (1 - y))
                                          for y in labels], "label": labels.tolist()})
    (tmp_path / "sst2").mkdir()
    rows(80).write_parquet(tmp_path / "sst2" / "train.parquet")
    rows(40).write_parquet(tmp_path / "sst2" / "validation.parquet")
    task = HfTask(name="sst2_local", path="parquet", lang="eng_Latn", max_train=80, max_eval=40)
    task = HfTask(**{**task.__dict__, "path": str(tmp_path / "sst2")})
    encoders = {"m": Encoder(folder)}
    rows_out, note = run_hf_task(task, encoders, tier="english", seed=0, log=lambda *_: None)
    assert note is None
    assert rows_out[0]["task"] == "sst2_local" and rows_out[0]["value"] > 0.9  # separable by vocabulary

    offline = HfTask(name="sst2", path="nyu-mll/glue", config="sst2")
    rows_out, note = run_hf_task(offline, encoders, tier="english", seed=0, log=lambda *_: None)
    assert rows_out == [] and note.startswith("sst2: skipped — could not load 'nyu-mll/glue'")


# ----------------------------------------------------------------------------------------------- report


def synthetic_scores(low_all: float, eng_merged: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(score table, items): 4 low-tier languages x 6 texts, English x 6 texts; per-text noise of 0.01 (accuracy;
    cross-entropy = 6 - 10 x accuracy)."""
    rng = np.random.default_rng(0)
    rows, items = [], []
    for model, low, eng in [("decay_eng", 0.10, 0.50), ("decay_cont", 0.12, 0.45), ("decay_all", low_all, 0.40),
                            ("merged_model", 0.15, eng_merged)]:
        for task, metric in (("mlm", "accuracy"), ("retrieval", "accuracy@1"), ("topic_probe", "accuracy")):
            rows += [{"model": model, "task": task, "lang": "*", "tier": "low", "metric": metric, "value": low},
                     {"model": model, "task": task, "lang": "*", "tier": "english", "metric": metric, "value": eng}]
        for lang, tier, value in [("eng_Latn", "english", eng)] + [(f"l{i}x_Latn", "low", low) for i in range(4)]:
            for a in range(25, 31):
                acc = value + rng.normal(0, 0.01)
                items += [{"model": model, "task": "mlm", "metric": "accuracy", "lang": lang, "tier": tier,
                           "article": a, "value": acc},
                          {"model": model, "task": "mlm", "metric": "cross_entropy", "lang": lang, "tier": tier,
                           "article": a, "value": 6.0 - 10 * acc}]
    return pl.DataFrame(rows), pl.DataFrame(items)


def test_report_answers_the_claims_with_intervals_and_has_tables_and_plots():
    table, items = synthetic_scores(0.2, 0.499)
    mixtures = {"pretrain": pl.DataFrame({"stage": ["pretrain"] * 2, "lang": ["eng_Latn", "deu_Latn"],
                                          "share": [0.6, 0.4]})}
    groups = {m: [m] for m in ("decay_eng", "decay_cont", "decay_all", "merged_model")}
    report = build_report(table, checkpoints={}, lineage={}, mixtures=mixtures, notes=["sst2: skipped — offline"],
                          title="t", items=items, groups=groups, tier_languages={"low": ["l0x_Latn", "l9x_Latn"]})
    f = {(r["id"], r["metric"]): r for r in report.findings.iter_rows(named=True)}
    assert f[("a", "accuracy")]["verdict"] == "holds" and abs(f[("a", "accuracy")]["delta"] - 0.10) < 0.01
    assert f[("b1", "accuracy")]["verdict"] == "holds"  # 0.499 vs the best variant's 0.50: within a point
    worse, worse_items = synthetic_scores(0.05, 0.40)
    f2 = build_report(worse, checkpoints={}, lineage={}, mixtures={}, notes=[], title="t", items=worse_items,
                      groups=groups).findings
    assert f2.filter((pl.col("id") == "a") & (pl.col("metric") == "accuracy"))["verdict"].to_list() == ["reversed"]
    assert "Decay-All beats Decay-Eng on languages only it trained on" in report.markdown_files
    assert "| low | 2 | 4 | l0x_Latn, l1x_Latn, l2x_Latn, l3x_Latn |" in report.markdown_files  # tier membership
    assert "plots/mlm_by_tier.png" in report.markdown_files and "data:image/png;base64," in report.markdown_inline
    assert "sst2: skipped — offline" in report.markdown_files
    assert set(report.plots) >= {"mlm_by_tier", "retrieval_by_tier", "mixture_shares"}


# ----------------------------------------------------------------------------------------------- schedule


def test_nightly_eval_requests_the_scores_at_two_and_the_merge_only_when_stale():
    from dagster import AssetKey, AssetMaterialization, RunRequest, SkipReason, build_schedule_context, instance_for_test
    from mmbert_dagster.assets.evaluation import nightly_eval

    assert nightly_eval.cron_schedule == "0 2 * * *" and nightly_eval.execution_timezone == "UTC"
    assert nightly_eval.default_status.value == "RUNNING"

    at_two = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.timezone.utc)
    with instance_for_test() as instance:
        assert isinstance(nightly_eval(build_schedule_context(instance, scheduled_execution_time=at_two)), SkipReason)
        for key in ("decay_eng", "decay_cont", "decay_all"):
            instance.report_runless_asset_event(AssetMaterialization(key))
        req = nightly_eval(build_schedule_context(instance, scheduled_execution_time=at_two))
        assert isinstance(req, RunRequest)
        assert req.asset_selection == [AssetKey("merged_model"), AssetKey("onnx_model"),
                                       AssetKey("benchmark_scores")]  # never merged
        instance.report_runless_asset_event(AssetMaterialization("merged_model"))
        req = nightly_eval(build_schedule_context(instance, scheduled_execution_time=at_two))
        assert req.asset_selection == [AssetKey("onnx_model"), AssetKey("benchmark_scores")]  # never exported
        instance.report_runless_asset_event(AssetMaterialization("onnx_model"))
        req = nightly_eval(build_schedule_context(instance, scheduled_execution_time=at_two))
        assert req.asset_selection == [AssetKey("benchmark_scores")]  # the merge and its export are up to date
        instance.report_runless_asset_event(AssetMaterialization("decay_all"))
        req = nightly_eval(build_schedule_context(instance, scheduled_execution_time=at_two))
        assert AssetKey("merged_model") in req.asset_selection  # a decay changed after the merge


# ------------------------------------------------------------------------------------------ fill-mask probes


def test_fill_mask_probes_are_held_out_sentences_whose_answer_a_unigram_model_would_not_give(tmp_path):
    from mmbert_dagster.data.sources import embedded_dir
    from mmbert_dagster.evaluate.fill_mask import (PROBES, ProbeResult, languages_filled, load_results,
                                                   save_results)

    held = pl.read_parquet(embedded_dir() / "heldout.parquet")
    train = pl.read_parquet(embedded_dir() / "corpus.parquet", columns=["declared_lang", "text"])
    for lang, sentences in PROBES.items():
        assert len(sentences) >= 2
        held_text = " ".join(held.filter(pl.col("declared_lang") == lang)["text"].to_list())
        train_text = " ".join(train.filter(pl.col("declared_lang") == lang)["text"].to_list())
        for sentence, answer in sentences:
            assert sentence.count("[MASK]") == 1
            filled = sentence.replace("[MASK]", answer)
            assert filled in held_text, (lang, filled)  # verbatim held-out text...
            assert filled not in train_text, (lang, filled)  # ...that no stage trains on
            # what a model on the unigram plateau ranks first in every language (measured): never an answer
            assert answer not in {".", ",", "", "de", "en", "es"}

    def result(lang, expected, guesses):
        return ProbeResult(lang, "s", expected, [(g, 0.1) for g in guesses])
    results = [result("a", "x", ["y", "X "]), result("a", "z", ["x"]), result("b", "x", ["y"]),
               result("c", "q", ["q"])]
    assert [r.hit for r in results] == [True, False, False, True]  # case and surrounding spaces ignored
    assert languages_filled(results) == ["a", "c"]
    save_results(results, tmp_path / "fill_mask.json")  # what the training assets keep and their check reads
    assert load_results(tmp_path / "fill_mask.json") == results
