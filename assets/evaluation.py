"""Merge and evaluation assets: merged_model (TIES of the stages in ``[merge] weights``), one asset per
``[merges.<key>]`` (e.g. the linear average of the ablations), onnx_model and benchmark_scores (every checkpoint
and merge the recipe defines, + the report), plus the nightly_eval schedule.

benchmark_scores depends directly on every checkpoint and on merged_model, and onnx_model (merged_model exported
to ONNX) directly on the stages merged_model merges, so ``--select decay_all+`` re-runs exactly decay_all,
merged_model, onnx_model and benchmark_scores (Dagster's ``+`` is one level downstream).
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
from mmbert_dagster.recipe import MERGED_MODEL, RELEASED_KEY, checkpoint_key, mixture_key
from mmbert_dagster.resources import ArtifactStore, Compute

from ._common import RECIPE, code_version, table_metadata

# every stage's checkpoint, in recipe order (after the released checkpoint the recipe continues, if any)
CHECKPOINTS = [RELEASED_KEY] * bool(RECIPE.released) + [checkpoint_key(s) for s in RECIPE.stages]
MERGES = list(RECIPE.merges)  # merged_model ([merge]) and the [merges.<key>] ones (and their seed replicas)
MERGED = {checkpoint_key(s): w for s, w in RECIPE.merge.weights.items()}  # merged_model's inputs -> weight
EVAL_MODULES = tuple(f"mmbert_dagster.evaluate.{m}" for m in ("encode", "metrics", "suite", "hf_tasks", "report",
                                                               "scores", "stats", "findings", "finetune",
                                                               "embeddings"))


def merge_inputs(key: str) -> tuple[str, dict[str, float]]:
    """(the base checkpoint, checkpoint key -> weight) of merge ``key``."""
    return (checkpoint_key(RECIPE.merge_base_of(key)),
            {checkpoint_key(s): w for s, w in RECIPE.merges[key].weights.items()})


def build_merge_asset(key: str):
    cfg = RECIPE.merges[key]
    base, weights = merge_inputs(key)
    what = ("TIES merge of the stages relative to the checkpoint they continue from (mergekit): trim to density, "
            "elect signs by total magnitude, average the agreeing deltas" if cfg.method == "ties" else
            "The weighted average of the stages' weights (mergekit linear): the baseline TIES is compared with")

    @asset(name=key, group_name="merge_eval", deps=[*weights, base], description=f"{what}.",
           code_version=code_version(f"merges.{key}", modules=("mmbert_dagster.merge",)))
    def _merge(context: AssetExecutionContext, store: ArtifactStore) -> MaterializeResult:
        from mmbert_dagster.merge import merge_checkpoints

        with store.write(key) as out:
            summary = merge_checkpoints(store.require(base), {k: store.require(k) for k in weights}, out,
                                        weights=weights, density=cfg.density, scale=cfg.scale, method=cfg.method,
                                        log=context.log.info)
        return MaterializeResult(metadata={
            "path": MetadataValue.path(str(store.path(key))),
            "method": f"{cfg.method} (mergekit)", "base": base, "density": cfg.density, "scale": cfg.scale,
            "weights": MetadataValue.json(summary["weights"]),
        })

    @asset_check(asset=_merge, name="merged_weights_match_reference", blocking=True,
                 description="Every merged weight is finite and equals an independent re-computation of the merge "
                             "(merge.ties_reference / linear_reference)")
    def _check(store: ArtifactStore) -> AssetCheckResult:
        from mmbert_dagster.merge import compare_with_reference

        result = compare_with_reference(store.require(key), store.require(base),
                                        {k: store.require(k) for k in weights}, weights=weights,
                                        density=cfg.density, scale=cfg.scale, method=cfg.method)
        return AssetCheckResult(passed=not result["non_finite"] and result["max_abs_difference"] <= 1e-5,
                                metadata={**result, "non_finite": str(result["non_finite"][:10])})

    return _merge, _check


merge_assets, merge_checks = map(list, zip(*(build_merge_asset(k) for k in MERGES)))


@asset(group_name="merge_eval", deps=[MERGED_MODEL, *MERGED, "raw_corpus"],  # the merged stages too: see above
       code_version=code_version("eval", modules=("mmbert_dagster.evaluate.onnx_export",)),
       description="The merged model exported to ONNX (model.onnx + config + tokenizer: onnxruntime or optimum's "
                   "ORTModelForMaskedLM serve it), with its parity to PyTorch on held-out text of every script "
                   "and onnxruntime-vs-PyTorch CPU throughput on the same batches.")
def onnx_model(context: AssetExecutionContext, store: ArtifactStore) -> MaterializeResult:
    from mmbert_dagster.evaluate.onnx_export import deploy

    with store.write("onnx_model") as out:
        report = deploy(store.require(MERGED_MODEL), out, sources.read_heldout(store.require("raw_corpus")),
                        batch_size=RECIPE.eval.onnx_batch_size, repeats=RECIPE.eval.onnx_repeats,
                        log=context.log.info)
    check, speed = report["parity"], report["throughput"]
    return MaterializeResult(metadata={
        "path": MetadataValue.path(str(store.path("onnx_model"))),
        "source": MERGED_MODEL, "opset": report["export"]["opset"],
        "size_mb": round(report["export"]["size_bytes"] / 1e6, 2),
        "max_abs_logit_diff": check["max_abs_diff"], "parity_texts": check["n_texts"],
        "onnxruntime_tokens_per_s": round(speed["ort_tokens_per_s"], 1),
        "pytorch_tokens_per_s": round(speed["torch_tokens_per_s"], 1),
        "speedup": round(speed["ratio"], 3), "threads": speed["threads"],
    })


@asset_check(asset=onnx_model, name="onnx_matches_pytorch", blocking=True,
             description="onnxruntime's logits equal PyTorch's (max |Δ| <= 1e-3, fp32) on held-out text of every "
                         "script, re-measured on the stored model.onnx")
def onnx_matches_pytorch(store: ArtifactStore) -> AssetCheckResult:
    from mmbert_dagster.evaluate.onnx_export import parity, script_sample

    result = parity(store.require(MERGED_MODEL), store.require("onnx_model"),
                    script_sample(sources.read_heldout(store.require("raw_corpus"))))
    return AssetCheckResult(passed=bool(result["ok"]), metadata=result)


@asset(group_name="merge_eval",
       deps=[*CHECKPOINTS, *MERGES, "onnx_model", "raw_corpus", "language_stats",
             *map(mixture_key, RECIPE.data_stages)],
       code_version=code_version("eval", "english", "seed", modules=EVAL_MODULES),
       description="Every checkpoint scored on held-out text per language and tier (masked-token accuracy, "
                   "cross-lingual retrieval, a cross-lingual probe, fine-tuned tasks over seeds, throughput, "
                   "optional online and MTEB tasks), the ONNX export's parity and speed-up, + the report.")
def benchmark_scores(context: AssetExecutionContext, store: ArtifactStore, compute: Compute) -> MaterializeResult:
    from mmbert_dagster.evaluate.onnx_export import read_report
    from mmbert_dagster.evaluate.report import REPORT_FILE
    from mmbert_dagster.evaluate.scores import score_checkpoints
    from mmbert_dagster.train.device import resolve_device

    models = {k: store.require(k) for k in [*CHECKPOINTS, *MERGES]}
    tiers = mixtures.tiers_of(mixtures.read_language_stats(store.require("language_stats")))
    with store.write("benchmark_scores") as out:
        scores = score_checkpoints(
            models, sources.read_heldout(store.require("raw_corpus")), tiers, RECIPE.eval, out,
            lineage=RECIPE.lineage(), english=RECIPE.english, seed=RECIPE.seed,
            mixtures={s: mixtures.read_mixture(store.require(mixture_key(s))) for s in RECIPE.data_stages},
            device=str(resolve_device(compute.device)),  # as training: "auto" = cuda if present
            groups=RECIPE.seed_groups(), deployment=(MERGED_MODEL, read_report(store.require("onnx_model"))),
            cache_dir=store.cache_dir("mteb"),
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
        "findings": table_metadata(scores.report.findings.select(
            "id", "finding", "metric", "tiers", "delta", "low", "high", "verdict", "n_langs", "n_texts", "n_seeds"), 40),
        "skipped": MetadataValue.json(scores.notes),
    })


@asset_check(asset=benchmark_scores, blocking=True,
             description="The score table has a row for every model x task (and finite values)")
def every_model_scored_on_every_task(store: ArtifactStore) -> AssetCheckResult:
    from mmbert_dagster.evaluate.scores import missing_rows, read_scores

    table = read_scores(store.require("benchmark_scores"))
    missing = missing_rows(table, [*CHECKPOINTS, *MERGES])
    bad = table.filter(~pl.col("value").is_finite()).height
    return AssetCheckResult(passed=not missing and bad == 0,
                            metadata={"missing": str(missing[:20]), "non_finite_values": bad, "rows": table.height,
                                      "models": len(CHECKPOINTS) + len(MERGES)})


# ---------------------------------------------------------------------------------------------- schedule

nightly_eval_job = define_asset_job(
    "nightly_eval_job", selection=AssetSelection.assets(*MERGES, "onnx_model", "benchmark_scores"),
    description="Re-score every checkpoint (and re-merge first where a merged stage changed since the last merge, "
                "and re-export onnx_model where merged_model is newer)")


def _latest_timestamp(instance, key: str) -> float | None:
    event = instance.get_latest_materialization_event(AssetKey(key))
    return event.timestamp if event else None


def stale_merges(instance) -> list[str]:
    """The merges never built, or with a merged stage materialized after them."""
    def stale(key: str) -> bool:
        merged = _latest_timestamp(instance, key)
        return merged is None or any((t := _latest_timestamp(instance, k)) is not None and t > merged
                                     for k in merge_inputs(key)[1])
    return [key for key in MERGES if stale(key)]


@schedule(cron_schedule="0 2 * * *", job=nightly_eval_job, execution_timezone="UTC", name="nightly_eval",
          default_status=DefaultScheduleStatus.RUNNING,
          description="Every night at 02:00 UTC: benchmark_scores, and first every merge that is stale and the "
                      "ONNX export of a newer merged_model")
def nightly_eval(context: ScheduleEvaluationContext):
    missing = [k for k in MERGED if _latest_timestamp(context.instance, k) is None]
    if missing:
        return SkipReason(f"nothing to evaluate yet: {', '.join(missing)} never materialized")
    keys = stale_merges(context.instance)
    exported = _latest_timestamp(context.instance, "onnx_model")
    if MERGED_MODEL in keys or exported is None or _latest_timestamp(context.instance, MERGED_MODEL) > exported:
        keys.append("onnx_model")
    keys.append("benchmark_scores")
    tick = context.scheduled_execution_time
    return RunRequest(run_key=f"nightly_eval:{tick.isoformat() if tick else 'manual'}",
                      asset_selection=[AssetKey(k) for k in keys], tags={"mmbert/trigger": "nightly_eval"})
