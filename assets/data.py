"""Data assets: raw corpus → filtered corpus → language-ID model and table → language statistics."""


import json
import shutil

import polars as pl
import pyarrow.parquet as pq
from dagster import AssetCheckResult, AssetExecutionContext, MaterializeResult, MetadataValue, asset, asset_check

from mmbert_dagster import mixtures
from mmbert_dagster.data import filtering, langid, sources, tokenizer
from mmbert_dagster.report import bar_chart_md, md_table
from mmbert_dagster.resources import ArtifactStore, Compute, CorpusSource, ExternalModels

from ._common import RECIPE, code_version


@asset(group_name="data", code_version=code_version(modules=(sources,)))
def raw_corpus(context: AssetExecutionContext, store: ArtifactStore, corpus: CorpusSource) -> MaterializeResult:
    """Normalized documents (doc_id, source, declared_lang, text) from the configured source, plus the held-out
    evaluation text that no training stage ever sees."""
    skips = sources.SkipCounter()
    with store.write("raw_corpus") as out:
        stats = sources.write_raw_corpus(corpus.documents(context.log.info, skips), out, log=context.log.info)
        heldout = corpus.heldout()
        if heldout is not None:
            missing = set(sources.HELDOUT_SCHEMA.names) - set(pq.read_schema(heldout).names)
            if missing:
                raise sources.SourceError(f"{heldout}: held-out file lacks column(s) {sorted(missing)}")
            shutil.copyfile(heldout, out / "heldout.parquet")
    langs = sources.read_docs(store.path("raw_corpus")).group_by("declared_lang").agg(
        docs=pl.len(), bytes=pl.col("text").str.len_bytes().sum()
    ).sort("bytes", descending=True).collect()
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(store.path("raw_corpus"))),
            "source": corpus.kind,
            "docs": stats["docs"],
            "bytes": stats["bytes"],
            "declared_languages": stats["declared_languages"],
            "skipped_records": sum(skips.counts.values()),
            "skipped_by_reason": MetadataValue.json(skips.counts),
            "heldout_rows": pq.read_metadata(heldout).num_rows if heldout is not None else 0,
            "largest_languages": MetadataValue.md(md_table(langs, 15)),
            "bytes_per_language": MetadataValue.md(bar_chart_md(
                langs.head(30).with_columns(mb=pl.col("bytes") / 1e6), "declared_lang", "mb",
                "30 largest declared languages", "MB")),
        }
    )


def labelled_documents(store: ArtifactStore) -> pl.LazyFrame:
    """Filtered documents with their language-ID label, only those that passed their language's threshold."""
    lid = pl.scan_parquet(store.require("language_id_table") / "language_id.parquet").filter("passed")
    docs = sources.read_docs(store.require("filtered_corpus"), ["doc_id", "text"])
    return docs.join(lid.select("doc_id", "lang"), on="doc_id")


@asset_check(asset=raw_corpus, blocking=True, description="No held-out evaluation text occurs in training docs")
def heldout_not_in_training(store: ArtifactStore) -> AssetCheckResult:
    folder = store.require("raw_corpus")
    if not (folder / "heldout.parquet").exists():
        return AssetCheckResult(passed=True, metadata={"heldout_rows": 0})
    heldout = pl.read_parquet(folder / "heldout.parquet", columns=["declared_lang", "text"])
    # Compare on a 200-character probe from the middle of each held-out text, within the same language.
    probes = heldout.with_columns(probe=pl.col("text").str.slice(pl.col("text").str.len_chars() // 2 - 100, 200))
    probes = probes.filter(pl.col("probe").str.len_chars() >= 50)
    docs = sources.read_docs(folder, ["declared_lang", "text"]).filter(
        pl.col("declared_lang").is_in(probes["declared_lang"].unique().to_list())
    ).collect()
    by_lang = {lang: " ".join(g["text"].to_list()) for (lang,), g in docs.group_by("declared_lang")}
    leaks = [(lang, p[:60]) for lang, p in probes.select("declared_lang", "probe").iter_rows() if p in by_lang.get(lang, "")]
    return AssetCheckResult(
        passed=not leaks, metadata={"heldout_probes": probes.height, "leaks": len(leaks), "examples": str(leaks[:5])}
    )


@asset(group_name="data", deps=[raw_corpus], code_version=code_version("filters", modules=(filtering,)))
def filtered_corpus(context: AssetExecutionContext, store: ArtifactStore, compute: Compute) -> MaterializeResult:
    """datatrove: Unicode normalization, Gopher/FineWeb-style quality filters and MinHash deduplication; every
    dropped document is recorded with its filter and reason."""
    raw = store.require("raw_corpus")
    work = store.root_path() / ".work" / RECIPE.name / "filtered_corpus"
    with store.write("filtered_corpus") as out:
        report = filtering.run_filters(
            sorted((raw / "docs").glob("*.parquet")), out, RECIPE.filters, work,
            workers=compute.data_workers, log=context.log.info,
        )
    by_step = report.drops.group_by("step", "reason").agg(pl.col("docs").sum(), pl.col("bytes").sum()).sort(
        "docs", descending=True
    )
    by_lang = report.drops.pivot(on="step", index="declared_lang", values="docs", aggregate_function="sum").fill_null(0)
    by_lang = by_lang.with_columns(total=pl.sum_horizontal(pl.exclude("declared_lang"))).sort("total", descending=True)
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(store.path("filtered_corpus"))),
            "docs_in": report.docs_in,
            "docs_out": report.docs_out,
            "bytes_in": report.bytes_in,
            "bytes_out": report.bytes_out,
            "kept_docs_share": report.docs_out / max(report.docs_in, 1),
            "drops_by_filter": MetadataValue.md(md_table(by_step, 40)),
            "drops_by_language": MetadataValue.md(md_table(by_lang, 30)),
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
    train, held = langid.split_labelled(docs, RECIPE.lid)  # streams the documents
    user_model = external_models.lid_model_path or RECIPE.lid.model_path
    with store.write("language_id_model") as out:
        if user_model:
            context.log.info(f"using the user-supplied language ID model {user_model}")
            langid.install_user_model(user_model, out / "model.bin")
            seconds = 0.0
        else:
            context.log.info(f"training fastText on {len(train)} chunks in {len({lang for lang, _ in train})} languages")
            seconds = langid.train_model(train, out / "model.bin", RECIPE.lid, RECIPE.seed, held=held,
                                          log=context.log.warning)
        model = langid.load_model(out / "model.bin")
        thresholds, summary = langid.calibrate(model, held, RECIPE.lid)
        thresholds.write_parquet(out / "thresholds.parquet")
        summary.update(labels=len(model.get_labels()), train_chunks=len(train), train_seconds=round(seconds, 1))
        (out / "report.json").write_text(json.dumps(summary, indent=1))
    worst = thresholds.drop_nulls("accuracy").sort("accuracy").head(15)
    context.log.info(f"language ID held-out accuracy {summary['heldout_accuracy']:.3f}")
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(store.path("language_id_model"))),
            "user_supplied": bool(user_model),
            "labels": summary["labels"],
            "heldout_accuracy": summary["heldout_accuracy"],
            "heldout_macro_accuracy": summary["heldout_macro_accuracy"],
            "heldout_chunks": summary["heldout_chunks"],
            "train_seconds": summary["train_seconds"],
            "model_mb": round((store.path("language_id_model") / "model.bin").stat().st_size / 1e6, 1),
            "least_accurate_languages": MetadataValue.md(md_table(worst, 15)),
        }
    )


@asset(group_name="data", deps=[filtered_corpus, language_id_model], code_version=code_version("lid", modules=(langid,)))
def language_id_table(context: AssetExecutionContext, store: ArtifactStore) -> MaterializeResult:
    """Per-document language, score, its language's threshold and whether it passed (labels only, drops nothing)."""
    model_dir = store.require("language_id_model")
    model = langid.load_model(model_dir / "model.bin")
    thresholds = pl.read_parquet(model_dir / "thresholds.parquet")
    docs = sources.read_docs(store.require("filtered_corpus"), ["doc_id", "source", "declared_lang", "text"])
    batches = docs.collect_batches(chunk_size=5000)  # streamed: memory does not grow with the corpus
    table = langid.label_documents(model, thresholds, batches, log=context.log.info)
    summary, per_lang = langid.agreement(table, set(langid.model_labels(model)))
    if summary["declared_languages_unknown_to_model"]:
        context.log.warning(
            f"{summary['docs_with_declared_language_unknown_to_model']} documents declare languages the model does not "
            f"know: {summary['declared_languages_unknown_to_model'][:20]} (labelled anyway; excluded from agreement)"
        )
    with store.write("language_id_table") as out:
        table.write_parquet(out / "language_id.parquet", compression="zstd")
        per_lang.write_parquet(out / "agreement.parquet")
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(store.path("language_id_table") / "language_id.parquet")),
            "docs": summary["docs"],
            "passed_share": summary["passed_share"],
            "agreement_with_declared": summary["agreement_with_declared"],
            "declared_languages_unknown_to_model": MetadataValue.json(summary["declared_languages_unknown_to_model"]),
            "predicted_languages": table["lang"].n_unique(),
            "lowest_agreement": MetadataValue.md(md_table(per_lang.sort("agreement").head(15), 15)),
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
    docs_files = sorted(store.require("filtered_corpus").glob("docs*.parquet"))
    fertility = pl.read_parquet(store.require("tokenizer") / tokenizer.FERTILITY_FILE)  # measured by the tokenizer asset
    stats = mixtures.language_stats(
        docs_files, store.require("language_id_table") / "language_id.parquet", fertility, RECIPE
    )
    with store.write("language_stats") as out:
        stats.write_parquet(out / "language_stats.parquet")
    tiers = stats.group_by("tier").agg(languages=pl.len(), docs=pl.col("docs").sum(), bytes=pl.col("bytes").sum(),
                                       tokens_est=pl.col("tokens_est").sum()).sort("bytes", descending=True)
    top = stats.head(40)
    context.log.info(f"{stats.height} languages; tiers: {tiers.to_dicts()}")
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(store.path("language_stats") / "language_stats.parquet")),
            "languages": stats.height,
            "tokens_est": int(stats["tokens_est"].sum()),
            "tiers": MetadataValue.md(md_table(tiers)),
            "largest_languages": MetadataValue.md(md_table(top, 40)),
            "bytes_per_language": MetadataValue.md(
                bar_chart_md(top.with_columns(mb=pl.col("bytes") / 1e6), "lang", "mb", "40 largest languages", "MB")
            ),
        }
    )
