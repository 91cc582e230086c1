"""The model: transformers' own ``ModernBertForMaskedLM`` (not a fork), configured from a ``ModelShape``.

* global attention every ``shape.global_every`` layers (layers 0, n, 2n, ...), the others local with a
  ``shape.local_window``-token window (``|i - j| <= window / 2``);
* RoPE θ per layer type: the stage's ``rope_theta`` on global layers, ``shape.local_rope_theta`` on local ones
  unless the stage sets its own ``local_rope_theta`` (mmBERT raises both to 160k at the context extension;
  transformers 5: ``config.rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``);
* ``max_position_embeddings`` = the stage's context length;
* special token ids set explicitly (pad / cls / sep / bos = cls / eos = sep, plus ``mask_token_id``);
* ``sparse_prediction=True``: the MLM head runs on masked positions only when labels are given (~2x faster).

The attention implementation is a runtime choice, never saved in ``config.json``: a saved folder loads with
plain ``AutoModelForMaskedLM.from_pretrained`` (SDPA) anywhere, without our code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM

from mmbert_dagster.recipe import ModelShape
from mmbert_dagster.train.attention import ATTN_NAME


def resolve_attn(attn: str) -> str:
    """``"auto"`` -> our packed per-document attention; ``"sdpa"`` / ``"eager"`` -> transformers' (padded)."""
    return ATTN_NAME if attn == "auto" else attn


def _rope(global_theta: float, local_theta: float) -> dict:
    return {
        "full_attention": {"rope_type": "default", "rope_theta": float(global_theta)},
        "sliding_attention": {"rope_type": "default", "rope_theta": float(local_theta)},
    }


def model_config(shape: ModelShape, vocab_size: int, special_ids: dict[str, int], context_length: int,
                 rope_theta: float) -> ModernBertConfig:
    missing = {"pad", "cls", "sep", "mask"} - set(special_ids)
    if missing:
        raise ValueError(f"special_ids lacks {sorted(missing)}; got {special_ids} "
                         f"(read them from the tokenizer folder)")
    return ModernBertConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        global_attn_every_n_layers=shape.global_every,
        local_attention=shape.local_window,
        max_position_embeddings=context_length,
        rope_parameters=_rope(rope_theta, shape.local_rope_theta),
        pad_token_id=special_ids["pad"],
        cls_token_id=special_ids["cls"],
        sep_token_id=special_ids["sep"],
        bos_token_id=special_ids.get("bos", special_ids["cls"]),
        eos_token_id=special_ids.get("eos", special_ids["sep"]),
        mask_token_id=special_ids["mask"],  # not a ModernBertConfig field; kept in config.json for readers
        sparse_prediction=True,
        tie_word_embeddings=True,
    )


def build_model(shape: ModelShape, vocab_size: int, special_ids: dict[str, int], context_length: int,
                rope_theta: float, attn: str = "auto") -> ModernBertForMaskedLM:
    """A randomly initialised ModernBERT MLM (seed torch first for a reproducible init)."""
    config = model_config(shape, vocab_size, special_ids, context_length, rope_theta)
    return ModernBertForMaskedLM._from_config(config, attn_implementation=resolve_attn(attn))


def load_model(folder: Path | str, attn: str = "auto") -> ModernBertForMaskedLM:
    """A saved HF folder (a previous stage's output), offline, in fp32."""
    return ModernBertForMaskedLM.from_pretrained(str(folder), attn_implementation=resolve_attn(attn),
                                                 dtype=torch.float32, local_files_only=True)


def check_shape(model: ModernBertForMaskedLM, shape: ModelShape, vocab_size: int, folder: Path | str) -> None:
    """``ValueError`` unless a loaded checkpoint (from ``folder``) has ``shape`` and the stage's vocabulary size."""
    config = model.config
    have = (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads,
            config.local_attention, config.vocab_size)
    want = (shape.layers, shape.hidden, shape.intermediate, shape.heads, shape.local_window, vocab_size)
    if have != want:
        raise ValueError(f"{folder}: model (layers, hidden, intermediate, heads, window, vocab) = {have}, but this "
                         f"stage's shape and tokenizer give {want}")


def extend_context(model: ModernBertForMaskedLM, context_length: int, rope_theta: float,
                   local_rope_theta: float | None = None) -> ModernBertForMaskedLM:
    """Mid-training context extension: new max length and global RoPE θ (local layers keep theirs unless
    ``local_rope_theta`` is given), in place.

    Only the config and the (non-persistent) RoPE frequency buffers change; the weights are untouched. The new
    values are in ``model.config`` and therefore in the saved ``config.json``.
    """
    config = model.config
    config.max_position_embeddings = int(context_length)
    config.rope_parameters["full_attention"]["rope_theta"] = float(rope_theta)
    if local_rope_theta:
        config.rope_parameters["sliding_attention"]["rope_theta"] = float(local_rope_theta)
    old = model.model.rotary_emb
    rotary = type(old)(config=config, device=old.full_attention_inv_freq.device)
    model.model.rotary_emb = rotary
    return model


def context_of(model: ModernBertForMaskedLM) -> tuple[int, float]:
    """(max_position_embeddings, global RoPE θ) of a model."""
    config = model.config
    return int(config.max_position_embeddings), float(config.rope_parameters["full_attention"]["rope_theta"])


def local_rope_theta_of(model: ModernBertForMaskedLM) -> float:
    """The local (sliding-window) layers' RoPE θ of a model."""
    return float(model.config.rope_parameters["sliding_attention"]["rope_theta"])
