"""The end-to-end graph shared by the graph, fault and bad-input tests: the e2e recipe on a subset of the embedded
corpus, materialized once per session (fixture ``graph`` in conftest.py)."""

import importlib
import os
import shutil
import sys
from pathlib import Path

import polars as pl

from mmbert_dagster.data import sources

REPO = Path(__file__).resolve().parent.parent
DAGSTER = str(Path(sys.executable).parent / "dagster")  # the venv's dagster CLI
RECIPE = Path(__file__).parent / "data" / "e2e.toml"
DATA_KEYS = {
    "raw_corpus", "filtered_corpus", "language_id_model", "language_id_table", "language_stats",
    *(f"mixture_{s}" for s in ("pretrain", "midtrain", "decay_eng", "decay_cont", "decay_all")),
    "tokenizer", *(f"shards_{s}" for s in ("pretrain", "midtrain", "decay_eng", "decay_cont", "decay_all")),
}
TRAINING_KEYS = {"pretrain_checkpoint", "midtrain_checkpoint", "decay_eng", "decay_cont", "decay_all"}


def subset_corpus(path: Path) -> None:
    """60 languages of the embedded corpus, the 12 largest capped at 60 kB and the rest at 15 kB (~1.5 MB)."""
    corpus = pl.read_parquet(sources.embedded_dir() / "corpus.parquet")
    sizes = corpus.group_by("declared_lang").agg(b=pl.col("text").str.len_bytes().sum()).sort(["b", "declared_lang"], descending=[True, False])
    langs = sizes["declared_lang"].to_list()
    keep = {lang: 60_000 for lang in langs[:12]} | {lang: 15_000 for lang in langs[12:60]}
    sub = (
        corpus.filter(pl.col("declared_lang").is_in(list(keep)))
        .sort("doc_id")
        .with_columns(cum=pl.col("text").str.len_bytes().cum_sum().over("declared_lang"))
        .filter(pl.col("cum") <= pl.col("declared_lang").replace_strict(keep, return_dtype=pl.Int64) + 20_000)
        .drop("cum")
    )
    sub.write_parquet(path)


def load_definitions():
    """Import (or re-import) the code location so code versions reflect the current MMBERT_PRESET recipe."""
    from mmbert_dagster.assets import _common, data, evaluation, mixtures, tokens, training
    import mmbert_dagster.definitions as definitions

    for module in (_common, data, mixtures, tokens, training, evaluation, definitions):
        importlib.reload(module)
    return definitions.defs


def run_config(corpus: Path) -> dict:
    return {"resources": {"corpus": {"config": {
        "kind": "local", "paths": [str(corpus)], "lang_field": "declared_lang", "id_field": "doc_id",
        "heldout_path": str(sources.embedded_heldout()),
    }}}}


def build_graph(tmp_path_factory):
    """Generator behind the session fixture ``graph``: materialize everything once, restore the env after."""
    home = tmp_path_factory.mktemp("mmbert_home")
    corpus = home / "subset.parquet"
    subset_corpus(corpus)
    env = {"MMBERT_HOME": str(home), "MMBERT_PRESET": str(RECIPE)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from dagster import DagsterInstance, materialize

    defs = load_definitions()
    instance = DagsterInstance.ephemeral()
    everything = [*defs.assets, *defs.asset_checks]
    result = materialize(everything, resources=defs.resources, instance=instance, run_config=run_config(corpus))
    yield {"home": home, "corpus": corpus, "defs": defs, "instance": instance, "result": result}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    load_definitions()


def copy_home(graph: dict, dest: Path, keys: list[str]) -> Path:
    """A private artifact root holding copies of some of the session graph's artifacts (tests that break or
    rewrite artifacts work on copies, so other tests keep the shared graph intact)."""
    for key in keys:
        shutil.copytree(graph["home"] / "e2e" / key, dest / "e2e" / key)
    return dest


def cli_env(home: Path, **extra: str) -> dict:
    """The environment of a `dagster asset materialize` run on the e2e recipe in artifact root ``home``."""
    env = {**os.environ, "MMBERT_HOME": str(home), "MMBERT_PRESET": str(RECIPE),
           "DAGSTER_HOME": str(home / "dagster"), **extra}
    env.pop("DAGSTER_CLI_ASSET_MATERIALIZE_MODULE_NAME", None)  # the venv's start-up hook must provide it
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "scripts" / "dagster.yaml", home / "dagster" / "dagster.yaml")
    return env
