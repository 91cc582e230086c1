"""The recipe is the stage graph: a stage added in a recipe TOML becomes assets with no code change, wired by its
`init_from` (and `data_from`), and the README's `--select decay_all+` still selects exactly the decay, the merge
and the scores."""

import os
import subprocess
from pathlib import Path

import pytest
from dagster import AssetKey, materialize

from graph_helpers import DAGSTER, RECIPE, REPO, cli_env, copy_home, load_definitions, run_config

MASK30 = '\n[stages.decay_all_mask30]\nextends = "decay_all"\nmask_rate = 0.30\n'


def recipe_with_stage(tmp_path: Path, section: str) -> Path:
    path = tmp_path / "ablation.toml"
    path.write_text(RECIPE.read_text().replace("\n[merge]", section + "\n[merge]", 1))
    return path


def asset_list(home: Path, recipe: Path, select: str | None = None) -> list[str]:
    """`dagster asset list [--select ...]` from the repository root, as a user runs it."""
    env = cli_env(home, MMBERT_PRESET=str(recipe))
    env.pop("DAGSTER_CLI_ASSET_LIST_MODULE_NAME", None)  # the venv's start-up hook provides it, as for a user
    proc = subprocess.run([DAGSTER, "asset", "list", *(["--select", select] if select else [])], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout.split()


def upstream(defs, key: str) -> set[str]:
    graph = defs.resolve_asset_graph()
    return {k.to_user_string() for k in graph.get(AssetKey(key)).parent_keys}


def test_an_added_stage_gets_its_assets_from_the_recipe_alone(tmp_path):
    recipe = recipe_with_stage(tmp_path, MASK30)
    listed = set(asset_list(tmp_path, recipe))
    assert {"decay_all_mask30", "mixture_decay_all_mask30", "shards_decay_all_mask30"} <= listed
    assert sorted(asset_list(tmp_path, recipe, "decay_all+")) == ["benchmark_scores", "decay_all", "merged_model",
                                                                  "onnx_model"]
    os.environ["MMBERT_PRESET"] = str(recipe)
    try:
        defs = load_definitions()
        assert {"midtrain_checkpoint", "shards_decay_all_mask30"} <= upstream(defs, "decay_all_mask30")
        assert "decay_all_mask30" in upstream(defs, "benchmark_scores")  # scored with every other checkpoint
        assert "decay_all_mask30" not in upstream(defs, "merged_model")  # not in [merge] weights
    finally:
        os.environ["MMBERT_PRESET"] = str(RECIPE)
        load_definitions()


def test_a_stage_with_data_from_reuses_that_stages_mixture_and_shards(tmp_path):
    recipe = recipe_with_stage(tmp_path, MASK30 + 'data_from = "decay_all"\n')
    listed = set(asset_list(tmp_path, recipe))
    assert "decay_all_mask30" in listed
    assert not {"mixture_decay_all_mask30", "shards_decay_all_mask30"} & listed
    os.environ["MMBERT_PRESET"] = str(recipe)
    try:
        defs = load_definitions()
        assert {"midtrain_checkpoint", "shards_decay_all", "mixture_decay_all"} <= upstream(defs, "decay_all_mask30")
    finally:
        os.environ["MMBERT_PRESET"] = str(RECIPE)
        load_definitions()


@pytest.mark.slow
def test_the_added_stage_trains_from_the_mid_training_checkpoint_on_the_shared_shards(graph, tmp_path):
    recipe = recipe_with_stage(tmp_path, MASK30 + 'data_from = "decay_all"\n')
    home = copy_home(graph, tmp_path / "home", ["raw_corpus", "tokenizer", "mixture_decay_all", "shards_decay_all",
                                                "midtrain_checkpoint"])
    os.environ.update(MMBERT_PRESET=str(recipe), MMBERT_HOME=str(home))
    try:
        defs = load_definitions()
        selected = [a for a in defs.assets if AssetKey("decay_all_mask30") in a.keys]
        result = materialize(selected, resources=defs.resources, run_config=run_config(graph["corpus"]))
        assert result.success
    finally:
        os.environ.update(MMBERT_PRESET=str(RECIPE), MMBERT_HOME=str(graph["home"]))
        load_definitions()
    from mmbert_dagster.artifacts import manifest_digest
    from mmbert_dagster.train.export import read_inputs, read_summary
    from mmbert_dagster.train.metrics import read_metrics

    out = home / "e2e" / "decay_all_mask30"
    assert read_summary(out)["stage"] == "decay_all_mask30" and (out / "config.json").is_file()
    # trained from the mid-training checkpoint on decay_all's shards (no mixture or shards of its own)
    inputs = read_inputs(out)
    assert inputs.pop("code_version")  # and the code version, so a checkpoint is reused only for the same code
    assert inputs == {k: manifest_digest(home / "e2e" / k) for k in ("shards_decay_all", "tokenizer",
                                                                      "midtrain_checkpoint")}
    assert not (home / "e2e" / "shards_decay_all_mask30").exists()
    rates = [row["train/mask_rate"] for row in read_metrics(out) if "train/mask_rate" in row]
    assert rates and 0.25 < sum(rates) / len(rates) < 0.35  # the 30 % mask, not decay_all's 5 %


def test_the_repro_recipe_adds_ablations_and_seeds_as_assets_from_the_recipe_alone(tmp_path):
    listed = set(asset_list(tmp_path, "repro"))
    assert {"pretrain_fixed_checkpoint", "midtrain_fixed_checkpoint", "decay_fixed", "decay_all_mask30",
            "merged_linear", "mixture_pretrain_fixed", "shards_decay_fixed", "decay_eng_seed2", "decay_fixed_seed3",
            "decay_all_mask30_seed3", "merged_model_seed2", "merged_linear_seed3"} <= listed
    # replicas and the 30 % mask decay train on their original's data: no copies of it
    assert not {"mixture_decay_all_mask30", "shards_decay_all_mask30", "shards_decay_eng_seed2"} & listed
    assert sorted(asset_list(tmp_path, "repro", "decay_all+")) == ["benchmark_scores", "decay_all", "merged_linear",
                                                                 "merged_model", "onnx_model"]
    os.environ["MMBERT_PRESET"] = "repro"
    try:
        defs = load_definitions()
        assert {"midtrain_fixed_checkpoint", "shards_decay_fixed"} <= upstream(defs, "decay_fixed_seed2")
        assert upstream(defs, "merged_model_seed2") == {"decay_eng_seed2", "decay_cont_seed2", "decay_all_seed2",
                                                        "midtrain_checkpoint"}
        assert {"decay_all_mask30_seed3", "merged_linear_seed3"} <= upstream(defs, "benchmark_scores")
    finally:
        os.environ["MMBERT_PRESET"] = str(RECIPE)
        load_definitions()


@pytest.mark.slow
def test_make_repro_on_the_test_budget_writes_the_findings_table(graph, tmp_path):
    """`make repro` with the shipped ablation sections on the e2e recipe (one extra seed of two decays, to keep the
    suite short): the e2e graph's checkpoints are reused, the ablations trained, the report has the findings."""
    import json
    import shutil

    import polars as pl

    from mmbert_dagster.evaluate.scores import read_findings

    home = tmp_path / "home"
    shutil.copytree(graph["home"] / "e2e", home / "e2e", ignore=shutil.ignore_patterns("benchmark_scores"))
    sections = (REPO / "mmbert_dagster" / "recipes" / "repro.toml").read_text()
    recipe = tmp_path / "e2e_repro.toml"
    stages = 'stages = ["decay_eng", "decay_cont", "decay_all", "decay_all_mask30", "decay_fixed"]'
    merges = 'merges = ["merged_model", "merged_linear"]'
    assert stages in sections and merges in sections
    recipe.write_text(sections.replace('include = "tiny"', f'include = "{RECIPE}"').replace("seeds = [2, 3]", "seeds = [2]")
                      .replace(stages, 'stages = ["decay_all", "decay_all_mask30"]').replace(merges, "merges = []")
                      + "\n[eval]\nfinetune = []  # the fine-tuning stand-in: tested by the whole-graph test\n")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(run_config(graph["corpus"])))
    before = (home / "e2e" / "decay_all" / "model.safetensors").stat().st_mtime_ns
    env = cli_env(home)
    proc = subprocess.run(["make", "-s", "repro", f"REPRO={recipe}", f"REPRO_ARGS=-c {config}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "materialized the paper graph, the ablations and the seeds" in proc.stdout
    assert (home / "e2e" / "decay_all" / "model.safetensors").stat().st_mtime_ns == before  # reused, not retrained
    assert "reusing" in proc.stderr + proc.stdout
    findings = read_findings(home / "e2e" / "benchmark_scores")
    assert {"a", "a_control", "b1", "b2", "c", "d", "e1", "e2"} <= set(findings["id"])
    assert findings.filter(pl.col("id") == "d")["n_seeds"].to_list()[0] == 2
    assert set(findings["verdict"]) <= {"holds", "reversed", "not significant"}
    report = (home / "e2e" / "benchmark_scores" / "report.md").read_text()
    assert "## The paper's claims, measured on this run" in report and "finding_a_per_language.png" in report


@pytest.mark.slow
def test_a_recipe_continues_a_released_checkpoint_with_its_shape_and_tokenizer(graph, tmp_path):
    """The `extend` preset on a local "released" ModernBERT folder (the e2e graph's mid-training checkpoint:
    its own tokenizer, a shape the preset does not state): released_checkpoint -> its tokenizer -> shards ->
    two decays -> TIES relative to the released model -> scores that include it."""
    import json
    import shutil

    import polars as pl
    from tokenizers import Tokenizer

    released = tmp_path / "released"
    shutil.copytree(graph["home"] / "e2e" / "midtrain_checkpoint", released,
                    ignore=shutil.ignore_patterns("trainer_state", "logs", "MANIFEST.json"))
    # the languages the released model never trained on (below its mid-training set of 24) that have held-out text
    stats = pl.read_parquet(graph["home"] / "e2e" / "language_stats" / "language_stats.parquet")
    heldout = set(pl.read_parquet(graph["home"] / "e2e" / "raw_corpus" / "heldout.parquet")["declared_lang"])
    new_langs = [lang for lang in stats.sort("rank").filter(pl.col("rank") > 24)["lang"] if lang in heldout][:4]
    text = (REPO / "mmbert_dagster" / "recipes" / "extend.toml").read_text()
    replay = text[text.index("replay_languages = ["):].split("\n")[0]
    for old, new in (('name = "extend"', 'name = "e2e"'), ("tier_high = 60", "tier_high = 8"),
                     ("tier_mid = 110", "tier_mid = 24"), ("tokens = 50_000_000", "tokens = 20_000"),
                     ("context_length = 8192", "context_length = 1024"), ("batch_tokens = 65_536", "batch_tokens = 4096"),
                     ('init_from = "hf://jhu-clsp/mmBERT-base"', f'init_from = "{released}"'),
                     (replay, "replay_languages = 8  # the released model's pre-training set"),
                     ("new_languages = []", f"new_languages = {new_langs}"),
                     ("languages_per_tier = 24", "languages_per_tier = 4\nmax_texts_per_lang = 2")):
        assert old in text, old
        text = text.replace(old, new)
    recipe = tmp_path / "extend_e2e.toml"
    recipe.write_text(text)
    home = copy_home(graph, tmp_path / "home", ["raw_corpus", "filtered_corpus", "language_id_model",
                                                "language_id_table"])
    os.environ.update(MMBERT_PRESET=str(recipe), MMBERT_HOME=str(home))
    try:
        defs = load_definitions()
        assert upstream(defs, "decay_new") >= {"released_checkpoint", "shards_decay_new"}
        assert "released_checkpoint" in upstream(defs, "tokenizer")
        assert upstream(defs, "merged_model") == {"decay_new", "decay_known", "released_checkpoint"}
        keep = {"released_checkpoint", "tokenizer", "language_stats", "mixture_decay_new", "mixture_decay_known",
                "shards_decay_new", "shards_decay_known", "decay_new", "decay_known", "merged_model",
                "onnx_model", "benchmark_scores"}
        selected = [a for a in defs.assets if {k.to_user_string() for k in a.keys} & keep]
        result = materialize(selected, resources=defs.resources, run_config=run_config(graph["corpus"]))
        assert result.success
    finally:
        os.environ.update(MMBERT_PRESET=str(RECIPE), MMBERT_HOME=str(graph["home"]))
        load_definitions()
    root = home / "e2e"
    vocab = Tokenizer.from_file(str(released / "tokenizer.json")).get_vocab(True)
    assert Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json")).get_vocab(True) == vocab
    cfg, want = json.loads((root / "decay_new" / "config.json").read_text()), json.loads((released / "config.json").read_text())
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        assert cfg[key] == want[key], key  # the checkpoint's shape, though the preset's [model] defaults differ
    assert "released_checkpoint" in json.loads((root / "decay_new" / "inputs.json").read_text())
    scores = pl.read_parquet(root / "benchmark_scores" / "scores.parquet")
    assert {"released_checkpoint", "decay_new", "decay_known", "merged_model"} <= set(scores["model"])
    ce = {(r["model"], r["tier"]): r["value"] for r in scores.filter(
        (pl.col("task") == "mlm") & (pl.col("metric") == "cross_entropy") & (pl.col("lang") == "*")).iter_rows(named=True)}
    # the languages the released model never trained on ([eval].new_languages) are learned ...
    assert ce["decay_new", "new"] < ce["released_checkpoint", "new"], ce
    # ... and the merge keeps English within 0.3 nats of the released model (our margin for this tiny run)
    assert ce["merged_model", "english"] < ce["released_checkpoint", "english"] + 0.3, ce
    mix = pl.read_parquet(root / "mixture_decay_new" / "mixture.parquet")
    assert mix.filter(pl.col("replay_group") == "replay")["share"].sum() == pytest.approx(0.5)
    assert set(mix.filter(pl.col("replay_group") == "replay")["lang"]) == set(stats.filter(pl.col("rank") <= 8)["lang"])
    # the new languages are their own tier, and the findings compare released / extended / merged on it
    assert set(scores.filter(pl.col("tier") == "new")["lang"]) >= set(new_langs) and len(new_langs) == 4
    findings = pl.read_parquet(root / "benchmark_scores" / "findings.parquet")
    ce_rows = {r["id"]: r for r in findings.filter(pl.col("metric") == "cross_entropy").iter_rows(named=True)}
    assert set(ce_rows) == {"n1", "n2", "n3", "n4"}, findings
    assert ce_rows["n1"]["delta"] > 0 and ce_rows["n1"]["low"] <= ce_rows["n1"]["delta"] <= ce_rows["n1"]["high"]
    print(findings.select("id", "metric", "delta", "low", "high", "verdict"))
