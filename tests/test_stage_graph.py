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
    assert sorted(asset_list(tmp_path, recipe, "decay_all+")) == ["benchmark_scores", "decay_all", "merged_model"]
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
    assert read_inputs(out) == {k: manifest_digest(home / "e2e" / k)
                                for k in ("shards_decay_all", "tokenizer", "midtrain_checkpoint")}
    assert not (home / "e2e" / "shards_decay_all_mask30").exists()
    rates = [row["train/mask_rate"] for row in read_metrics(out) if "train/mask_rate" in row]
    assert rates and 0.25 < sum(rates) / len(rates) < 0.35  # the 30 % mask, not decay_all's 5 %
