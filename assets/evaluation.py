"""Merge and evaluation assets: merged_model (TIES of the stages in ``[merge] weights``) and benchmark_scores
(every checkpoint the recipe defines, + the report), plus the nightly_eval schedule.

benchmark_scores depends directly on every checkpoint and on merged_model, so ``--select decay_all+`` re-runs
exactly decay_all, merged_model and benchmark_scores.
"""

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetKey,
    AssetSelection,
    DefaultScheduleStatus,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    asset,
    asset_check,
    define_asset_job,
    schedule,
)

from mmbert_dagster import mixtures
from mmbert_dagster.data import sources
from mmbert_dagster.recipe import checkpoint_key, mixture_key
from mmbert_dagster.resources import ArtifactStore, Compute

from ._common import RECIPE, code_version, table_metadata

MERGED = {checkpoint_key(s): w for s, w in RECIPE.merge.weights.items()}  # checkpoint key -> merge weight
MERGE_BASE = checkpoint_key(RECIPE.merge_base)  # task vectors are relative to this checkpoint
CHECKPOINTS = [checkpoint_key(s) for s in RECIPE.stages]  # every stage's checkpoint, in recipe order
EVAL_MODULES = tuple(f"mmbert_dagster.evaluate.{m}" for m in ("encode", "metrics", "suite", "hf_tasks", "report",
                                                               "scores"))


@asset(group_name="merge_eval", deps=[*MERGED, MERGE_BASE],
       code_version=code_version("merge", modules=("mmbert_dagster.merge",)),
       description="TIES merge of the [merge] stages relative to the checkpoint they continue from (mergekit): trim "
                   "to [merge].density, elect signs by total magnitude, average the agreeing deltas.")
def merged_model(context: AssetExecutionContext, store: ArtifactStore) -> MaterializeResult:
    from mmbert_dagster.merge import ties_merge

    cfg = RECIPE.merge
    with store.write("merged_model") as out:
        summary = ties_merge(store.require(MERGE_BASE), {k: store.require(k) for k in MERGED}, out, weights=MERGED,
                             density=cfg.density, scale=cfg.scale, log=context.log.info)
    return MaterializeResult(metadata={
        "path": MetadataValue.path(str(store.path("merged_model"))),
        "method": "TIES (mergekit)", "base": MERGE_BASE, "density": cfg.density, "scale": cfg.scale,
        "weights": MetadataValue.json(summary["weights"]),
    })


@asset_check(asset=merged_model, blocking=True,
             description="Every merged weight is finite and equals an independent TIES re-computation "
                         "(merge.ties_reference) — so equal inputs give the input back where deltas were kept")
def merged_weights_match_ties(store: ArtifactStore) -> AssetCheckResult:
    from mmbert_dagster.merge import compare_with_reference

    cfg = RECIPE.merge
    result = compare_with_reference(store.require("merged_model"), store.require(MERGE_BASE),
                                    {k: store.require(k) for k in MERGED}, weights=MERGED, density=cfg.density,
                                    scale=cfg.scale)
    return AssetCheckResult(passed=not result["non_finite"] and result["max_abs_difference"] <= 1e-5,
                            metadata={**result, "non_finite": str(result["non_finite"][:10])})


@asset(group_name="merge_eval",
       deps=[*CHECKPOINTS, "merged_model", "raw_corpus", "language_stats", *map(mixture_key, RECIPE.data_stages)],
       code_version=code_version("eval", "english", "seed", modules=EVAL_MODULES),
       description="Every checkpoint scored on held-out text per language and tier (masked-token accuracy, "
                   "cross-lingual retrieval, a cross-lingual probe, throughput, optional online tasks) + the report.")
def benchmark_scores(context: AssetExecutionContext, store: ArtifactStore, compute: Compute) -> MaterializeResult:
    from mmbert_dagster.evaluate.report import REPORT_FILE
    from mmbert_dagster.evaluate.scores import score_checkpoints
    from mmbert_dagster.train.device import resolve_device

    models = {k: store.require(k) for k in [*CHECKPOINTS, "merged_model"]}
    with store.write("benchmark_scores") as out:
        scores = score_checkpoints(
            models, sources.read_heldout(store.require("raw_corpus")),
            mixtures.tiers_of(mixtures.read_language_stats(store.require("language_stats"))), RECIPE.eval, out,
            lineage=RECIPE.lineage(), english=RECIPE.english, seed=RECIPE.seed,
            mixtures={s: mixtures.read_mixture(store.require(mixture_key(s))) for s in RECIPE.data_stages},
            device=str(resolve_device(compute.device)),  # as training: "auto" = cuda if present
            title=f"mmBERT-dagster run report — recipe `{RECIPE.name}`", log=context.log.info)
    report_path = store.path("benchmark_scores") / REPORT_FILE
    context.log.info(f"report: {report_path}")
    table = scores.table
    summary = table.filter((pl.col("lang") == "*") & (pl.col("tier") != "all"))
    wide = summary.pivot(on="model", index=["task", "metric", "tier"], values="value", aggregate_function="first")
    return MaterializeResult(metadata={
        "path": MetadataValue.path(str(store.path("benchmark_scores"))),
        "report_path": MetadataValue.path(str(report_path)),
        "rows": table.height,
        "models": MetadataValue.json(list(models)),
        "report": MetadataValue.md(scores.report.markdown_inline),
        "summary": table_metadata(wide.sort("task", "tier"), 60),
        "skipped": MetadataValue.json(scores.notes),
    })


@asset_check(asset=benchmark_scores, blocking=True,
             description="The score table has a row for every model x task (and finite values)")
def every_model_scored_on_every_task(store: ArtifactStore) -> AssetCheckResult:
    from mmbert_dagster.evaluate.scores import missing_rows, read_scores

    table = read_scores(store.require("benchmark_scores"))
    missing = missing_rows(table, [*CHECKPOINTS, "merged_model"])
    bad = table.filter(~pl.col("value").is_finite()).height
    return AssetCheckResult(passed=not missing and bad == 0,
                            metadata={"missing": str(missing[:20]), "non_finite_values": bad, "rows": table.height,
                                      "models": len(CHECKPOINTS) + 1})


# ---------------------------------------------------------------------------------------------- schedule

nightly_eval_job = define_asset_job(
    "nightly_eval_job", selection=AssetSelection.assets("merged_model", "benchmark_scores"),
    description="Re-score every checkpoint (and re-merge first when a decay variant changed since the last merge)")


def _latest_timestamp(instance, key: str) -> float | None:
    event = instance.get_latest_materialization_event(AssetKey(key))
    return event.timestamp if event else None


def stale_merge(instance) -> bool:
    """merged_model has never been built, or a decay variant was materialized after it."""
    merged = _latest_timestamp(instance, "merged_model")
    if merged is None:
        return True
    return any((t := _latest_timestamp(instance, k)) is not None and t > merged for k in MERGED)


@schedule(cron_schedule="0 2 * * *", job=nightly_eval_job, execution_timezone="UTC", name="nightly_eval",
          default_status=DefaultScheduleStatus.RUNNING,
          description="Every night at 02:00 UTC: benchmark_scores, and merged_model first when it is stale")
def nightly_eval(context: ScheduleEvaluationContext):
    missing = [k for k in MERGED if _latest_timestamp(context.instance, k) is None]
    if missing:
        return SkipReason(f"nothing to evaluate yet: {', '.join(missing)} never materialized")
    keys = (["merged_model"] if stale_merge(context.instance) else []) + ["benchmark_scores"]
    tick = context.scheduled_execution_time
    return RunRequest(run_key=f"nightly_eval:{tick.isoformat() if tick else 'manual'}",
                      asset_selection=[AssetKey(k) for k in keys], tags={"mmbert/trigger": "nightly_eval"})

