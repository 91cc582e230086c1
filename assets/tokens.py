"""Tokenizer and tokenized shards: each stage's documents sampled by its mixture, tokenized with datatrove."""


import unicodedata

import polars as pl
from tokenizers import Tokenizer
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

from mmbert_dagster.data import shards, sources, tokenizer
from mmbert_dagster.recipe import STAGES
from mmbert_dagster.report import bar_chart_md, md_table
from mmbert_dagster.resources import ArtifactStore, ExternalModels

from ._common import RECIPE, code_version
from .data import labelled_documents
from .mixtures import MIXTURE_FIELDS

ROUNDTRIP_SAMPLE = 64  # documents per shard set decoded back to text by the asset check


@asset(
    name="tokenizer",
    group_name="tokens",
    deps=["filtered_corpus", "language_id_table"],
    code_version=code_version("tokenizer", "seed", modules=(tokenizer,)),
)
def tokenizer_asset(context: AssetExecutionContext, store: ArtifactStore, external_models: ExternalModels) -> MaterializeResult:
    """A byte-level BPE trained on a sample of every language (tiny preset), or a user-supplied tokenizer (e.g.
    Gemma-2's for the paper presets), saved as a Hugging Face tokenizer folder."""
    user = external_models.tokenizer_path or RECIPE.tokenizer.pretrained_path
    docs = labelled_documents(store).select("lang", "text").collect()
    with store.write("tokenizer") as out:
        if user:
            info = tokenizer.load_pretrained_tokenizer(user, out, log=context.log.info)
        else:
            pairs = tokenizer.sample_for_tokenizer(docs, RECIPE.tokenizer, RECIPE.seed)
            info = tokenizer.train_tokenizer(pairs, out, RECIPE.tokenizer, log=context.log.info)
        # Measured tokens per byte of every language, for language_stats. In a subfolder: checkpoints copy the
        # tokenizer folder's files, not its folders.
        (out / "stats").mkdir()
        fertility = tokenizer.tokens_per_byte(out, docs, RECIPE.tokenizer, RECIPE.seed)
        fertility.write_parquet(out / tokenizer.FERTILITY_FILE)
    metadata = {"path": MetadataValue.path(str(store.path("tokenizer"))), "user_supplied": bool(user)}
    for k, v in info.items():
        metadata[k] = MetadataValue.json(v) if isinstance(v, (dict, list)) else v
    return MaterializeResult(metadata=metadata)



def build_shards_asset(stage_name: str) -> AssetsDefinition:
    key = f"shards_{stage_name}"

    @asset(
        name=key,
        group_name="tokens",
        deps=[f"mixture_{stage_name}", "tokenizer", "filtered_corpus", "language_id_table"],
        code_version=code_version("seed", *(f"stages.{stage_name}.{f}" for f in MIXTURE_FIELDS), modules=(shards,)),
    )
    def _shards(context: AssetExecutionContext, store: ArtifactStore) -> MaterializeResult:
        mixture = pl.read_parquet(store.require(f"mixture_{stage_name}") / "mixture.parquet")
        filtered = store.require("filtered_corpus")
        with store.write(key) as out:
            info = shards.build_shards(
                sorted(filtered.glob("docs*.parquet")),
                store.require("language_id_table") / "language_id.parquet",
                mixture, store.require("tokenizer"), out, seed=RECIPE.seed, log=context.log.info,
            )
        per_lang = pl.read_parquet(store.path(key) / "tokens_per_language.parquet").sort("tokens", descending=True)
        top = per_lang.head(30)
        return MaterializeResult(
            metadata={
                "path": MetadataValue.path(str(store.path(key))),
                "tokens": int(per_lang["tokens"].sum()),
                "documents": int(per_lang["docs"].sum()),
                "languages": per_lang.height,
                "tokens_budget": RECIPE.stage(stage_name).tokens,
                "seconds": info.get("seconds", 0.0),
                "tokens_per_language": MetadataValue.md(md_table(per_lang, 40)),
                "tokens_plot": MetadataValue.md(
                    bar_chart_md(top, "lang", "share", f"{key}: token share of the 30 largest languages", "share")
                ),
            }
        )

    return _shards


def build_roundtrip_check(stage_name: str):
    key = f"shards_{stage_name}"

    @asset_check(asset=AssetKey(key), name="shards_decode_to_text", blocking=True,
                 description="Sampled documents decode from the shards back to their filtered text")
    def _check(store: ArtifactStore) -> AssetCheckResult:
        reader = shards.ShardReader(store.require(key))
        tok = Tokenizer.from_file(str(store.require("tokenizer") / "tokenizer.json"))
        index = reader.documents()
        step = max(1, len(reader) // ROUNDTRIP_SAMPLE)
        positions = list(range(0, len(reader), step))[:ROUNDTRIP_SAMPLE]
        wanted = index[positions]["doc_id"].to_list()
        texts = dict(
            sources.read_docs(store.require("filtered_corpus"), ["doc_id", "text"])
            .filter(pl.col("doc_id").is_in(wanted)).collect().iter_rows()
        )
        mismatched = [
            doc_id for pos, doc_id in zip(positions, wanted)
            if unicodedata.normalize("NFC", reader.decode_document(pos, tok)) != unicodedata.normalize("NFC", texts[doc_id])
        ]
        return AssetCheckResult(
            passed=not mismatched,
            metadata={"sampled": len(positions), "mismatched": len(mismatched), "examples": str(mismatched[:5])},
        )

    return _check


shards_assets = [build_shards_asset(s) for s in STAGES]
shards_checks = [build_roundtrip_check(s) for s in STAGES]
