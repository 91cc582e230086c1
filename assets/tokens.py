"""Tokenizer and tokenized shards: each data stage's documents sampled by its mixture, tokenized with datatrove."""


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
from mmbert_dagster.data import filtering, langid, shard_reader, shards, tokenizer
from mmbert_dagster.recipe import DATA_FIELDS, RELEASED_KEY, mixture_key, shards_key
from mmbert_dagster.render import bar_chart_md
from mmbert_dagster.resources import ArtifactStore, Compute, ExternalModels

from ._common import RECIPE, code_version, table_metadata

ROUNDTRIP_SAMPLE = 64  # documents per shard set decoded back to text by the asset check


@asset(
    name="tokenizer",
    group_name="tokens",
    deps=["filtered_corpus", "language_id_table", *([RELEASED_KEY] if RECIPE.released else [])],
    code_version=code_version("tokenizer", "seed", modules=(tokenizer,), extra=RECIPE.released),
)
def tokenizer_asset(context: AssetExecutionContext, store: ArtifactStore, external_models: ExternalModels) -> MaterializeResult:
    """A byte-level BPE trained on a sample of every language (tiny preset), or a user-supplied tokenizer (e.g.
    Gemma-2's for the paper presets) — the released checkpoint's own when a stage continues one — saved as a
    Hugging Face tokenizer folder."""
    docs = langid.labelled_documents(store.require("filtered_corpus"), store.require("language_id_table"))
    user_path = external_models.tokenizer_path or RECIPE.tokenizer.pretrained_path
    if RECIPE.released and not user_path:
        user_path = str(store.require(RELEASED_KEY))  # the checkpoint decides the tokenizer
    with store.write("tokenizer") as out:
        info = tokenizer.build_tokenizer(docs.select("lang", "text").collect(), out, RECIPE.tokenizer, RECIPE.seed,
                                         user_path=user_path, log=context.log.info)
    metadata = {"path": MetadataValue.path(str(store.path("tokenizer")))}
    for k, v in info.items():
        metadata[k] = MetadataValue.json(v) if isinstance(v, (dict, list)) else v
    return MaterializeResult(metadata=metadata)


def build_shards_asset(stage_name: str) -> AssetsDefinition:
    key = shards_key(stage_name)

    @asset(
        name=key,
        group_name="tokens",
        deps=[mixture_key(stage_name), "tokenizer", "filtered_corpus", "language_id_table"],
        code_version=code_version("seed", *(f"stages.{stage_name}.{f}" for f in DATA_FIELDS), modules=(shards,)),
    )
    def _shards(context: AssetExecutionContext, store: ArtifactStore, compute: Compute) -> MaterializeResult:
        mixture = mixtures.read_mixture(store.require(mixture_key(stage_name)))
        with store.write(key) as out:
            info = shards.build_shards(
                filtering.docs_files(store.require("filtered_corpus")),
                langid.table_file(store.require("language_id_table")),
                mixture, store.require("tokenizer"), out, seed=RECIPE.seed, executor=compute.data_settings(),
                log=context.log.info,
            )
        per_lang = shard_reader.read_tokens_per_language(store.path(key))
        top = per_lang.head(30)
        return MaterializeResult(
            metadata={
                "path": MetadataValue.path(str(store.path(key))),
                "tokens": int(per_lang["tokens"].sum()),
                "documents": int(per_lang["docs"].sum()),
                "languages": per_lang.height,
                "tokens_budget": RECIPE.stage(stage_name).tokens,
                "seconds": info.get("seconds", 0.0),
                "tokens_per_language": table_metadata(per_lang, 40),
                "tokens_plot": MetadataValue.md(
                    bar_chart_md(top, "lang", "share", f"{key}: token share of the 30 largest languages", "share")
                ),
            }
        )

    return _shards


def build_roundtrip_check(stage_name: str):
    key = shards_key(stage_name)

    @asset_check(asset=AssetKey(key), name="shards_decode_to_text", blocking=True,
                 description="Sampled documents decode from the shards back to their filtered text")
    def _check(store: ArtifactStore) -> AssetCheckResult:
        sampled, mismatched = shard_reader.roundtrip_mismatches(store.require(key), store.require("tokenizer"),
                                                          store.require("filtered_corpus"), ROUNDTRIP_SAMPLE)
        return AssetCheckResult(
            passed=not mismatched,
            metadata={"sampled": sampled, "mismatched": len(mismatched), "examples": str(mismatched[:5])},
        )

    return _check


shards_assets = [build_shards_asset(s) for s in RECIPE.data_stages]
shards_checks = [build_roundtrip_check(s) for s in RECIPE.data_stages]
