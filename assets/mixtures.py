"""Per-stage token mixtures: temperature sampling over each stage's language set (sql/stage_mixture.sql)."""


import polars as pl
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from mmbert_dagster import mixtures
from mmbert_dagster.recipe import STAGES
from mmbert_dagster.report import bar_chart_md, md_table
from mmbert_dagster.resources import ArtifactStore

from ._common import RECIPE, code_version

# Only the fields a mixture depends on, so that changing e.g. a mask rate does not mark mixtures stale.
MIXTURE_FIELDS = ("languages", "tau", "tokens", "max_repeat", "english_boost")


def mixture_code_version(stage: str) -> str:
    return code_version(
        "english", *(f"stages.{stage}.{f}" for f in MIXTURE_FIELDS), extra=mixtures.sql_hash("stage_mixture")
    )


def read_mixture(store: ArtifactStore, stage: str) -> pl.DataFrame:
    return pl.read_parquet(store.require(f"mixture_{stage}") / "mixture.parquet")


def build_mixture_asset(stage_name: str) -> AssetsDefinition:
    key = f"mixture_{stage_name}"

    @asset(name=key, group_name="mixtures", deps=["language_stats"], code_version=mixture_code_version(stage_name))
    def _mixture(context: AssetExecutionContext, store: ArtifactStore) -> MaterializeResult:
        stage = RECIPE.stage(stage_name)
        stats = pl.read_parquet(store.require("language_stats") / "language_stats.parquet")
        mix = mixtures.stage_mixture(stats, stage, RECIPE)
        with store.write(key) as out:
            mix.write_parquet(out / "mixture.parquet")
        english = mixtures.english_share(mix, RECIPE.english)
        by_tier = mix.group_by("tier").agg(languages=pl.len(), share=pl.col("share").sum()).sort("share", descending=True)
        top = mix.head(30)
        context.log.info(f"{key}: {mix.height} languages, τ={stage.tau}, English share {english:.3f}")
        return MaterializeResult(
            metadata={
                "path": MetadataValue.path(str(store.path(key) / "mixture.parquet")),
                "languages": mix.height,
                "tau": stage.tau,
                "tokens_budget": stage.tokens,
                "english_share": english,
                "capped_languages": int(mix["capped"].sum()),
                "max_repeat_factor": float(mix["repeat_factor"].max()),
                "share_by_tier": MetadataValue.md(md_table(by_tier)),
                "shares": MetadataValue.md(md_table(mix.drop("stage"), 40)),
                "shares_plot": MetadataValue.md(
                    bar_chart_md(top, "lang", "share", f"{stage_name}: 30 largest shares (τ={stage.tau})", "share")
                ),
            }
        )

    return _mixture


def build_mixture_check(stage_name: str):
    key = f"mixture_{stage_name}"

    @asset_check(asset=AssetKey(key), name="mixture_is_valid", blocking=True,
                 description="Shares sum to 1, every stage language is present, repeat factors within the cap")
    def _check(store: ArtifactStore) -> AssetCheckResult:
        stats = pl.read_parquet(store.require("language_stats") / "language_stats.parquet")
        mix = read_mixture(store, stage_name)
        problems = mixtures.mixture_problems(mix, RECIPE.stage(stage_name), stats)
        return AssetCheckResult(
            passed=not problems,
            metadata={"problems": "; ".join(problems) or "none", "share_sum": float(mix["share"].sum())},
        )

    return _check


mixture_assets = [build_mixture_asset(s) for s in STAGES]
mixture_checks = [build_mixture_check(s) for s in STAGES]


@asset_check(
    asset=AssetKey("mixture_decay_all"),
    additional_deps=[AssetKey("mixture_decay_eng"), AssetKey("mixture_decay_cont")],
    description="English share ordered Decay-Eng > Decay-Cont > Decay-All (paper: 17.9 %, 13.2 %, 10.2 %)",
)
def english_share_ordering(store: ArtifactStore) -> AssetCheckResult:
    shares = {s: mixtures.english_share(read_mixture(store, s), RECIPE.english) for s in ("decay_eng", "decay_cont", "decay_all")}
    return AssetCheckResult(
        passed=shares["decay_eng"] > shares["decay_cont"] > shares["decay_all"],
        metadata={f"english_share_{k}": v for k, v in shares.items()},
    )
