"""Training assets: one checkpoint per recipe stage, wired by the stage's ``init_from`` (and ``data_from``), all
trained by the one training core (``mmbert_dagster.train.stage_run.train_checkpoint``), in the `gpu` pool so two
stages never train on one device at once."""

import math

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from mmbert_dagster import mixtures
from mmbert_dagster.data import sources
from mmbert_dagster.recipe import RELEASED_KEY, checkpoint_key, mixture_key, shards_key
from mmbert_dagster.render import line_chart_md
from mmbert_dagster.resources import ArtifactStore, Compute
from mmbert_dagster.train import CORE_MODULES

from ._common import RECIPE, code_version

HELDOUT_DOCS = 64  # held-out UDHR articles (never trained on) scored for the held-out MLM loss
MIN_FILL_MASK_LANGS = 2


def stage_inputs(stage_name: str) -> dict[str, str]:
    """The upstream asset keys a stage trains from: role -> key (``init`` only when it continues a stage)."""
    data = RECIPE.data_stage(stage_name)
    init = RECIPE.stage(stage_name).init_from
    return {"shards": shards_key(data), "mixture": mixture_key(data), "tokenizer": "tokenizer",
            "raw_corpus": "raw_corpus", **({"init": checkpoint_key(init)} if init else {})}


def build_released_asset() -> AssetsDefinition:
    """``released_checkpoint``: the model ``init_from`` names (hf://, a folder or a Composer .pt) as a ModernBERT
    folder under the artifact root; its code version is the reference, its data version the resolved revision
    (or the files' digest), so a new revision shows downstream as a change."""
    ref = RECIPE.released

    @asset(name=RELEASED_KEY, group_name="training",
           code_version=code_version(extra=ref, modules=("mmbert_dagster.released", "mmbert_dagster.composer")),
           description=f"The released checkpoint {ref} (init_from), as a ModernBERT folder")
    def _released(context: AssetExecutionContext, store: ArtifactStore) -> MaterializeResult:
        from mmbert_dagster.artifacts import manifest_digest
        from mmbert_dagster.released import fetch_released

        with store.write(RELEASED_KEY) as out:
            record = fetch_released(ref, out, cache_dir=store.cache_dir("huggingface"), log=context.log.info)
        return MaterializeResult(
            metadata={"path": MetadataValue.path(str(store.path(RELEASED_KEY))), "reference": ref,
                      "kind": record["kind"], "revision": record["revision"] or "n/a",
                      "shape": MetadataValue.json(record["shape"]), "vocab_size": record["vocab_size"]},
            data_version=DataVersion(record["revision"] or manifest_digest(store.path(RELEASED_KEY))))

    return _released


def stage_shape(stage_name: str, store: ArtifactStore):
    """The model shape a stage trains: the recipe's, or the released checkpoint's when the stage descends from it
    (a recipe [model] field that disagrees with the checkpoint is an error naming both values)."""
    if not RECIPE.continues_released(stage_name):
        return RECIPE.model
    import json

    from mmbert_dagster.released import reconcile_shape

    config = json.loads((store.require(RELEASED_KEY) / "config.json").read_text())
    return reconcile_shape(RECIPE.model, RECIPE.model_fields, config, RECIPE.source_file)


def build_training_asset(stage_name: str) -> AssetsDefinition:
    key, inputs = checkpoint_key(stage_name), stage_inputs(stage_name)
    version = code_version("model", "seed", f"stages.{stage_name}", modules=CORE_MODULES)

    @asset(name=key, group_name="training", deps=list(inputs.values()), pool="gpu", code_version=version)
    def _train(context: AssetExecutionContext, store: ArtifactStore, compute: Compute) -> MaterializeResult:
        from mmbert_dagster.train.stage_run import discard_work_dir, reusable_checkpoint, train_checkpoint

        stage = RECIPE.stage(stage_name)
        up = {role: store.require(k) for role, k in inputs.items()}
        upstream = {inputs[r]: up[r] for r in ("shards", "tokenizer", "init") if r in up}
        result = reusable_checkpoint(store.path(key), upstream, version) if compute.reuse_checkpoints else None
        reused = result is not None
        if reused:
            context.log.info(f"{key}: reusing {store.path(key)} — trained from the same inputs and code version "
                             f"(compute.reuse_checkpoints)")
        else:
            langs = mixtures.read_mixture(up["mixture"])["lang"].to_list()
            with store.write(key) as out:
                result = train_checkpoint(
                    stage, stage_shape(stage_name, store), shards_dir=up["shards"], tokenizer_dir=up["tokenizer"],
                    init_from=up.get("init"), upstream=upstream, out_dir=out, work_dir=store.work_dir(key),
                    heldout_texts=sources.heldout_texts(up["raw_corpus"], langs, HELDOUT_DOCS),
                    seed=RECIPE.stage_seed(stage_name), settings=compute.train_settings(), version=version,
                    log=context.log.info)
            discard_work_dir(store.work_dir(key))  # the resume state now travels in the checkpoint's trainer_state/
        return MaterializeResult(metadata={**training_metadata(key, result, store), "reused": reused})

    return _train


def training_metadata(key: str, result, store: ArtifactStore) -> dict:
    from mmbert_dagster.evaluate.fill_mask import languages_filled, probes_markdown

    m, stage = result.metrics, RECIPE.stage(result.metrics["stage"])
    return {
        "path": MetadataValue.path(str(store.path(key))),
        "init_from": checkpoint_key(stage.init_from) if stage.init_from else "random init",
        "steps": m["steps"],
        "tokens": m["tokens"],
        "tokens_per_s": round(m["tokens_per_s"], 1),
        "initial_loss": m["initial_loss"],
        "final_loss": m["final_loss"],
        # None when the source has no held-out text (heldout_path unset for a local/HF source)
        "heldout_loss": m["heldout_loss"] if m["heldout_loss"] is not None else "not measured",
        "seconds": round(m["seconds"], 1),
        "mask_rate": stage.mask_rate,
        "context_length": stage.context_length,
        "rope_theta": stage.rope_theta,
        "local_rope_theta": stage.local_rope_theta or "the initial model's",
        "loss_curve": MetadataValue.md(line_chart_md(m["losses"], f"{key}: training loss", "step", "MLM loss")),
        "fill_mask": MetadataValue.md(probes_markdown(result.probes)),
        "fill_mask_hits": result.probe_hits,
        "fill_mask_languages": ", ".join(languages_filled(result.probes)) or "none",
    }


def build_training_checks(key: str) -> list:
    @asset_check(asset=AssetKey(key), name="loss_is_finite", blocking=True,
                 description="Every step's training loss and the held-out loss are finite (else nothing downstream runs)")
    def _finite(store: ArtifactStore) -> AssetCheckResult:
        from mmbert_dagster.train.export import read_summary

        summary = read_summary(store.require(key))
        bad = [i + 1 for i, x in enumerate(summary["losses"]) if not math.isfinite(x)]
        heldout = summary["heldout_loss"]
        return AssetCheckResult(
            passed=not bad and (heldout is None or math.isfinite(heldout)),
            metadata={"non_finite_steps": str(bad[:20]),
                      "heldout_loss": heldout if heldout is not None else "not measured (no held-out text)"},
        )

    @asset_check(asset=AssetKey(key), name="loss_decreased",
                 description="The mean loss of the last 20 % of steps is below that of the first 20 % (a warning, "
                             "not a stop: short tiny-preset decays are noisy)")
    def _decreased(store: ArtifactStore) -> AssetCheckResult:
        from mmbert_dagster.train.export import read_summary
        from mmbert_dagster.train.metrics import loss_ends

        summary = read_summary(store.require(key))
        first, last = loss_ends(summary["losses"])
        return AssetCheckResult(
            passed=last < first, severity=AssetCheckSeverity.WARN,
            metadata={"loss_first_steps": first, "loss_last_steps": last, "steps": len(summary["losses"])},
        )

    @asset_check(asset=AssetKey(key), name="fills_masked_words",
                 description="The checkpoint fills in the masked word of a held-out sentence (top 5) in at least "
                             f"{MIN_FILL_MASK_LANGS} languages (a warning: a model still at the unigram plateau fails)")
    def _fills(store: ArtifactStore) -> AssetCheckResult:
        from mmbert_dagster.evaluate.fill_mask import languages_filled
        from mmbert_dagster.train.export import read_probes

        probes = read_probes(store.require(key))
        filled = languages_filled(probes)
        return AssetCheckResult(passed=len(filled) >= MIN_FILL_MASK_LANGS, severity=AssetCheckSeverity.WARN,
                                metadata={"languages_filled": ", ".join(filled) or "none",
                                          "sentences_hit": f"{sum(r.hit for r in probes)}/{len(probes)}"})

    return [_finite, _decreased, _fills]


training_assets = [build_training_asset(s) for s in RECIPE.stages] + ([build_released_asset()] if RECIPE.released
                                                                     else [])
training_checks = [check for s in RECIPE.stages for check in build_training_checks(checkpoint_key(s))]
