"""What a finished stage writes into its output folder, and how to read it back.

* the Hugging Face files — ``config.json``, ``model.safetensors`` and the tokenizer's files: the folder loads with
  ``AutoModelForMaskedLM`` / ``pipeline("fill-mask")`` offline, without our code;
* ``trainer_summary.json`` — the stage's metrics (``loop.run_stage``'s return value);
* ``inputs.json`` — upstream artifact name -> digest of its ``MANIFEST.json`` (also in the resume folder);
* ``fill_mask.json`` — the fill-mask probes of the checkpoint (``evaluate.fill_mask``).

(``logs/`` is written by ``metrics``, ``trainer_state/`` by ``checkpoint``; ``stage_run`` lists them all.) The
readers import no torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mmbert_dagster.artifacts import MANIFEST
from mmbert_dagster.evaluate.fill_mask import ProbeResult, load_results, save_results

CONFIG_FILE = "config.json"  # the Hugging Face files of every checkpoint folder (ours, merged, released)
WEIGHTS_FILE = "model.safetensors"  # transformers' single-file weights
SUMMARY_JSON = "trainer_summary.json"
INPUTS_JSON = "inputs.json"
FILL_MASK_JSON = "fill_mask.json"


def write_hf_folder(model, tokenizer_dir: Path, out_dir: Path) -> None:
    """config.json + model.safetensors + the tokenizer files: loads with AutoModelForMaskedLM / pipeline offline."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file() and f.name != MANIFEST:
            shutil.copy2(f, out_dir / f.name)


def write_summary(out_dir: Path, metrics: dict) -> None:
    (Path(out_dir) / SUMMARY_JSON).write_text(json.dumps(metrics, indent=1))


def read_summary(folder: Path) -> dict:
    """The metrics of the stage whose output is ``folder`` (steps, tokens, losses, heldout_loss, ...)."""
    return json.loads((Path(folder) / SUMMARY_JSON).read_text())


def write_inputs(folder: Path, inputs: dict[str, str]) -> None:
    (Path(folder) / INPUTS_JSON).write_text(json.dumps(inputs, indent=1))


def read_inputs(folder: Path) -> dict[str, str]:
    """Upstream name -> MANIFEST digest of the artifacts a checkpoint (or a resume folder) was trained on."""
    return json.loads((Path(folder) / INPUTS_JSON).read_text())


def write_probes(folder: Path, probes: list[ProbeResult]) -> None:
    save_results(probes, Path(folder) / FILL_MASK_JSON)


def read_probes(folder: Path) -> list[ProbeResult]:
    """The fill-mask probe results of a checkpoint folder."""
    return load_results(Path(folder) / FILL_MASK_JSON)
