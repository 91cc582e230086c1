"""``train_checkpoint``: the whole life of a training asset, from upstream artifacts to a finished checkpoint folder.

1. The resume folder ``work_dir`` (outside the artifact, so a killed run resumes from it) is kept only when an
   interrupted run left it for the SAME inputs — the digests of the upstream artifacts' ``MANIFEST.json``,
   recorded in its ``inputs.json`` — and emptied otherwise.
2. The stage trains (``loop.run_stage``) in this process or in torchrun processes (``settings.launcher``),
   resuming from ``work_dir``, and writes the Hugging Face files, ``trainer_summary.json`` and ``logs/`` into
   ``out_dir`` (the caller's temporary folder, which the caller commits atomically).
3. Then ``inputs.json``, ``fill_mask.json`` (fill-mask probes, on the compute device) and ``trainer_state/`` (the
   final resume state: optimizer, RNG and data position travel beside the weights) join them. The caller removes
   the resume folder with :func:`discard_work_dir` once it has committed ``out_dir`` (a crash in between resumes
   at the last step instead of rerunning the stage).

A checkpoint folder, and the module that owns each name (read a file back with the reader beside its writer):

* ``config.json``, ``model.safetensors``, the tokenizer files — ``export.write_hf_folder`` / ``model.load_model``;
* ``trainer_summary.json`` — ``export.write_summary`` / ``export.read_summary``;
* ``logs/`` (``metrics.jsonl``, TensorBoard events) — ``metrics.MetricsLog`` / ``metrics.read_metrics``;
* ``trainer_state/`` — ``checkpoint.save_checkpoint`` / ``checkpoint.read_state`` (its ``state.json``);
* ``inputs.json`` — ``export.write_inputs`` / ``export.read_inputs``;
* ``fill_mask.json`` — ``export.write_probes`` / ``export.read_probes``.

(``export``'s readers import no torch: asset checks may use them.)

A checkpoint already committed from the same inputs and code version (``inputs.json``) can be reused instead
of retrained (:func:`reusable_checkpoint`; the compute resource's ``reuse_checkpoints``): training is
deterministic, so it would come out the same — this is how ``make repro`` adds ablations to the demo's graph
without training the demo's stages again.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmbert_dagster.artifacts import ArtifactError, manifest_digest, verify_artifact
from mmbert_dagster.evaluate.fill_mask import ProbeResult, languages_filled, probes_markdown, run_probes
from mmbert_dagster.recipe import ModelShape, Stage
from mmbert_dagster.train.checkpoint import TRAINER_STATE
from mmbert_dagster.train.device import resolve_device
from mmbert_dagster.train.distributed import Launcher, run_stage_distributed
from mmbert_dagster.train.export import (
    INPUTS_JSON,
    read_inputs,
    read_probes,
    read_summary,
    write_inputs,
    write_probes,
)
from mmbert_dagster.train.loop import DEFAULT_CHECKPOINT_EVERY, run_stage


@dataclass(frozen=True)
class TrainSettings:
    """How a stage trains on this machine — what the Compute resource decides, never what is trained."""

    device: str = "auto"  # auto (CUDA if present) | cpu | cuda
    micro_batch_tokens: int = 0  # tokens per micro-batch and rank; 0 = the device's default (device.py)
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY  # optimizer steps between resume checkpoints
    launcher: Launcher = field(default_factory=Launcher)  # one process: train in this one; more: torchrun


@dataclass(frozen=True)
class CheckpointResult:
    metrics: dict  # as in trainer_summary.json (loop.run_stage's metrics)
    probes: list[ProbeResult]  # as in fill_mask.json
    inputs: dict[str, str]  # as in inputs.json

    @property
    def probe_hits(self) -> str:
        return f"{sum(r.hit for r in self.probes)}/{len(self.probes)}"


def train_checkpoint(stage: Stage, shape: ModelShape, *, shards_dir: Path, tokenizer_dir: Path,
                     init_from: Path | None, upstream: dict[str, Path], out_dir: Path, work_dir: Path,
                     heldout_texts: Sequence[str], seed: int, settings: TrainSettings = TrainSettings(),
                     version: str = "", log: Callable[[str], None] = print) -> CheckpointResult:
    """Train ``stage`` into ``out_dir`` (see the module docstring); ``upstream``: name -> artifact folder of every
    input (shards, tokenizer, the init checkpoint), whose digests — with ``version``, the asset's code version
    (stage settings, shape, seed, training code) — decide whether ``work_dir`` may be resumed."""
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    inputs = prepare_work_dir(work_dir, checkpoint_inputs(upstream, version), log)
    run = dict(shards_dir=Path(shards_dir), tokenizer_dir=Path(tokenizer_dir), out_dir=out_dir, state_dir=work_dir,
               init_from=Path(init_from) if init_from else None, heldout_texts=list(heldout_texts), seed=seed,
               device=settings.device, micro_batch_tokens=settings.micro_batch_tokens,
               checkpoint_every=settings.checkpoint_every)
    if settings.launcher.distributed:
        metrics = run_stage_distributed(stage, shape, settings.launcher, log=log, **run)
    else:
        metrics = run_stage(stage, shape, log=log, **run)
    write_inputs(out_dir, inputs)
    probes = run_probes(out_dir, device=str(resolve_device(settings.device)))
    write_probes(out_dir, probes)
    shutil.copytree(work_dir / TRAINER_STATE, out_dir / TRAINER_STATE)
    result = CheckpointResult(metrics, probes, inputs)
    filled = languages_filled(probes)
    log(f"{stage.name}: fill-mask probes: {result.probe_hits} sentences hit, {len(filled)} language(s) filled "
        f"({', '.join(filled) or 'none'})\n{probes_markdown(probes)}")
    return result


def checkpoint_inputs(upstream: dict[str, Path], version: str = "") -> dict[str, str]:
    """What a checkpoint is trained from: upstream name -> its MANIFEST digest, and the code version."""
    return {**{name: manifest_digest(folder) for name, folder in upstream.items()},
            **({"code_version": version} if version else {})}


def reusable_checkpoint(folder: Path, upstream: dict[str, Path], version: str) -> CheckpointResult | None:
    """The committed checkpoint in ``folder`` if it is complete and was trained from the same upstream artifacts
    and code version; else None (missing, incomplete, or trained from something else)."""
    try:
        verify_artifact(folder)
        inputs = read_inputs(folder)
        if inputs != checkpoint_inputs(upstream, version):
            return None
        return CheckpointResult(read_summary(folder), read_probes(folder), inputs)
    except (ArtifactError, OSError, ValueError):
        return None


def prepare_work_dir(work_dir: Path, inputs: dict[str, str], log: Callable[[str], None]) -> dict[str, str]:
    """Keep ``work_dir``'s resume state only if it was trained from the same ``inputs``; return them."""
    if work_dir.exists():
        if (work_dir / INPUTS_JSON).is_file() and read_inputs(work_dir) == inputs:
            log(f"found resume state for the same inputs in {work_dir}")
            return inputs
        log(f"discarding resume state in {work_dir}: it was trained on other inputs")
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    write_inputs(work_dir, inputs)
    return inputs


def discard_work_dir(work_dir: Path) -> None:
    """Remove a stage's resume folder once its checkpoint is committed."""
    shutil.rmtree(work_dir, ignore_errors=True)
