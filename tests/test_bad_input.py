"""Bad input through the CLI users run (`dagster asset materialize` from the repository root): every class gives one
clear message naming the file or recipe field, a non-zero exit, and leaves the existing artifacts untouched."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import polars as pl
import pytest

from mmbert_dagster.artifacts import MANIFEST, atomic_dir

from graph_helpers import DAGSTER, RECIPE, REPO, cli_env, copy_home

# what each case's home holds before the bad run (copies of the session graph's artifacts)
CORPUS_KEYS = ["raw_corpus"]


def snapshot(home: Path) -> dict[str, bytes]:
    """Every artifact's manifest (checksums of all its files) and the set of visible artifact folders."""
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.glob("e2e/*/" + MANIFEST))}


def materialize(home: Path, select: str, *, recipe: Path = RECIPE, config: dict | None = None):
    cmd = [DAGSTER, "asset", "materialize", "--select", select]
    if config:
        cmd += ["--config-json", json.dumps(config)]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(home, MMBERT_PRESET=str(recipe)), capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def local_corpus(*paths: Path) -> dict:
    return {"resources": {"corpus": {"config": {"kind": "local", "paths": [str(p) for p in paths]}}}}


def recipe_with(tmp_path: Path, old: str, new: str) -> Path:
    text = RECIPE.read_text()
    assert old in text
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(old, new, 1))
    return path


def expect_refused(home: Path, before: dict, code: int, out: str, *needles: str) -> None:
    assert code != 0, out[-3000:]
    for needle in needles:
        assert needle in out, f"{needle!r} not in the output:\n{out[-4000:]}"
    assert snapshot(home) == before, "an existing artifact changed"
    assert not [p for p in home.glob("e2e/.*") if ".tmp-" in p.name], "a temporary folder was left behind"


def expect_recipe_refused(graph, tmp_path: Path, keys: list[str], recipe: Path, select: str, *needles: str) -> None:
    """Materialize ``select`` under ``recipe`` in a copy of the graph's ``keys``: refused, naming ``needles``."""
    home = copy_home(graph, tmp_path / "home", keys)
    before = snapshot(home)
    code, out = materialize(home, select, recipe=recipe)
    expect_refused(home, before, code, out, *needles)


# ---------------------------------------------------------------- corpus files (raw_corpus)

def _malformed(tmp: Path) -> tuple[Path, list[str]]:
    p = tmp / "malformed.jsonl"
    p.write_text('{"text": "one good line of text"}\n{"text": "broken\n')
    return p, [f"{p}:2", "malformed JSON"]


def _invalid_utf8(tmp: Path) -> tuple[Path, list[str]]:
    p = tmp / "latin1.jsonl"
    p.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    return p, [f"{p}:1", "invalid UTF-8"]


def _lone_surrogate(tmp: Path) -> tuple[Path, list[str]]:
    p = tmp / "surrogate.jsonl"  # valid JSON: the six characters \ud800, an unpaired UTF-16 escape
    p.write_text('{"text": "one good line of text"}\n{"text": "broken \\ud800 text"}\n')
    return p, [f"{p}:2: field 'text' holds a lone surrogate \\ud800"]


def _empty(tmp: Path) -> tuple[Path, list[str]]:
    p = tmp / "empty.jsonl"
    p.write_text("")
    return p, [str(p), "no documents"]


def _missing(tmp: Path) -> tuple[Path, list[str]]:
    p = tmp / "no_such_dir" / "corpus.jsonl"
    return p, [str(p), "does not exist"]


@pytest.mark.slow
@pytest.mark.parametrize("make", [_malformed, _invalid_utf8, _lone_surrogate, _empty, _missing],
                         ids=lambda f: f.__name__[1:])
def test_bad_corpus_files_are_refused_by_file_and_line(graph, tmp_path, make):
    home = copy_home(graph, tmp_path / "home", CORPUS_KEYS)
    before = snapshot(home)
    path, needles = make(tmp_path)
    code, out = materialize(home, "raw_corpus", config=local_corpus(path))
    expect_refused(home, before, code, out, *needles)


@pytest.mark.slow
def test_a_lone_surrogate_is_skipped_and_counted_when_asked(tmp_path):
    home = tmp_path / "home"
    path, _ = _lone_surrogate(tmp_path)
    config = local_corpus(path)
    config["resources"]["corpus"]["config"]["on_bad_record"] = "skip"
    code, out = materialize(home, "raw_corpus", config=config)
    assert code == 0, out[-3000:]
    assert f"skipped {path}:2: field 'text' holds a lone surrogate \\ud800" in out
    docs = pl.read_parquet(home / "e2e" / "raw_corpus" / "docs")
    assert docs["text"].to_list() == ["one good line of text"]


# ---------------------------------------------------------------- recipe fields (refused when the code loads)

@pytest.mark.slow
@pytest.mark.parametrize("old, new, needles", [
    ('english = "eng_Latn"', 'english = "english"', ["english", "unknown language code 'english'"]),
    ("tau = 0.7", "tau = 1.7", ["stages.pretrain.tau: must be in (0, 1], got 1.7"]),
    ("mask_rate = 0.30", "mask_rate = 1.2", ["stages.pretrain.mask_rate: must be in (0, 1), got 1.2"]),
    ("max_repeat = 5.0", "max_repat = 5.0", ["stages.pretrain: unknown field(s) ['max_repat']"]),
    ("heads = 4", "heads = 3", ["[model].heads: must divide hidden: hidden = 256 is not a multiple of heads = 3"]),
    ("lr_peak = 1e-3", "lr_peak = -1e-3", ["stages.pretrain.lr_peak: must be > 0, got -0.001"]),
    ('init_from = "midtrain"', 'init_from = "decay_all"', ["stages.decay_eng.init_from: must name an earlier stage"]),
], ids=["language_code", "tau", "mask_rate", "unknown_field", "heads", "lr_peak", "init_from"])
def test_bad_recipe_values_are_refused_by_field(graph, tmp_path, old, new, needles):
    recipe = recipe_with(tmp_path, old, new)
    expect_recipe_refused(graph, tmp_path, CORPUS_KEYS, recipe, "raw_corpus", str(recipe), *needles)


# ---------------------------------------------------------------- settings that leave nothing to train on

@pytest.mark.slow
def test_filters_that_drop_every_document_are_refused_naming_filter_and_setting(graph, tmp_path):
    recipe = recipe_with(tmp_path, "min_doc_words = 30", "min_doc_words = 100000")
    expect_recipe_refused(graph, tmp_path, ["raw_corpus", "filtered_corpus"], recipe, "filtered_corpus",
                          f"{recipe}: [filters] removed all", "gopher_quality dropped", "(gopher_short_doc: ",
                          "min_doc_words = 100000")


# ---------------------------------------------------------------- artifacts that do not fit together

@pytest.mark.slow
def test_a_budget_that_cannot_be_met_names_the_stage_field(graph, tmp_path):
    recipe = recipe_with(tmp_path, "tokens = 100_000", "tokens = 100_000_000_000")
    expect_recipe_refused(graph, tmp_path, ["language_stats", "tokenizer"], recipe, "mixture_pretrain",
                          "tokens: the budget of 100,000,000,000 tokens cannot be met")


@pytest.mark.slow
def test_a_tokenizer_that_does_not_match_the_shards_is_refused(graph, tmp_path):
    from mmbert_dagster.data.tokenizer import train_tokenizer
    from mmbert_dagster.recipe import TokenizerConfig

    home = copy_home(graph, tmp_path / "home", ["raw_corpus", "mixture_pretrain", "shards_pretrain"])
    with atomic_dir(home / "e2e" / "tokenizer") as out:  # a whole, checksummed artifact — just another tokenizer
        texts = [("eng_Latn", "a different tokenizer trained on other text " * 50)] * 10
        train_tokenizer(texts, out, TokenizerConfig(vocab_size=300, sample_bytes_per_lang=10_000, min_frequency=1),
                        log=lambda _: None)
    before = snapshot(home)
    code, out = materialize(home, "pretrain_checkpoint")
    expect_refused(home, before, code, out, "shards were built with another tokenizer than",
                   str(home / "e2e" / "tokenizer" / "tokenizer.json"))
    assert not (home / "e2e" / "pretrain_checkpoint").exists()


@pytest.mark.slow
def test_a_stage_refuses_an_init_checkpoint_of_another_tokenizer_before_its_first_step(graph, tmp_path):
    """The data half re-made with a new tokenizer (new tokenizer, new shards), the old mid-training checkpoint kept:
    `decay_all` must not train the old embeddings on the new token ids."""
    from mmbert_dagster.data.tokenizer import train_tokenizer
    from mmbert_dagster.recipe import TokenizerConfig

    keys = ["raw_corpus", "filtered_corpus", "language_id_table", "mixture_decay_all", "midtrain_checkpoint"]
    home = copy_home(graph, tmp_path / "home", keys)
    with atomic_dir(home / "e2e" / "tokenizer") as out:
        texts = [("eng_Latn", "a different tokenizer trained on other text " * 50)] * 10
        train_tokenizer(texts, out, TokenizerConfig(vocab_size=2048, sample_bytes_per_lang=10_000, min_frequency=1),
                        log=lambda _: None)
    code, out = materialize(home, "shards_decay_all")
    assert code == 0, out[-3000:]
    before = snapshot(home)
    code, out = materialize(home, "decay_all")
    expect_refused(home, before, code, out, "the init checkpoint was trained with another tokenizer",
                   str(home / "e2e" / "midtrain_checkpoint" / "tokenizer.json"),
                   str(home / "e2e" / "tokenizer" / "tokenizer.json"))
    assert "decay_all step 1/" not in out and not (home / "e2e" / "decay_all").exists()


@pytest.mark.slow
def test_a_merge_of_checkpoints_with_different_shapes_is_refused(graph, tmp_path):
    from mmbert_dagster.recipe import ModelShape
    from mmbert_dagster.train.model import build_model

    keys = ["midtrain_checkpoint", "decay_eng", "decay_cont", "decay_all", "tokenizer"]
    home = copy_home(graph, tmp_path / "home", keys)
    folder = home / "e2e" / "decay_cont"
    cfg = json.loads((folder / "config.json").read_text())
    narrow = ModelShape(layers=cfg["num_hidden_layers"], hidden=128, intermediate=192, heads=2, global_every=3,
                        local_window=128)
    specials = {"pad": cfg["pad_token_id"], "unk": 1, "cls": cfg["cls_token_id"], "sep": cfg["sep_token_id"],
                "mask": cfg["mask_token_id"]}
    with atomic_dir(folder) as out:  # a whole checkpoint folder of another width in decay_cont's place
        for f in (home / "e2e" / "decay_eng").iterdir():
            if f.is_file() and f.name not in (MANIFEST, "model.safetensors", "config.json"):
                (out / f.name).write_bytes(f.read_bytes())
        build_model(narrow, cfg["vocab_size"], specials, 1024, 160_000.0).save_pretrained(out)
    before = snapshot(home)
    code, out = materialize(home, "merged_model")
    expect_refused(home, before, code, out, f"{folder}/config.json: hidden_size = 128")
    assert not (home / "e2e" / "merged_model").exists()


@pytest.mark.slow
def test_a_missing_upstream_artifact_names_the_asset_to_materialize(graph, tmp_path):
    home = copy_home(graph, tmp_path / "home", ["raw_corpus"])
    before = snapshot(home)
    code, out = materialize(home, "language_id_model")
    expect_refused(home, before, code, out, "filtered_corpus: missing artifact",
                   "dagster asset materialize --select filtered_corpus")
