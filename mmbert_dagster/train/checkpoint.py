"""Trainer checkpoints: every piece of resume state in one ``state_dir/trainer_state/`` folder, swapped in atomically.

``trainer_state/`` holds

* ``model.safetensors`` + ``config.json`` — the weights (fp32; tied embeddings stored once) and model config;
* ``optimizer.pt`` — the optimizer state dict (loaded with ``torch.load(weights_only=True)``);
* ``rng.pt`` — python / numpy / torch / CUDA RNG states of every rank;
* ``state.json`` — ``state.TrainState``: step, tokens, the data position of every rank, the loss/lr history,
  seconds spent, and the run's identity (stage, shape, seed, world size) that a resume must match;
* ``MANIFEST.json`` — SHA-256 of each file (``artifacts.atomic_dir``): a torn or corrupted checkpoint is
  refused instead of loaded.

It is written to a temporary sibling and renamed into place (``artifacts.atomic_dir``), so a kill at any moment
leaves either the previous checkpoint or the new one. The learning rate is not stored: it is a pure function of
the step. Masking randomness is derived from the step (see ``masking``), so the RNG states matter only for
dropout, and are kept anyway.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from mmbert_dagster.artifacts import ArtifactError, atomic_dir, clean_stale_temporaries, verify_artifact

TRAINER_STATE = "trainer_state"
STATE_JSON = "state.json"


class CheckpointError(RuntimeError):
    """A trainer checkpoint that cannot be resumed; the message says why and what to do."""


def capture_rng() -> dict:
    """This process's RNG states, as types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    rng: list[dict]) -> Path:
    """Write ``state_dir/trainer_state`` atomically (replacing the previous one); ``rng``: one entry per rank."""
    final = Path(state_dir) / TRAINER_STATE
    with atomic_dir(final) as tmp:
        save_safetensors_model(model, str(tmp / "model.safetensors"))
        model.config.to_json_file(str(tmp / "config.json"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"ranks": rng}, tmp / "rng.pt")
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1))
    return final


def load_checkpoint(state_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device | str) -> tuple[dict, list[dict]] | None:
    """Load ``state_dir/trainer_state`` into ``model`` and ``optimizer``; ``(state, rng per rank)`` or ``None``.

    Leftover temporaries of a killed writer are cleaned first; a checkpoint failing its checksums raises.
    """
    state_dir = Path(state_dir)
    clean_stale_temporaries(state_dir, TRAINER_STATE)
    folder = state_dir / TRAINER_STATE
    if not folder.exists():
        return None
    try:
        verify_artifact(folder, TRAINER_STATE)
    except ArtifactError as e:
        raise CheckpointError(f"{folder}: unusable checkpoint ({e}); delete it to restart the stage") from e
    missing, unexpected = load_safetensors_model(model, str(folder / "model.safetensors"), strict=False,
                                                 device=str(device))
    if unexpected or [k for k in missing if k != "decoder.weight"]:  # decoder.weight is tied to the embeddings
        raise CheckpointError(f"{folder}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
    rng = torch.load(folder / "rng.pt", weights_only=True)["ranks"]
    return read_state(state_dir), rng


def read_state(state_dir: Path) -> dict:
    """``state_dir/trainer_state/state.json`` (``state.TrainState.to_dict()``), unverified: for reports and tests."""
    return json.loads((Path(state_dir) / TRAINER_STATE / STATE_JSON).read_text())
