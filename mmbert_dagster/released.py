"""Released checkpoints a stage can continue from: ``init_from`` names a model instead of an earlier stage.

Three kinds of reference (:func:`parse_ref`):

* ``hf://org/name[@revision]`` — a Hugging Face model repository (e.g. ``hf://jhu-clsp/mmBERT-base``), fetched
  with ``huggingface_hub.snapshot_download`` into a cache under the artifact root. With ``HF_HUB_OFFLINE=1``
  only a cached snapshot is used; a missing one is one clear error saying so.
* a local Hugging Face folder (``config.json``, ``model.safetensors``, ``tokenizer.json``);
* a Composer checkpoint ``….pt`` of the FlexBERT layout (ModernBERT's and mmBERT's training code, e.g.
  ``jhu-clsp/mmBERT-checkpoints``: ``extension/mmbert-base-ext.pt`` is the pre-decay model) — converted by
  :mod:`mmbert_dagster.composer`, which loads the pickle with ``weights_only=True`` and an allow-list.

:func:`fetch_released` writes the model as a plain transformers ModernBERT folder (the format of every stage
checkpoint) plus ``released.json`` (the reference, its kind, the resolved revision), so a stage continues from
it exactly as from an earlier stage. The checkpoint decides the model: :func:`shape_from_config` reads the
shape from its ``config.json`` and :func:`reconcile_shape` refuses a recipe ``[model]`` that disagrees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from mmbert_dagster.train.export import CONFIG_FILE, WEIGHTS_FILE

HF_PREFIX = "hf://"
RELEASED_JSON = "released.json"
# what a model folder needs, and what else of it is copied (tokenizer files, the safetensors index of big models)
NEEDED_FILES = (CONFIG_FILE, "tokenizer.json")
COPIED_PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# the ModelShape fields and the config.json keys they come from
SHAPE_KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "intermediate": "intermediate_size",
              "heads": "num_attention_heads", "global_every": "global_attn_every_n_layers",
              "local_window": "local_attention"}


class ReleasedError(ValueError):
    """A released checkpoint that cannot be used; the message names the reference or file and the problem."""


@dataclass(frozen=True)
class ReleasedRef:
    kind: str  # "hf" | "folder" | "composer"
    location: str  # repo id (hf) or path
    revision: str | None = None  # hf only; None = the default branch

    @property
    def label(self) -> str:
        if self.kind == "hf":
            return f"{HF_PREFIX}{self.location}" + (f"@{self.revision}" if self.revision else "")
        return self.location


def is_released_ref(value: str) -> bool:
    """A reference rather than a stage name (stage names are ``[a-z][a-z0-9_]*``: no ``/``, ``.`` or ``:``)."""
    return bool(value) and (value.startswith(HF_PREFIX) or any(c in value for c in "/.:~"))


def parse_ref(value: str) -> ReleasedRef:
    """``hf://org/name[@revision]``, a ``.pt`` file (Composer) or a folder path (``~`` expanded)."""
    if value.startswith(HF_PREFIX):
        repo, _, revision = value[len(HF_PREFIX):].partition("@")
        if not _HF_REPO.match(repo):
            raise ReleasedError(f"{value}: not a Hugging Face model id; write hf://org/name or hf://org/name@revision")
        return ReleasedRef("hf", repo, revision or None)
    path = str(Path(value).expanduser())
    return ReleasedRef("composer" if path.endswith(".pt") else "folder", path)


def check_model_folder(folder: Path, label: str) -> dict:
    """The ``config.json`` of a usable ModernBERT folder; ReleasedError naming the folder and what it lacks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReleasedError(f"{label}: {folder} is not a folder (expected a Hugging Face model folder)")
    missing = [f for f in NEEDED_FILES if not (folder / f).is_file()]
    if not (folder / WEIGHTS_FILE).is_file() and not (folder / f"{WEIGHTS_FILE}.index.json").is_file():
        missing.append(WEIGHTS_FILE)
    if missing:
        raise ReleasedError(f"{label}: {folder} lacks {', '.join(missing)} — a released checkpoint is a Hugging Face "
                            f"ModernBERT folder with its weights (safetensors) and its fast tokenizer")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ReleasedError(f"{folder / CONFIG_FILE}: not valid JSON: {e}") from e
    if config.get("model_type") != "modernbert":
        raise ReleasedError(f"{folder / CONFIG_FILE}: model_type = {config.get('model_type')!r}; the training core "
                            f"continues ModernBERT checkpoints only (model_type 'modernbert')")
    return config


def _hf_snapshot(ref: ReleasedRef, cache_dir: Path, log: Callable[[str], None]) -> tuple[Path, str]:
    """(the snapshot folder, its commit) of an ``hf://`` reference, downloaded into ``cache_dir`` if needed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    log(f"{ref.label}: {'looking in the cache' if offline else 'fetching'} ({cache_dir})")
    try:
        folder = Path(snapshot_download(ref.location, revision=ref.revision, cache_dir=str(cache_dir),
                                        allow_patterns=list(COPIED_PATTERNS)))
    except LocalEntryNotFoundError as e:
        if offline:
            raise ReleasedError(
                f"{ref.label}: not in the cache under {cache_dir}, and HF_HUB_OFFLINE=1 forbids downloading it — "
                f"run once with HF_HUB_OFFLINE=0 (online), or set init_from to a local copy of the model folder"
            ) from e
        raise ReleasedError(f"{ref.label}: could not be fetched: {e}") from e
    except Exception as e:  # repository or revision not found, no network, gated model, ...
        raise ReleasedError(f"{ref.label}: could not be fetched: {type(e).__name__}: {e}") from e
    return folder, folder.name  # snapshots/<commit>


def fetch_released(value: str, out_dir: Path, *, cache_dir: Path, tokenizer_dir: Path | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """Write the released checkpoint ``value`` into the (empty) folder ``out_dir`` as a ModernBERT folder plus
    ``released.json``; returns that record. ``tokenizer_dir``: the tokenizer to give a Composer checkpoint that
    does not carry its own."""
    ref, out_dir = parse_ref(value), Path(out_dir)
    revision = None
    if ref.kind == "composer":
        from mmbert_dagster.composer import ConversionError, convert_composer_checkpoint

        if not Path(ref.location).is_file():
            raise ReleasedError(f"{ref.label}: Composer checkpoint does not exist")
        scratch = out_dir / ".converted"
        try:
            summary = convert_composer_checkpoint(ref.location, scratch, tokenizer_dir=tokenizer_dir)
        except ConversionError as e:
            raise ReleasedError(f"{ref.label}: {e}") from e
        log(f"{ref.label}: converted from the Composer (FlexBERT) layout: {summary.get('mapped')} tensors")
        source = scratch
    elif ref.kind == "hf":
        source, revision = _hf_snapshot(ref, cache_dir, log)
    else:
        source = Path(ref.location)
    config = check_model_folder(source, ref.label)
    copied = _copy_model_files(source, out_dir, COPIED_PATTERNS)
    if ref.kind == "composer":
        shutil.rmtree(source)
    record = {"reference": value, "kind": ref.kind, "location": ref.location, "revision": revision,
              "requested_revision": ref.revision, "files": copied,
              "shape": {k: config.get(v) for k, v in SHAPE_KEYS.items()}, "vocab_size": config.get("vocab_size")}
    (out_dir / RELEASED_JSON).write_text(json.dumps(record, indent=1))
    log(f"{ref.label}: {len(copied)} file(s) -> {out_dir}" + (f" (revision {revision})" if revision else ""))
    return record


def _copy_model_files(source: Path, out_dir: Path, patterns: Iterable[str]) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted({p.name for pattern in patterns for p in source.glob(pattern) if p.is_file()})
    for name in names:
        shutil.copy2(source / name, out_dir / name)  # resolves the hub cache's symlinks: real files in the artifact
    return names


def read_released(folder: Path) -> dict:
    return json.loads((Path(folder) / RELEASED_JSON).read_text())


def shape_from_config(config: dict, base):
    """The ``ModelShape`` of a checkpoint's ``config.json`` (``base``: a ModelShape whose other fields are kept);
    the local RoPE θ from transformers 5's ``rope_parameters`` (or the older ``local_rope_theta``)."""
    values = {field: int(config[key]) for field, key in SHAPE_KEYS.items() if key in config}
    rope = config.get("rope_parameters") or {}
    local = (rope.get("sliding_attention") or {}).get("rope_theta", config.get("local_rope_theta"))
    if local is not None:
        values["local_rope_theta"] = float(local)
    return replace(base, **values)


def reconcile_shape(recipe_shape, given: Iterable[str], config: dict, where: str):
    """The checkpoint's shape; ReleasedError naming both values where the recipe's ``[model]`` states a field
    (``given``) that differs — the checkpoint decides the model, so the recipe may only agree or be silent."""
    shape = shape_from_config(config, recipe_shape)
    wrong = [f"{f} = {getattr(recipe_shape, f)!r} but the checkpoint's config.json has {getattr(shape, f)!r}"
             for f in given if getattr(recipe_shape, f) != getattr(shape, f)]
    if wrong:
        raise ReleasedError(f"{where}: [model] disagrees with the released checkpoint: {'; '.join(wrong)} — drop "
                            f"those fields from [model] (the checkpoint decides the shape) or match them")
    return shape
