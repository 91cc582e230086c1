"""Per-stage token mixtures: temperature sampling over each stage's language set (sql/stage_mixture.sql).

One mixture per stage that builds its own data (``Recipe.data_stages``; a stage with ``data_from`` reuses
another's)."""

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from mmbert_dagster import mixtures
from mmbert_dagster.recipe import DATA_FIELDS, mixture_key
from mmbert_dagster.render import bar_chart_md
from mmbert_dagster.resources import ArtifactStore

from ._common import RECIPE, code_version, table_metadata

ENGLISH_ORDER = ("decay_eng", "decay_cont", "decay_all")  # the paper's decays, by falling English share


def mixture_code_version(stage: str) -> str:
    # only the fields a mixture depends on, so that changing e.g. a mask rate does not mark mixtures stale
    return code_version("english", *(f"stages.{stage}.{f}" for f in DATA_FIELDS),
                        extra=mixtures.sql_hash("stage_mixture"))


def build_mixture_asset(stage_name: str) -> AssetsDefinition:
    key = mixture_key(stage_name)

    @asset(name=key, group_name="mixtures", deps=["language_stats"], code_version=mixture_code_version(stage_name))
    def _mixture(context: AssetExecutionContext, store: ArtifactStore) -> MaterializeResult:
        stage = RECIPE.stage(stage_name)
        mix = mixtures.stage_mixture(mixtures.read_language_stats(store.require("language_stats")), stage, RECIPE)
        with store.write(key) as out:
            path = mixtures.write_mixture(mix, out)
        english = mixtures.english_share(mix, RECIPE.english)
        by_tier = mix.group_by("tier").agg(languages=pl.len(), share=pl.col("share").sum()).sort("share", descending=True)
        context.log.info(f"{key}: {mix.height} languages, τ={stage.tau}, English share {english:.3f}")
        return MaterializeResult(
            metadata={
                "path": MetadataValue.path(str(store.path(key) / path.name)),
                "languages": mix.height,
                "tau": stage.tau,
                "tokens_budget": stage.tokens,
                "english_share": english,
                "capped_languages": int(mix["capped"].sum()),
                "max_repeat_factor": float(mix["repeat_factor"].max()),
                "share_by_tier": table_metadata(by_tier),
                "shares": table_metadata(mix.drop("stage"), 40),
                "shares_plot": MetadataValue.md(
                    bar_chart_md(mix.head(30), "lang", "share", f"{stage_name}: 30 largest shares (τ={stage.tau})", "share")
                ),
            }
        )

    return _mixture


def build_mixture_check(stage_name: str):
    key = mixture_key(stage_name)

    @asset_check(asset=AssetKey(key), name="mixture_is_valid", blocking=True,
                 description="Shares sum to 1, every stage language is present, repeat factors within the cap")
    def _check(store: ArtifactStore) -> AssetCheckResult:
        mix = mixtures.read_mixture(store.require(key))
        stats = mixtures.read_language_stats(store.require("language_stats"))
        problems = mixtures.mixture_problems(mix, RECIPE.stage(stage_name), stats)
        return AssetCheckResult(
            passed=not problems,
            metadata={"problems": "; ".join(problems) or "none", "share_sum": float(mix["share"].sum())},
        )

    return _check


def build_english_order_check():
    keys = [mixture_key(s) for s in ENGLISH_ORDER]

    @asset_check(asset=AssetKey(keys[-1]), additional_deps=[AssetKey(k) for k in keys[:-1]],
                 description="English share ordered Decay-Eng > Decay-Cont > Decay-All (paper: 17.9 %, 13.2 %, 10.2 %)")
    def english_share_ordering(store: ArtifactStore) -> AssetCheckResult:
        missing = [k for k in keys if not store.path(k).is_dir()]
        if missing:  # e.g. `--select '*shards_decay_all'`: the other decays' mixtures are not built yet
            return AssetCheckResult(passed=False, severity=AssetCheckSeverity.WARN,
                                    description=f"not compared: {', '.join(missing)} not materialized yet",
                                    metadata={"missing": ", ".join(missing)})
        shares = [mixtures.english_share(mixtures.read_mixture(store.require(k)), RECIPE.english) for k in keys]
        return AssetCheckResult(passed=shares[0] > shares[1] > shares[2],
                                metadata={f"english_share_{s}": v for s, v in zip(ENGLISH_ORDER, shares)})

    return english_share_ordering


mixture_assets = [build_mixture_asset(s) for s in RECIPE.data_stages]
mixture_checks = [build_mixture_check(s) for s in RECIPE.data_stages]
if set(ENGLISH_ORDER) <= set(RECIPE.data_stages):  # the paper's three decays, each with its own mixture
    mixture_checks.append(build_english_order_check())
