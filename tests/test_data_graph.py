"""The asset graph end to end, through Dagster: in-process `materialize` of every asset and check (data half
and the five training stages, on a subset of the embedded corpus and small budgets), staleness after a recipe
change, and the bare `dagster asset materialize` CLI from the repository root."""

import os
import subprocess

import polars as pl
import pytest
from dagster import AssetCheckSeverity, AssetKey, materialize

from graph_helpers import (  # noqa: E402
    DAGSTER, DATA_KEYS, RECIPE, REPO, TRAINING_KEYS, cli_env, copy_home, load_definitions, run_config,
)

EVERY_KEY = sorted(DATA_KEYS | TRAINING_KEYS | {"merged_model", "onnx_model", "benchmark_scores"})


def materialization_count(instance, key: str) -> int:
    return len(instance.fetch_materializations(AssetKey(key), limit=100).records)


@pytest.mark.slow
def test_whole_graph_materializes_with_passing_checks(graph):
    result = graph["result"]
    assert result.success
    keys = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert keys == DATA_KEYS | TRAINING_KEYS | {"merged_model", "onnx_model", "benchmark_scores"}
    checks = result.get_asset_check_evaluations()
    failed = [(c.asset_key.to_user_string(), c.check_name, c.metadata) for c in checks
              if not c.passed and c.severity == AssetCheckSeverity.ERROR]
    assert not failed
    assert len(checks) >= 22
    root = graph["home"] / "e2e"
    mix = pl.read_parquet(root / "mixture_decay_all" / "mixture.parquet")
    assert mix["share"].sum() == pytest.approx(1.0)
    assert mix.height > pl.read_parquet(root / "mixture_pretrain" / "mixture.parquet").height
    assert (root / "tokenizer" / "tokenizer.json").is_file()
    assert (root / "raw_corpus" / "heldout.parquet").is_file()
    from transformers import AutoModelForMaskedLM, pipeline

    for key in TRAINING_KEYS:
        AutoModelForMaskedLM.from_pretrained(root / key)  # a plain Hugging Face folder, offline
    fill = pipeline("fill-mask", model=str(root / "decay_all"))
    assert len(fill("Alle Menschen sind frei und gleich an [MASK] geboren.")) == 5
    AutoModelForMaskedLM.from_pretrained(root / "merged_model")
    scores = pl.read_parquet(root / "benchmark_scores" / "scores.parquet")
    assert set(scores["model"]) == TRAINING_KEYS | {"merged_model"}
    assert {"mlm", "retrieval", "topic_probe", "encode"} <= set(scores["task"])
    assert {"english", "high", "mid", "low"} <= set(scores["tier"])
    mlm = scores.filter(pl.col("task") == "mlm")
    assert set(mlm["metric"]) == {"accuracy", "cross_entropy"} and mlm["value"].is_finite().all()
    report = (root / "benchmark_scores" / "report.md").read_text()
    assert "Decay-All beats Decay-Eng on languages only it trained on" in report and "plots/loss_curves.png" in report
    assert "## Languages per tier" in report
    items = pl.read_parquet(root / "benchmark_scores" / "items.parquet")  # every held-out text, per model
    assert set(items["model"]) == TRAINING_KEYS | {"merged_model"} and items["article"].n_unique() > 1
    assert (root / "benchmark_scores" / "plots" / "loss_curves.png").stat().st_size > 1000
    # the fine-tuned stand-in: every scored language but English, mean and sd over the two seeds, per tier too
    tuned = scores.filter(pl.col("task") == "udhr_article_standin")
    assert set(tuned["metric"]) == {"accuracy_mean", "accuracy_sd"} and set(tuned["model"]) == set(scores["model"])
    assert set(tuned.filter(pl.col("lang") != "*")["lang"]) == set(items["lang"]) - {"eng_Latn"}
    assert tuned.filter(pl.col("metric") == "accuracy_sd")["value"].is_finite().all()
    assert "## Fine-tuned: `udhr_article_standin`" in report and "**Offline stand-in**" in report
    # the ONNX export: parity checked (blocking), its throughput in the table and the report
    onnx = {r["metric"]: r["value"] for r in scores.filter(pl.col("task") == "onnx").iter_rows(named=True)}
    assert onnx["max_abs_logit_diff"] <= 1e-3 and onnx["onnxruntime_tokens_per_s"] > 0 and onnx["speedup"] > 0
    assert "## Deployment: ONNX" in report and (root / "onnx_model" / "model.onnx").is_file()
    assert any(c.check_name == "onnx_matches_pytorch" and c.passed for c in checks)


@pytest.mark.slow
def test_bare_cli_materializes_a_selection_from_the_repo_root(graph, tmp_path):
    home = copy_home(graph, tmp_path / "home", EVERY_KEY)  # a copy: the session graph stays as it was built
    env = cli_env(home)  # without DAGSTER_CLI_ASSET_MATERIALIZE_MODULE_NAME: the venv's hook provides it
    before = (home / "e2e" / "shards_decay_all" / "MANIFEST.json").stat().st_mtime_ns
    raw_before = (home / "e2e" / "raw_corpus" / "MANIFEST.json").stat().st_mtime_ns
    proc = subprocess.run([DAGSTER, "asset", "materialize", "--select", "shards_decay_all"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RUN_SUCCESS" in proc.stdout + proc.stderr
    after = (home / "e2e" / "shards_decay_all" / "MANIFEST.json").stat().st_mtime_ns
    assert after > before
    # only the selected asset ran: upstream artifacts were not touched
    assert (home / "e2e" / "raw_corpus" / "MANIFEST.json").stat().st_mtime_ns == raw_before
    assert "shards_decay_cont" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_decay_all_plus_from_the_cli_rebuilds_exactly_the_decay_the_merge_its_onnx_and_the_scores(graph, tmp_path):
    """The README's `dagster asset materialize --select decay_all+`, run as-is from the repository root."""
    home = copy_home(graph, tmp_path / "home", EVERY_KEY)
    env = cli_env(home)
    root = home / "e2e"
    stamp = lambda key: (root / key / "MANIFEST.json").stat().st_mtime_ns  # noqa: E731
    keys = ["decay_all", "merged_model", "onnx_model", "benchmark_scores", "decay_eng", "decay_cont",
            "midtrain_checkpoint", "shards_decay_all"]
    before = {k: stamp(k) for k in keys}
    proc = subprocess.run([DAGSTER, "asset", "materialize", "--select", "decay_all+"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "RUN_SUCCESS" in out
    after = {k: stamp(k) for k in keys}
    assert [k for k in keys if after[k] != before[k]] == ["decay_all", "merged_model", "onnx_model", "benchmark_scores"]


@pytest.mark.slow
def test_changing_tau_makes_only_that_stage_mixture_shards_and_checkpoints_stale(graph, tmp_path):
    from dagster._utils.test.data_versions import get_stale_status_resolver
    from dagster._core.definitions.data_version import StaleStatus

    changed = tmp_path / "e2e_tau.toml"
    changed.write_text(RECIPE.read_text().replace("tau = 0.5", "tau = 0.45"))
    home = copy_home(graph, tmp_path / "home", EVERY_KEY)  # re-materialized here, not in the session graph
    os.environ.update(MMBERT_PRESET=str(changed), MMBERT_HOME=str(home))
    try:
        defs = load_definitions()
        assert "name = \"e2e\"" in changed.read_text()
        resolver = get_stale_status_resolver(graph["instance"], list(defs.assets))
        stale = {k for k in DATA_KEYS | TRAINING_KEYS if resolver.get_status(AssetKey(k)) != StaleStatus.FRESH}
        # the corpus, language ID, tokenizer and the other stages' data stay fresh; the mid-training checkpoint
        # is stale (its recipe section changed); Dagster marks the decays stale once it is re-materialized
        assert stale & DATA_KEYS == {"mixture_midtrain", "shards_midtrain"}
        assert stale & TRAINING_KEYS == {"midtrain_checkpoint"}
        stale &= DATA_KEYS
        raw_mtime = (home / "e2e" / "raw_corpus" / "MANIFEST.json").stat().st_mtime_ns
        selection = [a for a in defs.assets if {k.to_user_string() for k in a.keys} & stale]
        result = materialize(selection, resources=defs.resources, instance=graph["instance"],
                             run_config=run_config(graph["corpus"]))
        assert result.success
        mix = pl.read_parquet(home / "e2e" / "mixture_midtrain" / "mixture.parquet")
        assert mix["stage"][0] == "midtrain"
        assert materialization_count(graph["instance"], "mixture_midtrain") == 2
        assert materialization_count(graph["instance"], "language_id_model") == 1
        assert (home / "e2e" / "raw_corpus" / "MANIFEST.json").stat().st_mtime_ns == raw_mtime
        resolver = get_stale_status_resolver(graph["instance"], list(defs.assets))
        assert {k for k in DATA_KEYS if resolver.get_status(AssetKey(k)) != StaleStatus.FRESH} == set()
        assert resolver.get_status(AssetKey("pretrain_checkpoint")) == StaleStatus.FRESH
    finally:
        os.environ.update(MMBERT_PRESET=str(RECIPE), MMBERT_HOME=str(graph["home"]))
        load_definitions()
