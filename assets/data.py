"""Data assets: raw corpus → filtered corpus → language-ID model and table → language statistics."""


import polars as pl
from dagster import AssetCheckResult, AssetExecutionContext, MaterializeResult, MetadataValue, asset, asset_check

from mmbert_dagster import mixtures
from mmbert_dagster.data import filtering, langid, scripts, sources
from mmbert_dagster.render import bar_chart_md
from mmbert_dagster.resources import ArtifactStore, Compute, CorpusSource, ExternalModels

from ._common import RECIPE, code_version, table_metadata


@asset(group_name="data", code_version=code_version(modules=(sources,)))
def raw_corpus(context: AssetExecutionContext, store: ArtifactStore, corpus: CorpusSource) -> MaterializeResult:
    """Normalized documents (doc_id, source, declared_lang, text) from the configured source, plus the held-out
    evaluation text that no training stage ever sees."""
    skips = sources.SkipCounter()
    with store.write("raw_corpus") as out:
        stats = sources.build_raw_corpus(corpus.documents(context.log.info, skips), out, corpus.heldout(),
                                         log=context.log.info)
    langs = sources.language_sizes(store.path("raw_corpus"))
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(store.path("raw_corpus"))),
            "source": corpus.kind,
            "docs": stats["docs"],
            "bytes": stats["bytes"],
            "declared_languages": stats["declared_languages"],
            "skipped_records": sum(skips.counts.values()),
            "skipped_by_reason": MetadataValue.json(skips.counts),
            "heldout_rows": stats["heldout_rows"],
            "largest_languages": table_metadata(langs, 15),
            "bytes_per_language": MetadataValue.md(bar_chart_md(
                langs.head(30).with_columns(mb=pl.col("bytes") / 1e6), "declared_lang", "mb",
                "30 largest declared languages", "MB")),
        }
    )


@asset_check(asset=raw_corpus, blocking=True, description="No held-out evaluation text occurs in training docs")
def heldout_not_in_training(store: ArtifactStore) -> AssetCheckResult:
    probes, leaks = sources.heldout_leaks(store.require("raw_corpus"))
    return AssetCheckResult(passed=not leaks,
                            metadata={"heldout_probes": probes, "leaks": len(leaks), "examples": str(leaks[:5])})


@asset(group_name="data", deps=[raw_corpus], code_version=code_version("filters", modules=(filtering, scripts)))
def filtered_corpus(context: AssetExecutionContext, store: ArtifactStore, compute: Compute) -> MaterializeResult:
    """datatrove: Unicode normalization, Gopher/FineWeb-style quality filters and MinHash deduplication; every
    dropped document is recorded with its filter and reason. Keeping no document at all is an error naming the
    filter and its settings (raised before the folder is committed: the previous version stays)."""
    with store.write("filtered_corpus") as out:
        report = filtering.filter_corpus(store.require("raw_corpus"), out, RECIPE.filters,
                                         store.work_dir("filtered_corpus"), workers=compute.data_workers,
                                         executor=compute.data_settings(),
                                         recipe_file=RECIPE.source_file, log=context.log.info)
    by_step, by_lang = filtering.drops_summary(report)
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(store.path("filtered_corpus"))),
            "docs_in": report.docs_in,
            "docs_out": report.docs_out,
            "bytes_in": report.bytes_in,
            "bytes_out": report.bytes_out,
            "kept_docs_share": report.docs_out / max(report.docs_in, 1),
            "data_executor": compute.data_executor,
            "drops_by_filter": table_metadata(by_step, 40),
            "drops_by_language": table_metadata(by_lang, 30),
            "seconds_per_step": MetadataValue.json(report.seconds_per_step),
        }
    )


@asset(group_name="data", deps=[filtered_corpus], code_version=code_version("lid", "seed", modules=(langid,)))
def language_id_model(
    context: AssetExecutionContext, store: ArtifactStore, external_models: ExternalModels
) -> MaterializeResult:
    """A fastText language classifier trained on the declared languages of the filtered corpus (or a user model
    such as GlotLID), with per-language confidence thresholds calibrated on held-out text."""
    docs = sources.read_docs(store.require("filtered_corpus"), ["doc_id", "declared_lang", "text"])
    user_model = external_models.lid_model_path or RECIPE.lid.model_path
    with store.write("language_id_model") as out:
        summary = langid.build_model(docs, out, RECIPE.lid, RECIPE.seed, user_model=user_model,
                                     log=context.log.info, warn=context.log.warning)
    worst = summary["thresholds"].drop_nulls("accuracy").sort("accuracy", "lang").head(15)
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(store.path("language_id_model"))),
            "user_supplied": bool(user_model),
            "labels": summary["labels"],
            "heldout_accuracy": summary["heldout_accuracy"],
            "heldout_macro_accuracy": summary["heldout_macro_accuracy"],
            "heldout_chunks": summary["heldout_chunks"],
            "train_seconds": summary["train_seconds"],
            "model_mb": round((store.path("language_id_model") / langid.MODEL_FILE).stat().st_size / 1e6, 1),
            "least_accurate_languages": table_metadata(worst, 15),
        }
    )


@asset(group_name="data", deps=[filtered_corpus, language_id_model], code_version=code_version("lid", modules=(langid,)))
def language_id_table(context: AssetExecutionContext, store: ArtifactStore, compute: Compute) -> MaterializeResult:
    """Per-document language, score, its language's threshold and whether it passed (labels only, drops nothing)."""
    docs = sources.read_docs(store.require("filtered_corpus"), ["doc_id", "source", "declared_lang", "text"])
    with store.write("language_id_table") as out:
        summary = langid.build_table(store.require("language_id_model"), docs, out, log=context.log.info,
                                     warn=context.log.warning,
                                     docs_files=filtering.docs_files(store.require("filtered_corpus")),
                                     executor=compute.data_settings(), work_dir=store.work_dir("language_id_table"),
                                     tasks=compute.data_workers)
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(langid.table_file(store.path("language_id_table")))),
            "docs": summary["docs"],
            "passed_share": summary["passed_share"],
            "agreement_with_declared": summary["agreement_with_declared"],
            "declared_languages_unknown_to_model": MetadataValue.json(summary["declared_languages_unknown_to_model"]),
            "predicted_languages": summary["table"]["lang"].n_unique(),
            "lowest_agreement": table_metadata(summary["per_lang"].sort("agreement", "declared_lang").head(15), 15),
        }
    )


@asset(
    group_name="data",
    deps=[filtered_corpus, language_id_table, "tokenizer"],
    code_version=code_version("tier_high", "tier_mid", extra=mixtures.sql_hash("language_stats")),
)
def language_stats(context: AssetExecutionContext, store: ArtifactStore) -> MaterializeResult:
    """sql/language_stats.sql: docs, tokens (bytes × the tokenizer's measured tokens per byte for the language),
    bytes and tier (high / mid / low) per language."""
    with store.write("language_stats") as out:
        stats = mixtures.build_language_stats(store.require("filtered_corpus"), store.require("language_id_table"),
                                              store.require("tokenizer"), out, RECIPE)
    tiers = stats.group_by("tier").agg(languages=pl.len(), docs=pl.col("docs").sum(), bytes=pl.col("bytes").sum(),
                                       tokens_est=pl.col("tokens_est").sum()).sort("bytes", descending=True)
    top = stats.head(40)
    context.log.info(f"{stats.height} languages; tiers: {tiers.to_dicts()}")
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(store.path("language_stats") / mixtures.STATS_FILE)),
            "languages": stats.height,
            "tokens_est": int(stats["tokens_est"].sum()),
            "tiers": table_metadata(tiers),
            "largest_languages": table_metadata(top, 40),
            "bytes_per_language": MetadataValue.md(
                bar_chart_md(top.with_columns(mb=pl.col("bytes") / 1e6), "lang", "mb", "40 largest languages", "MB")
            ),
        }
    )
