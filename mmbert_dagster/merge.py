"""TIES merging of the decay variants (mmBERT's final model), and the plain average it is compared with, through
mergekit.

TIES (Yadav et al., 2023) relative to a base model (the mid-training checkpoint), per tensor:

1. task vectors ``d_i = θ_i - θ_base`` for each model ``i``;
2. **trim**: keep the ``density`` fraction of each ``d_i`` with the largest magnitudes (0.8 = drop the 20 %
   smallest), zero the rest;
3. **elect** a sign per parameter: the sign of the weighted sum ``Σ w_i d_i`` (the total magnitude; ties -> +);
4. **disjoint mean**: average, with weights ``w_i``, only the deltas whose sign agrees with the elected one;
5. add ``scale × merged delta`` back to ``θ_base``.

Why mergekit and not our own code: it implements exactly these steps (``merge_method: ties`` with ``normalize``
= disjoint weighted mean), it is the tool the mmBERT authors and most merge papers use, and it works with
ModernBERT on our pinned stack through its architecture inference (it has no ModernBERT JSON definition; it
infers the layer templates from the weights — measured: identical, to 1e-6, to a hand-written TIES on the tiny
checkpoints; see tests/test_merge.py). What it does not do, we do here: check that the inputs are the same
architecture and tokenizer before merging (mergekit would merge mismatched vocabularies or fail deep inside),
keep our config.json (context and RoPE θ of the base), and write the folder atomically (the caller's
``atomic_dir``).

``method = "linear"`` (the ablation "TIES vs averaging"): mergekit's ``linear``, the weighted mean of the
models' weights, ``Σ w_i θ_i / Σ w_i`` — no base, no trimming, no sign election.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from mmbert_dagster.data.tokenizer import TOKENIZER_FILE
from mmbert_dagster.train.export import CONFIG_FILE, WEIGHTS_FILE

# fields that must agree for a merge to make sense (shape and tokenizer); anything else may differ
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "global_attn_every_n_layers", "local_attention")


class MergeError(ValueError):
    """The checkpoints cannot be merged; the message names the folder and the field."""


def _config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise MergeError(f"{folder}: not a Hugging Face model folder (no config.json)")
    return json.loads(path.read_text())


def check_mergeable(base: Path, models: Mapping[str, Path]) -> dict:
    """Raise MergeError unless every model has the base's shape and tokenizer; returns the base config."""
    base_cfg = _config(base)
    base_tok = (base / TOKENIZER_FILE).read_bytes() if (base / TOKENIZER_FILE).is_file() else None
    for name, folder in models.items():
        cfg = _config(folder)
        for key in SHAPE_FIELDS:
            if cfg.get(key) != base_cfg.get(key):
                raise MergeError(f"{folder}/config.json: {key} = {cfg.get(key)!r} but the base model {base} has "
                                 f"{base_cfg.get(key)!r}; only checkpoints of one architecture can be merged ({name})")
        tok = folder / TOKENIZER_FILE
        if base_tok is not None and tok.is_file() and tok.read_bytes() != base_tok:
            raise MergeError(f"{tok}: a different tokenizer than the base model's ({base / TOKENIZER_FILE}); "
                             f"token ids would not line up ({name})")
    return base_cfg


def mergekit_config(base: Path, models: Mapping[str, Path], weights: Mapping[str, float], density: float,
                    scale: float, method: str = "ties") -> dict:
    """The mergekit YAML (as a dict) for TIES with a disjoint weighted mean, or for a weighted average."""
    if method == "linear":
        return {"merge_method": "linear",
                "models": [{"model": str(models[name]), "parameters": {"weight": float(weights[name])}}
                           for name in models],
                "parameters": {"normalize": True}, "dtype": "float32", "out_dtype": "float32"}
    if method != "ties":
        raise MergeError(f"unknown merge method {method!r}; methods are ties, linear")
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(models[name]), "parameters": {"weight": float(weights[name]),
                                                               "density": float(density)}}
                   for name in models],
        "parameters": {"normalize": True, "lambda": float(scale)},
        "dtype": "float32",
        "out_dtype": "float32",
    }


def ties_reference(base, tensors, weights, density: float, scale: float = 1.0):
    """TIES on one tensor, written out (torch), with mergekit's conventions: keep the ``int(density * n)``
    largest-magnitude deltas of each model, elected sign = sign of the weighted sum (0 counts as +), weighted mean
    of the agreeing deltas. An independent re-computation used to verify mergekit's output (the asset check)."""
    import torch

    deltas = []
    for t in tensors:
        d = (t - base).float().flatten()
        k = max(1, int(density * d.numel())) if density < 1 else d.numel()
        keep = torch.zeros_like(d)
        keep[torch.argsort(d.abs(), descending=True)[:k]] = 1
        deltas.append(d * keep)
    d = torch.stack(deltas)
    w = torch.tensor([float(x) for x in weights]).view(-1, 1)
    majority = torch.where((d * w).sum(0) >= 0, 1.0, -1.0)
    agree = (d.sign() == majority).float()
    den = (w * agree).sum(0)
    den[den.abs() < 1e-8] = 1.0
    merged = (d * w * agree).sum(0) / den
    return (base.float().flatten() + scale * merged).view_as(base)


def linear_reference(tensors, weights):
    """The weighted mean of one tensor of every model (mergekit ``linear`` with ``normalize``)."""
    import torch

    w = torch.tensor([float(x) for x in weights]).view(-1, *([1] * tensors[0].dim()))
    return (torch.stack([t.float() for t in tensors]) * w).sum(0) / w.sum()


def merge_checkpoints(base: Path | str, models: Mapping[str, Path | str], out_dir: Path | str, *,
                      weights: Mapping[str, float], density: float = 0.8, scale: float = 1.0, method: str = "ties",
                      log=print) -> dict:
    """Merge ``models`` (name -> HF folder) into the (empty) folder ``out_dir``: TIES relative to ``base``, or
    (``method="linear"``) their weighted average (``base`` then gives only the config and tokenizer).

    Writes config.json (the base's), model.safetensors and the tokenizer files; returns a summary.
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    base, out_dir = Path(base), Path(out_dir)
    models = {name: Path(folder) for name, folder in models.items()}
    missing = sorted(set(models) - set(weights))
    if missing:
        raise MergeError(f"no merge weight for {missing}; weights are given for {sorted(weights)}")
    if not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1], got {density}")
    base_cfg = check_mergeable(base, models)
    config = mergekit_config(base, models, weights, density, scale, method)
    if method == "ties":
        log(f"TIES merge of {', '.join(models)} onto {base.name}: density {density}, weights "
            f"{dict(weights)}, scale {scale}")
    else:
        log(f"linear merge (weighted average) of {', '.join(models)}: weights {dict(weights)}")
    scratch = out_dir / ".mergekit"
    run_merge(MergeConfiguration.model_validate(config), str(scratch),
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=False,
                                   trust_remote_code=False, write_model_card=False, safe_serialization=True,
                                   quiet=True))
    weights_files = sorted(scratch.glob("*.safetensors"))
    if not weights_files:
        raise MergeError(f"mergekit wrote no safetensors into {scratch}")
    for f in weights_files + sorted(scratch.glob("*.safetensors.index.json")):
        shutil.move(str(f), out_dir / f.name)
    shutil.rmtree(scratch)
    (out_dir / "config.json").write_text(json.dumps(base_cfg, indent=2))  # the base's context and RoPE θ
    for f in base.iterdir():  # tokenizer files (the inputs share one, checked above)
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens")) or f.name == "vocab.json"):
            shutil.copy2(f, out_dir / f.name)
    (out_dir / "merge_config.json").write_text(json.dumps(config, indent=1))
    return {"method": method, "density": density, "scale": scale, "weights": dict(weights),
            "models": {k: str(v) for k, v in models.items()}, "base": str(base)}


def compare_with_reference(merged: Path, base: Path, models: Mapping[str, Path], *, weights: Mapping[str, float],
                           density: float, scale: float = 1.0, method: str = "ties",
                           max_elements: int = 4_000_000) -> dict:
    """Re-compute the merge for every tensor of up to ``max_elements`` with :func:`ties_reference` (or
    :func:`linear_reference`) and compare it with the merged folder's weights: ``{"tensors", "re_computed",
    "max_abs_difference", "non_finite"}``."""
    from safetensors.torch import load_file

    def weights_of(folder: Path) -> dict:
        return load_file(str(Path(folder) / WEIGHTS_FILE))

    out, ref_base = weights_of(merged), weights_of(base)
    inputs = {name: weights_of(folder) for name, folder in models.items()}
    worst, checked = 0.0, 0
    for key, t in out.items():
        if key not in ref_base or t.numel() > max_elements:
            continue
        tensors, w = [inputs[m][key] for m in models], [weights[m] for m in models]
        ref = (ties_reference(ref_base[key], tensors, w, density, scale) if method == "ties"
               else linear_reference(tensors, w))
        worst = max(worst, float((ref - t.float()).abs().max()))
        checked += 1
    return {"tensors": len(out), "re_computed": checked, "max_abs_difference": worst,
            "non_finite": [k for k, t in out.items() if not t.isfinite().all()]}
