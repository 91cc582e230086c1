"""Training assets: one shared training core (mmbert_dagster.train.run_stage) for every stage, in the `gpu` pool
so two stages never train on one device at once."""

import hashlib
import json
import math
import shutil
from pathlib import Path

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

from mmbert_dagster.artifacts import MANIFEST
from mmbert_dagster.report import line_chart_md
from mmbert_dagster.resources import ArtifactStore, Compute

from ._common import RECIPE, code_version

# The training core's modules, hashed into the code version by file (imported only when a stage runs).
TRAINING_CORE = tuple(f"mmbert_dagster.train.{m}" for m in (
    "loop", "model", "attention", "packing", "masking", "schedule", "optim", "checkpoint", "distributed"))
SUMMARY_JSON = "trainer_summary.json"  # = mmbert_dagster.train.loop.SUMMARY_JSON

# asset key -> (stage, the checkpoint it continues from)
TRAINING = {
    "pretrain_checkpoint": ("pretrain", None),
    "midtrain_checkpoint": ("midtrain", "pretrain_checkpoint"),
    "decay_eng": ("decay_eng", "midtrain_checkpoint"),
    "decay_cont": ("decay_cont", "midtrain_checkpoint"),
    "decay_all": ("decay_all", "midtrain_checkpoint"),
}
HELDOUT_DOCS = 64  # held-out UDHR articles (never trained on) scored for the held-out MLM loss
FILL_MASK_FILE = "fill_mask.json"  # probe results, written into the checkpoint folder
MIN_FILL_MASK_LANGS = 2


def heldout_texts(store: ArtifactStore, langs: list[str]) -> list[str]:
    path = store.require("raw_corpus") / "heldout.parquet"
    if not path.exists():
        return []
    heldout = pl.read_parquet(path).filter(pl.col("declared_lang").is_in(langs)).sort("doc_id")
    step = max(1, heldout.height // HELDOUT_DOCS)
    return heldout["text"].to_list()[::step][:HELDOUT_DOCS]


def prepare_state_dir(state_dir: Path, store: ArtifactStore, upstream: list[str], log) -> dict:
    """Keep an interrupted run's resume state only if it was trained on the same upstream artifacts."""
    inputs = {key: hashlib.sha256((store.require(key) / MANIFEST).read_bytes()).hexdigest()[:16] for key in upstream}
    recorded = state_dir / "inputs.json"
    if state_dir.exists():
        if recorded.exists() and json.loads(recorded.read_text()) == inputs:
            log(f"found resume state for the same inputs in {state_dir}")
            return inputs
        log(f"discarding resume state in {state_dir}: it was trained on other inputs")
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True)
    recorded.write_text(json.dumps(inputs, indent=1))
    return inputs


def build_training_asset(key: str) -> AssetsDefinition:
    stage_name, init_key = TRAINING[key]
    deps = [f"shards_{stage_name}", f"mixture_{stage_name}", "tokenizer", "raw_corpus", *([init_key] if init_key else [])]

    @asset(name=key, group_name="training", deps=deps, pool="gpu",
           code_version=code_version("model", "seed", f"stages.{stage_name}", modules=TRAINING_CORE))
    def _train(context: AssetExecutionContext, store: ArtifactStore, compute: Compute) -> MaterializeResult:
        from mmbert_dagster.evaluate.fill_mask import languages_filled, probes_markdown, run_probes, save_results
        from mmbert_dagster.train import loop
        from mmbert_dagster.train.distributed import run_stage_distributed

        stage = RECIPE.stage(stage_name)
        mixture_langs = pl.read_parquet(store.require(f"mixture_{stage_name}") / "mixture.parquet")["lang"].to_list()
        # Resume state lives outside the artifact folder while training, so a killed run resumes from it; it is
        # only reused for the same inputs, and removed once the checkpoint is committed.
        state_dir = store.root_path() / ".work" / RECIPE.name / key
        inputs = prepare_state_dir(state_dir, store, [f"shards_{stage_name}", "tokenizer", *([init_key] if init_key else [])],
                                   context.log.info)
        kwargs = dict(
            shards_dir=store.require(f"shards_{stage_name}"), tokenizer_dir=store.require("tokenizer"),
            state_dir=state_dir, init_from=store.require(init_key) if init_key else None,
            heldout_texts=heldout_texts(store, mixture_langs), seed=RECIPE.seed, device=compute.device,
            checkpoint_every=compute.checkpoint_every, log=context.log.info,
        )
        with store.write(key) as out:
            launcher = compute.launcher()
            if launcher.distributed:
                metrics = run_stage_distributed(stage, RECIPE.model, launcher, out_dir=out, **kwargs)
            else:
                metrics = loop.run_stage(stage, RECIPE.model, out_dir=out, **kwargs)
            (out / "inputs.json").write_text(json.dumps(inputs, indent=1))
            probes = run_probes(out)
            save_results(probes, out / FILL_MASK_FILE)
            # DESIGN: the final resume state (optimizer, RNG, data position) travels beside the weights
            shutil.copytree(state_dir / "trainer_state", out / "trainer_state")
        shutil.rmtree(state_dir, ignore_errors=True)
        examples = probes_markdown(probes)
        filled, hits = languages_filled(probes), f"{sum(r.hit for r in probes)}/{len(probes)}"
        context.log.info(f"{key}: fill-mask probes: {hits} sentences hit, "
                         f"{len(filled)} language(s) filled ({', '.join(filled) or 'none'})\n{examples}")
        losses = metrics["losses"]
        return MaterializeResult(
            metadata={
                "path": MetadataValue.path(str(store.path(key))),
                "steps": metrics["steps"],
                "tokens": metrics["tokens"],
                "tokens_per_s": round(metrics["tokens_per_s"], 1),
                "initial_loss": metrics["initial_loss"],
                "final_loss": metrics["final_loss"],
                # None when the source has no held-out text (heldout_path unset for a local/HF source)
                "heldout_loss": metrics["heldout_loss"] if metrics["heldout_loss"] is not None else "not measured",
                "seconds": round(metrics["seconds"], 1),
                "mask_rate": stage.mask_rate,
                "context_length": stage.context_length,
                "rope_theta": stage.rope_theta,
                "loss_curve": MetadataValue.md(line_chart_md(losses, f"{key}: training loss", "step", "MLM loss")),
                "fill_mask": MetadataValue.md(examples),
                "fill_mask_hits": hits,
                "fill_mask_languages": ", ".join(filled) or "none",
            }
        )

    return _train


def read_summary(store: ArtifactStore, key: str) -> dict:
    return json.loads((store.require(key) / SUMMARY_JSON).read_text())


def build_training_checks(key: str) -> list:
    @asset_check(asset=AssetKey(key), name="loss_is_finite", blocking=True,
                 description="Every step's training loss and the held-out loss are finite (else nothing downstream runs)")
    def _finite(store: ArtifactStore) -> AssetCheckResult:
        summary = read_summary(store, key)
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
        from mmbert_dagster.train.metrics import loss_ends

        summary = read_summary(store, key)
        first, last = loss_ends(summary["losses"])
        return AssetCheckResult(
            passed=last < first, severity=AssetCheckSeverity.WARN,
            metadata={"loss_first_steps": first, "loss_last_steps": last, "steps": len(summary["losses"])},
        )

    @asset_check(asset=AssetKey(key), name="fills_masked_words",
                 description="The checkpoint fills in the masked word of a held-out sentence (top 5) in at least "
                             f"{MIN_FILL_MASK_LANGS} languages (a warning: a model still at the unigram plateau fails)")
    def _fills(store: ArtifactStore) -> AssetCheckResult:
        from mmbert_dagster.evaluate.fill_mask import languages_filled, load_results

        probes = load_results(store.require(key) / FILL_MASK_FILE)
        filled = languages_filled(probes)
        return AssetCheckResult(passed=len(filled) >= MIN_FILL_MASK_LANGS, severity=AssetCheckSeverity.WARN,
                                metadata={"languages_filled": ", ".join(filled) or "none",
                                          "sentences_hit": f"{sum(r.hit for r in probes)}/{len(probes)}"})

    return [_finite, _decreased, _fills]


training_assets = [build_training_asset(k) for k in TRAINING]
training_checks = [check for k in TRAINING for check in build_training_checks(k)]
