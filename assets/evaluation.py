"""Merge and evaluation assets: merged_model (TIES of the decay variants) and benchmark_scores (+ the report),
plus the nightly_eval schedule.

benchmark_scores depends directly on the three decays and merged_model, so ``--select decay_all+`` re-runs
exactly decay_all, merged_model and benchmark_scores. The pre-/mid-training checkpoints are scored as reference
rows when they exist, without being declared dependencies (they are upstream of every decay anyway).
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

from mmbert_dagster.resources import ArtifactStore, Compute

from ._common import RECIPE, code_version

DECAYS = ("decay_eng", "decay_cont", "decay_all")
REFERENCE_MODELS = ("pretrain_checkpoint", "midtrain_checkpoint")  # scored when present, not dependencies
SCORES = "scores.parquet"
EVAL_MODULES = tuple(f"mmbert_dagster.evaluate.{m}" for m in ("encode", "benchmarks", "suite", "hf_tasks", "report"))


@asset(group_name="merge_eval", deps=[*DECAYS, "midtrain_checkpoint"],
       code_version=code_version("merge", modules=("mmbert_dagster.merge",)),
       description="TIES merge of the decay variants relative to the mid-training checkpoint (mergekit): trim to "
                   "[merge].density, elect signs by total magnitude, average the agreeing deltas.")
def merged_model(context: AssetExecutionContext, store: ArtifactStore) -> MaterializeResult:
    from mmbert_dagster.merge import ties_merge

    cfg = RECIPE.merge
    models = {name: store.require(name) for name in cfg.weights}
    with store.write("merged_model") as out:
        summary = ties_merge(store.require("midtrain_checkpoint"), models, out, weights=cfg.weights,
                             density=cfg.density, scale=cfg.scale, log=context.log.info)
    return MaterializeResult(metadata={
        "path": MetadataValue.path(str(store.path("merged_model"))),
        "method": "TIES (mergekit)", "density": cfg.density, "scale": cfg.scale,
        "weights": MetadataValue.json(summary["weights"]),
    })


MAX_CHECKED_ELEMENTS = 4_000_000  # tensors re-computed by the check (all of them at tiny size)


@asset_check(asset=merged_model, blocking=True,
             description="Every merged weight is finite and equals an independent TIES re-computation "
                         "(merge.ties_reference) — so equal inputs give the input back where deltas were kept")
def merged_weights_match_ties(store: ArtifactStore) -> AssetCheckResult:
    from safetensors.torch import load_file

    from mmbert_dagster.merge import ties_reference

    cfg = RECIPE.merge
    merged = load_file(str(store.require("merged_model") / "model.safetensors"))
    base = load_file(str(store.require("midtrain_checkpoint") / "model.safetensors"))
    inputs = {k: load_file(str(store.require(k) / "model.safetensors")) for k in cfg.weights}
    non_finite = [k for k, t in merged.items() if not t.isfinite().all()]
    worst, checked = 0.0, 0
    for key, t in merged.items():
        if key not in base or t.numel() > MAX_CHECKED_ELEMENTS:
            continue
        ref = ties_reference(base[key], [inputs[m][key] for m in cfg.weights], list(cfg.weights.values()),
                             cfg.density, cfg.scale)
        worst = max(worst, float((ref - t.float()).abs().max()))
        checked += 1
    return AssetCheckResult(passed=not non_finite and worst <= 1e-5,
                            metadata={"tensors": len(merged), "re_computed": checked, "max_abs_difference": worst,
                                      "non_finite": str(non_finite[:10])})


@asset(group_name="merge_eval", deps=[*DECAYS, "merged_model", "raw_corpus", "language_stats"],
       code_version=code_version("eval", "english", "seed", modules=EVAL_MODULES),
       description="Every checkpoint scored on held-out text per language and tier (masked-token accuracy, "
                   "cross-lingual retrieval, a cross-lingual probe, throughput, optional online tasks) + the report.")
def benchmark_scores(context: AssetExecutionContext, store: ArtifactStore, compute: Compute) -> MaterializeResult:
    from mmbert_dagster.evaluate.report import build_report, write_report
    from mmbert_dagster.evaluate.suite import evaluate
    from mmbert_dagster.train.loop import resolve_device

    heldout_path = store.require("raw_corpus") / "heldout.parquet"
    if not heldout_path.exists():
        raise FileNotFoundError(f"{heldout_path}: no held-out text; the benchmarks need held-out aligned text "
                                f"(the corpus resource's heldout_path)")
    stats = pl.read_parquet(store.require("language_stats") / "language_stats.parquet")
    tiers = dict(zip(stats["lang"].to_list(), stats["tier"].to_list()))
    models = {k: store.path(k) for k in REFERENCE_MODELS if (store.path(k) / "config.json").exists()}
    models |= {k: store.require(k) for k in (*DECAYS, "merged_model")}
    device = str(resolve_device(compute.device))  # the same choice as the training assets ("auto": cuda if present)
    table, notes = evaluate(models, pl.read_parquet(heldout_path), tiers, RECIPE.eval, english=RECIPE.english,
                            seed=RECIPE.seed, device=device, log=context.log.info)
    mixtures = {}
    for stage in RECIPE.stages:
        path = store.path(f"mixture_{stage}") / "mixture.parquet"
        if path.exists():
            mixtures[stage] = pl.read_parquet(path)
    report = build_report(table, checkpoints=models, mixtures=mixtures, notes=notes,
                          title=f"mmBERT-dagster run report — preset `{RECIPE.name}`")
    with store.write("benchmark_scores") as out:
        table.write_parquet(out / SCORES)
        write_report(report, out)
    report_path = store.path("benchmark_scores") / "report.md"
    context.log.info(f"report: {report_path}")
    summary = table.filter(pl.col("lang") == "*").select("model", "task", "tier", "metric", "value")
    return MaterializeResult(metadata={
        "path": MetadataValue.path(str(store.path("benchmark_scores"))),
        "report_path": MetadataValue.path(str(report_path)),
        "rows": table.height,
        "models": MetadataValue.json(list(models)),
        "report": MetadataValue.md(report.markdown_inline),
        "summary": MetadataValue.md(_summary_md(summary)),
        "skipped": MetadataValue.json(notes),
    })


def _summary_md(summary: pl.DataFrame) -> str:
    from mmbert_dagster.report import md_table

    wide = summary.filter(pl.col("tier") != "all").pivot(on="model", index=["task", "metric", "tier"],
                                                         values="value", aggregate_function="first")
    return md_table(wide.sort("task", "tier"), max_rows=60, float_digits=3)


@asset_check(asset=benchmark_scores, blocking=True,
             description="The score table has a row for every model x task (and finite values)")
def every_model_scored_on_every_task(store: ArtifactStore) -> AssetCheckResult:
    table = pl.read_parquet(store.require("benchmark_scores") / SCORES)
    models = [k for k in (*REFERENCE_MODELS, *DECAYS, "merged_model")
              if k in set(table["model"].to_list()) or k not in REFERENCE_MODELS]
    tasks = ["mlm", "retrieval", "topic_probe", "encode"]
    have = set(zip(table["model"].to_list(), table["task"].to_list()))
    missing = [f"{m}/{t}" for m in models for t in tasks if (m, t) not in have]
    bad = table.filter(~pl.col("value").is_finite()).height
    return AssetCheckResult(passed=not missing and bad == 0,
                            metadata={"missing": str(missing[:20]), "non_finite_values": bad, "rows": table.height,
                                      "models": len(models)})


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
    return any((t := _latest_timestamp(instance, k)) is not None and t > merged for k in RECIPE.merge.weights)


@schedule(cron_schedule="0 2 * * *", job=nightly_eval_job, execution_timezone="UTC", name="nightly_eval",
          default_status=DefaultScheduleStatus.RUNNING,
          description="Every night at 02:00 UTC: benchmark_scores, and merged_model first when it is stale")
def nightly_eval(context: ScheduleEvaluationContext):
    missing = [k for k in DECAYS if _latest_timestamp(context.instance, k) is None]
    if missing:
        return SkipReason(f"nothing to evaluate yet: {', '.join(missing)} never materialized")
    keys = (["merged_model"] if stale_merge(context.instance) else []) + ["benchmark_scores"]
    tick = context.scheduled_execution_time
    return RunRequest(run_key=f"nightly_eval:{tick.isoformat() if tick else 'manual'}",
                      asset_selection=[AssetKey(k) for k in keys], tags={"mmbert/trigger": "nightly_eval"})


evaluation_assets = [merged_model, benchmark_scores]
evaluation_checks = [merged_weights_match_ties, every_model_scored_on_every_task]
