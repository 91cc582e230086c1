import dataclasses

import polars as pl
import pytest

from mmbert_dagster.data import langid, sources
from mmbert_dagster.recipe import load_recipe

LANGS = ["eng_Latn", "deu_Latn", "fra_Latn", "rus_Cyrl", "cmn_Hans", "jpn_Jpan", "kor_Hang", "hin_Deva",
         "ell_Grek", "arb_Arab", "amh_Ethi"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    corpus = pl.read_parquet(sources.embedded_dir() / "corpus.parquet").filter(pl.col("declared_lang").is_in(LANGS))
    cfg = dataclasses.replace(load_recipe("tiny").lid, max_train_chars_per_lang=20_000)
    train, held = langid.split_labelled(corpus, cfg)
    path = tmp_path_factory.mktemp("lid") / "model.bin"
    langid.train_model(train, path, cfg, seed=1)
    model = langid.load_model(path)
    thresholds, summary = langid.calibrate(model, held, cfg)
    return {"model": model, "thresholds": thresholds, "summary": summary, "cfg": cfg, "corpus": corpus}


def test_language_id_is_accurate_on_held_out_text(trained):
    assert set(langid.model_labels(trained["model"])) == set(LANGS)
    assert trained["summary"]["heldout_chunks"] > 100
    assert trained["summary"]["heldout_accuracy"] >= 0.9


def test_language_id_recognises_held_out_udhr_articles(trained):
    # Articles 25-30 of the UDHR are never in the training corpus.
    heldout = pl.read_parquet(sources.embedded_heldout()).filter(pl.col("declared_lang").is_in(LANGS))
    pred, _ = langid.predict(trained["model"], heldout["text"].to_list())
    accuracy = sum(p == g for p, g in zip(pred, heldout["declared_lang"])) / heldout.height
    assert accuracy >= 0.9


def test_thresholds_are_per_language_and_within_bounds(trained):
    th = trained["thresholds"]
    cfg = trained["cfg"]
    assert th["lang"].to_list() == sorted(LANGS)
    assert th["threshold"].min() >= cfg.min_threshold - 1e-6 and th["threshold"].max() <= cfg.max_threshold + 1e-6


def test_documents_are_labelled_not_dropped(trained):
    docs = trained["corpus"].head(200)
    table = langid.label_documents(trained["model"], trained["thresholds"], [docs], log=lambda _: None)
    assert table.height == docs.height
    assert set(table.columns) >= {"doc_id", "source", "lang", "lid_score", "threshold", "passed"}
    summary, per_lang = langid.agreement(table, set(LANGS))
    assert summary["agreement_with_declared"] >= 0.9
    unknown = docs.head(3).with_columns(declared_lang=pl.lit("xyz_Zzzz"))
    table = langid.label_documents(trained["model"], trained["thresholds"], [unknown], log=lambda _: None)
    summary, _ = langid.agreement(table, set(LANGS))
    assert summary["declared_languages_unknown_to_model"] == ["xyz_Zzzz"]
    assert summary["docs_with_declared_language_unknown_to_model"] == 3


def test_a_file_that_is_not_a_fasttext_model_fails_clearly(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"not a model")
    with pytest.raises(langid.LanguageIdError, match="model.bin"):
        langid.load_model(bad)
    with pytest.raises(langid.LanguageIdError, match="does not exist"):
        langid.load_model(tmp_path / "missing.bin")


def test_a_collapsed_model_is_retrained_at_lower_learning_rates_then_refused(trained, tmp_path):
    """A model below the held-out accuracy floor counts as diverged: retried at lr/2, lr/4, lr/8, then an error."""
    cfg = dataclasses.replace(trained["cfg"], epochs=2, max_train_chars_per_lang=3_000, min_heldout_accuracy=0.999)
    train, held = langid.split_labelled(trained["corpus"], cfg)
    lines = []
    with pytest.raises(langid.LanguageIdError, match=r"collapsed \(held-out accuracy .* < min_heldout_accuracy"):
        langid.train_model(train, tmp_path / "model.bin", cfg, seed=1, held=held, log=lines.append)
    assert [line.split("retrying at ")[1] for line in lines] == ["lr=0.4", "lr=0.2", "lr=0.1"]
    assert not (tmp_path / "model.bin").exists()
    ok = dataclasses.replace(cfg, min_heldout_accuracy=0.3)
    langid.train_model(train, tmp_path / "model.bin", ok, seed=1, held=held, log=lines.append)
    assert (tmp_path / "model.bin").is_file() and len(lines) == 3


def test_training_twice_gives_the_same_model_bit_for_bit(trained, tmp_path):
    """Re-materializing language ID must not change every downstream artifact (threads = 1, a fresh process)."""
    cfg = dataclasses.replace(trained["cfg"], epochs=5, max_train_chars_per_lang=5_000)
    train, held = langid.split_labelled(trained["corpus"], cfg)
    for name in ("a.bin", "b.bin"):
        langid.train_model(train, tmp_path / name, cfg, seed=1, held=held)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
