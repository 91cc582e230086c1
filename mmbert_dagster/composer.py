"""Convert a Composer checkpoint of a FlexBERT model (how ModernBERT and mmBERT publish their training phases,
e.g. ``jhu-clsp/mmBERT-checkpoints``: ``extension/mmbert-base-ext.pt``, ``decay/mmbert-base-{eng,mid,all}.pt``)
into a transformers ``ModernBertForMaskedLM`` folder (``config.json`` + ``model.safetensors`` [+ tokenizer]).

What it does
------------
1. **Loads the ``.pt`` safely** (:func:`load_composer_state`): ``torch.load(weights_only=True)`` inside
   ``torch.serialization.safe_globals(ALLOWED_GLOBALS)``. ``weights_only`` unpickling only rebuilds tensors,
   containers and primitives; any other pickle GLOBAL (a class or function, which plain ``pickle`` would import
   and *call*, i.e. run arbitrary code) is refused. The few non-tensor globals a Composer checkpoint needs are on
   an explicit allow-list (see ``ALLOWED_GLOBALS`` for why each one is there); a pickle that names anything else
   is refused with :class:`ConversionError` naming the file and the global. ``weights_only=False`` is never used.
2. **Renames the parameters** with ``PARAM_MAP``. Composer's ``HuggingFaceModel`` wrapper prefixes every key of
   ``state['model']`` with ``model.`` (Composer's own converter strips it:
   ``consume_prefix_in_state_dict_if_present(weights_state_dict, prefix='model.')``); the reference converter then
   rewrites ``encoder.layers.N`` -> ``layers.N`` and a leading ``bert.`` -> ``model.``.
3. **Maps the FlexBERT config** (:func:`config_from_flexbert`) to a ``ModernBertConfig``: global / local RoPE θ,
   local window, global-every-n layer pattern (as transformers 5 ``layer_types``), norm eps and bias, biases,
   activations, special token ids. A field whose value ModernBERT cannot express (RMSNorm, post-norm, absolute
   positions, partial or interleaved RoPE, separate q/kv and out biases, ...) raises :class:`ConversionError` naming
   the field — nothing is dropped silently. Fields that only steer *training* (dropouts ModernBERT lacks, loss,
   init, compile/unpadding switches) do not change the converted weights or the model's outputs; they are dropped
   and listed in the returned summary (``dropped_training_fields``). Unknown fields raise.
4. **Checks every tensor** against a ``ModernBertForMaskedLM`` built (on the meta device) from that config:
   checkpoint parameters the table does not map, mapped names the model does not have, model parameters the
   checkpoint lacks, and shape mismatches all raise :class:`ConversionError` listing them.

Where the config is
-------------------
Composer's ``HuggingFaceModel.get_metadata`` stores the model's ``config.save_pretrained`` JSON at
``state['integrations']['huggingface']['model']['config']['content']`` (and the class at ``...['class']``, e.g.
``src.bert_layers.model.FlexBertForMaskedLM``), the tokenizer files at
``state['integrations']['huggingface']['tokenizer'][file_name]['content']``
(composer/models/huggingface.py: ``get_metadata``, ``get_hf_config_from_composer_state_dict``,
``write_huggingface_pretrained_from_composer_checkpoint``). A FlexBERT ``model_config`` dict (the training YAML's
``model.model_config``, e.g. JHU-CLSP/mmBERT ``configs/mmBERT-base-decay.yaml``) can be passed instead; absent
fields take their effective defaults (``FlexBertConfig.from_pretrained("bert-base-uncased", **model_config)``,
what ``src/flex_bert.py:create_flex_bert_mlm`` does).

Source of the table
-------------------
AnswerDotAI/ModernBERT, branch ``pretraining_documentation`` (commit 0e9dbe6d36000cfe81114e6937686b4982122a71;
``convert_to_hf.py`` added in 261e923b97534f3b1fb9a8c3f9ed2772054a8ce9): ``var_map`` and ``update_config``; FlexBERT
module names from ``src/bert_layers/{model,layers,attention,mlp,embeddings}.py``; config fields from
``src/bert_layers/configuration_bert.py`` (``FlexBertConfig``). Deliberate differences from ``update_config``
(each is what transformers' ModernBERT actually computes): ``classifier_activation`` / ``classifier_bias`` come
from ``head_pred_act`` / ``head_pred_bias``, because transformers' ``ModernBertPredictionHead`` (the MLM head)
uses them (the reference reads ``head_class_*``, FlexBERT's *classification* head, whose defaults differ:
``head_class_act="silu"``); ``local_attn_rotary_emb_base = -1`` means "same as global" (FlexBERT's meaning; the
reference would write -1); ``classifier_pooling`` is FlexBERT's ``pooling_type`` (the reference hard-codes
``"mean"``; neither affects the MLM outputs); the layer pattern is written as ``layer_types`` (transformers 5).
"""

from __future__ import annotations

import datetime
import json
import pickle
import re
import shutil
import types
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM, PretrainedConfig

from mmbert_dagster.train.export import CONFIG_FILE, WEIGHTS_FILE

__all__ = [
    "ALLOWED_GLOBALS",
    "COMPOSER_PREFIX",
    "ConversionError",
    "FLEXBERT_DEFAULTS",
    "PARAM_MAP",
    "config_from_flexbert",
    "convert_composer_checkpoint",
    "flexbert_to_hf_name",
    "hf_to_flexbert_name",
    "load_composer_state",
    "to_flexbert_names",
]



class ConversionError(ValueError):
    """The checkpoint cannot be converted faithfully; the message names the file, the parameter or the field."""


# --------------------------------------------------------------------------------------------------------------
# Parameter names
# --------------------------------------------------------------------------------------------------------------

# Composer's HuggingFaceModel stores the wrapped model as `self.model`, so every key of state['model'] starts with
# "model." (composer/models/huggingface.py, write_huggingface_pretrained_from_composer_checkpoint:
# consume_prefix_in_state_dict_if_present(weights_state_dict, prefix='model.')).
COMPOSER_PREFIX = "model."

# FlexBERT name (after COMPOSER_PREFIX is removed) -> transformers ModernBERT name; full-match regexes, as data.
# Source: AnswerDotAI/ModernBERT@pretraining_documentation:convert_to_hf.py, whose `var_map` is
#     (re.compile(r"encoder\.layers\.(.*)"), r"layers.\1"),
#     (re.compile(r"^bert\.(.*)"), r"model.\1"),
# applied in that order to every key. This table is that rewrite spelled out per FlexBERT module (FlexBertForMaskedLM
# = bert: FlexBertModel{embeddings.tok_embeddings, embeddings.norm, encoder.layers[N]{attn_norm, attn.Wqkv, attn.Wo,
# mlp_norm, mlp.Wi, mlp.Wo}, final_norm}, head: FlexBertPredictionHead{dense, norm}, decoder) so that a key no row
# matches (a FlexBERT variant ModernBERT lacks, e.g. position_embeddings or parallel Wqkvff) is reported instead of
# being renamed blindly. tests/test_composer.py checks that it agrees with `var_map` on every parameter.
PARAM_MAP: tuple[tuple[str, str], ...] = (
    (r"bert\.embeddings\.tok_embeddings\.weight", r"model.embeddings.tok_embeddings.weight"),
    (r"bert\.embeddings\.norm\.(weight|bias)", r"model.embeddings.norm.\1"),
    (r"bert\.encoder\.layers\.(\d+)\.attn_norm\.(weight|bias)", r"model.layers.\1.attn_norm.\2"),
    (r"bert\.encoder\.layers\.(\d+)\.attn\.Wqkv\.(weight|bias)", r"model.layers.\1.attn.Wqkv.\2"),
    (r"bert\.encoder\.layers\.(\d+)\.attn\.Wo\.(weight|bias)", r"model.layers.\1.attn.Wo.\2"),
    (r"bert\.encoder\.layers\.(\d+)\.mlp_norm\.(weight|bias)", r"model.layers.\1.mlp_norm.\2"),
    (r"bert\.encoder\.layers\.(\d+)\.mlp\.Wi\.(weight|bias)", r"model.layers.\1.mlp.Wi.\2"),
    (r"bert\.encoder\.layers\.(\d+)\.mlp\.Wo\.(weight|bias)", r"model.layers.\1.mlp.Wo.\2"),
    (r"bert\.final_norm\.(weight|bias)", r"model.final_norm.\1"),
    (r"head\.dense\.(weight|bias)", r"head.dense.\1"),
    (r"head\.norm\.(weight|bias)", r"head.norm.\1"),
    (r"decoder\.(weight|bias)", r"decoder.\1"),
)
_FORWARD = tuple((re.compile(p), r) for p, r in PARAM_MAP)


def _inverse_rows() -> tuple[tuple[re.Pattern, str], ...]:
    """PARAM_MAP read backwards: each replacement as a pattern, each pattern as a replacement (groups in order)."""
    rows = []
    for pattern, replacement in PARAM_MAP:
        groups = iter(re.findall(r"\([^)]*\)", pattern))
        inv_pattern = re.escape(replacement)
        for n in range(1, pattern.count("(") + 1):
            inv_pattern = inv_pattern.replace(re.escape(f"\\{n}"), next(groups), 1)
        inv_replacement = pattern
        for n, group in enumerate(re.findall(r"\([^)]*\)", pattern), start=1):
            inv_replacement = inv_replacement.replace(group, f"\\{n}", 1)
        rows.append((re.compile(inv_pattern), inv_replacement.replace("\\.", ".")))
    return tuple(rows)


_INVERSE = _inverse_rows()


def flexbert_to_hf_name(name: str) -> str | None:
    """The transformers name of a FlexBERT parameter (without Composer's ``model.`` prefix); None if unmapped."""
    for pattern, replacement in _FORWARD:
        if pattern.fullmatch(name):
            return pattern.sub(replacement, name)
    return None


def hf_to_flexbert_name(name: str) -> str | None:
    """The FlexBERT name of a transformers ModernBERT parameter (PARAM_MAP backwards); None if unmapped."""
    for pattern, replacement in _INVERSE:
        if pattern.fullmatch(name):
            return pattern.sub(replacement, name)
    return None


def to_flexbert_names(hf_state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of ``PARAM_MAP``: a ``ModernBertForMaskedLM`` state dict under FlexBERT names (no Composer prefix;
    add ``COMPOSER_PREFIX`` to store it the way a Composer checkpoint does). Unmapped names raise."""
    out, unmapped = {}, []
    for name, tensor in hf_state_dict.items():
        flex = hf_to_flexbert_name(name)
        if flex is None:
            unmapped.append(name)
        else:
            out[flex] = tensor
    if unmapped:
        raise ConversionError(f"no FlexBERT name for transformers parameter(s) {_names(unmapped)}")
    return out


def _names(names, limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return f"{shown} (+{len(names) - limit} more)" if len(names) > limit else shown


# --------------------------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------------------------

_np_reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct

# The non-tensor globals a Composer checkpoint's pickle names, beyond what torch's weights_only unpickler already
# allows (tensors and storages, OrderedDict, Counter, torch.Size / dtype / device, bytes, set, ...). Composer itself
# allows the same set (less the numpy 1.x spelling below) since "Harden Composer checkpoint deserialization"
# (mosaicml/composer 6405188, 2026-04, composer/utils/checkpoint.py: _COMPOSER_CHECKPOINT_SAFE_GLOBALS); the
# Composer 0.24.1 that ModernBERT pins loaded with plain torch.load. Each entry is a plain value constructor that
# runs no code named by the file:
ALLOWED_GLOBALS: tuple = (
    # state['timestamp'] (Timestamp.state_dict: total_wct, iteration_wct, epoch_wct, batch_wct); also the
    # CheckpointSaver callback's saved timestamps. timedelta(days, seconds, microseconds) only builds a duration.
    datetime.timedelta,
    # state['metadata']['torch_version'] = torch.__version__, a str subclass (rebuilt with str.__new__).
    torch.torch_version.TorchVersion,
    # rng[rank]['numpy'] = np.random.get_state(): ('MT19937', uint32 ndarray, ...). An ndarray pickles as
    # _reconstruct(ndarray, shape, dtype) + __setstate__(raw bytes); the array subtype must itself be an allowed
    # global (only ndarray is) and object arrays only receive objects this same restricted unpickler built.
    # numpy >= 2 names the function numpy._core.multiarray._reconstruct; checkpoints written under numpy 1.x (the
    # ModernBERT training environment pins numpy 1.26.4) name it numpy.core.multiarray._reconstruct: both spellings.
    np.ndarray,
    np.dtype,
    (_np_reconstruct, "numpy._core.multiarray._reconstruct"),
    (_np_reconstruct, "numpy.core.multiarray._reconstruct"),
    # the dtype's BUILD step (dtype.__setstate__: byte order, flags) is checked against the *loaded* dtype's
    # class, which numpy >= 1.25 makes a numpy.dtypes.*DType (UInt32DType for the MT19937 key); C-level setters
    *(t for t in vars(getattr(np, "dtypes", types.SimpleNamespace())).values()
      if isinstance(t, type) and issubclass(t, np.dtype) and t is not np.dtype),
)
# Deliberately not allowed: composer / omegaconf / torchmetrics / transformers classes (Composer 0.24's state dict
# stores none: metrics as state dicts, the config as JSON), numpy scalars, pathlib paths, functions. A checkpoint
# that needs one is refused; convert it in an environment you trust with the tool that wrote it.


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _refusal(path: Path, names: list[str]) -> ConversionError:
    return ConversionError(
        f"{path}: refusing to unpickle global(s) {', '.join(sorted(names))}: not on this converter's allow-list. "
        f"The file is loaded with torch.load(weights_only=True), which refuses arbitrary code execution: a pickle "
        f"global is a class or function that unpickling would import and call. Allowed beyond tensors and plain "
        f"containers: {', '.join(dict.fromkeys(_global_name(g) for g in ALLOWED_GLOBALS))}. If you trust the "
        f"file, re-save its tensors (e.g. with safetensors) where it was made.")


def _global_name(entry) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    if entry.__module__ == "numpy.dtypes":
        return "numpy.dtypes.*DType"
    return f"{entry.__module__}.{entry.__qualname__}"


def _torch_load(path: Path):
    """``torch.load(weights_only=True)`` with ``ALLOWED_GLOBALS``; a refused global -> ConversionError."""
    if not path.is_file():
        raise ConversionError(f"{path}: no such checkpoint file (a Composer .pt; sharded checkpoint folders are not "
                              f"supported)")
    is_zip = zipfile.is_zipfile(path)
    with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
        if is_zip:
            # static scan first: names every offending global at once, before anything is unpickled
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except (ValueError, RuntimeError, KeyError) as e:
                raise ConversionError(f"{path}: not a torch.save checkpoint ({e})") from e
            if unsafe:
                raise _refusal(path, unsafe)
        try:
            # mmap: optimizer moments and other bulk state of a full training checkpoint are not read into memory
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except pickle.UnpicklingError as e:
            found = re.findall(r"GLOBAL ([\w.]+)", str(e)) or re.findall(r"got <class '([\w.]+)'>", str(e))
            if found:
                raise _refusal(path, found) from None
            raise ConversionError(f"{path}: weights_only unpickling refused the file: {str(e).splitlines()[0]}") \
                from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise ConversionError(f"{path}: not a readable torch checkpoint: {e}") from e


def _read_checkpoint(path: Path) -> dict:
    """{"state_dict", "config", "config_class", "tokenizer_files"} of a Composer checkpoint (or a bare state dict)."""
    obj = _torch_load(path)
    if _is_tensor_dict(obj):  # a bare state dict (torch.save(model.state_dict()))
        return {"state_dict": dict(obj), "config": None, "config_class": None, "tokenizer_files": {}}
    if not (isinstance(obj, Mapping) and isinstance(obj.get("state"), Mapping)
            and isinstance(obj["state"].get("model"), Mapping)):
        raise ConversionError(f"{path}: not a Composer checkpoint (expected {{'state': {{'model': ...}}}}; top-level "
                              f"keys: {sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__})")
    state = obj["state"]
    hf = (state.get("integrations") or {}).get("huggingface") or {}
    cfg_entry = (hf.get("model") or {}).get("config") or {}
    tokenizer_files = {name: entry for name, entry in (hf.get("tokenizer") or {}).items()
                       if isinstance(entry, Mapping) and "content" in entry}
    return {"state_dict": dict(state["model"]), "config": cfg_entry.get("content"),
            "config_class": cfg_entry.get("class"), "tokenizer_files": tokenizer_files}


def load_composer_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """``(state_dict, flexbert_config)`` of a Composer ``.pt``: ``state['model']`` with its keys as stored (Composer's
    ``model.`` prefix included) and the FlexBERT config JSON Composer keeps at
    ``state['integrations']['huggingface']['model']['config']['content']`` (None if absent).

    Loaded with ``torch.load(weights_only=True)`` and ``ALLOWED_GLOBALS`` only; any other global -> ConversionError.
    """
    ckpt = _read_checkpoint(Path(path))
    return ckpt["state_dict"], ckpt["config"]


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------

# Effective defaults of a FlexBERT config: FlexBertConfig's signature (src/bert_layers/configuration_bert.py) over
# bert-base-uncased's config.json, which create_flex_bert_mlm always loads first ("has to be set to
# bert-base-uncased legacy reasons").
FLEXBERT_DEFAULTS: dict[str, Any] = {
    # bert-base-uncased / BertConfig
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
    "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0, "position_embedding_type": "absolute",
    "use_cache": True, "classifier_dropout": None, "gradient_checkpointing": False, "tie_word_embeddings": True,
    # FlexBertConfig
    "attention_layer": "base", "attn_out_bias": False, "attn_out_dropout_prob": 0.0, "attn_qkv_bias": False,
    "bert_layer": "prenorm", "decoder_bias": True, "embed_dropout_prob": 0.0, "embed_norm": True,
    "final_norm": False, "embedding_layer": "absolute_pos", "encoder_layer": "base",
    "loss_function": "cross_entropy", "loss_kwargs": {}, "mlp_dropout_prob": 0.0, "mlp_in_bias": False,
    "mlp_layer": "mlp", "mlp_out_bias": False, "norm_kwargs": {}, "normalization": "rmsnorm",
    "padding": "unpadded", "head_class_act": "silu", "head_class_bias": False, "head_class_dropout": 0.0,
    "head_class_norm": False, "head_pred_act": "silu", "head_pred_bias": False, "head_pred_dropout": 0.0,
    "head_pred_norm": True, "pooling_type": "cls", "rotary_emb_dim": None, "rotary_emb_base": 10000.0,
    "rotary_emb_scale_base": None, "rotary_emb_interleaved": False, "use_fa2": True, "use_sdpa_attn_mask": False,
    "allow_embedding_resizing": False, "init_method": "default", "init_std": 0.02, "init_cutoff_factor": 2.0,
    "init_small_embedding": False, "initial_attention_layer": None, "initial_bert_layer": None,
    "initial_mlp_layer": None, "num_initial_layers": 1, "skip_first_prenorm": False, "deterministic_fa2": False,
    "sliding_window": -1, "global_attn_every_n_layers": -1, "local_attn_rotary_emb_base": -1,
    "local_attn_rotary_emb_dim": None, "unpad_embeddings": False, "pad_logits": False, "compile_model": False,
    "masked_prediction": False,
}

# fields whose value must be one ModernBERT implements (FlexBERT prefixes layer names with `padding`)
_REQUIRED: dict[str, tuple[tuple, str]] = {
    "attention_layer": (("rope", "unpadded_rope", "padded_rope"), "ModernBERT attention is RoPE, q/k/v in one Wqkv"),
    "bert_layer": (("prenorm", "unpadded_prenorm", "padded_prenorm", "unpadded_compile_prenorm"),
                   "ModernBERT layers are pre-norm, attention then MLP"),
    "embedding_layer": (("sans_pos",), "ModernBERT has no position embeddings"),
    "encoder_layer": (("base", "unpadded_base", "padded_base"), "ModernBERT's encoder is a plain layer stack"),
    "mlp_layer": (("glu",), "ModernBERT's MLP is a GLU (Wi -> input, gate)"),
    "normalization": (("layernorm", "triton_layernorm"), "ModernBERT uses LayerNorm"),
    "embed_norm": ((True,), "ModernBERT always normalises the embeddings"),
    "final_norm": ((True,), "ModernBERT always has a final norm"),
    "skip_first_prenorm": ((True,), "ModernBERT's layer 0 has no attn_norm (it follows the embedding norm)"),
    "head_pred_norm": ((True,), "ModernBERT's prediction head always ends in a norm"),
    "rotary_emb_scale_base": ((None,), "ModernBERT has no XPos RoPE scaling"),
    "rotary_emb_interleaved": ((False,), "ModernBERT's RoPE rotates halves, not interleaved pairs"),
    "initial_attention_layer": ((None,), "ModernBERT has one attention type in every layer"),
    "initial_bert_layer": ((None,), "ModernBERT has one layer type in every layer"),
    "initial_mlp_layer": ((None,), "ModernBERT has one MLP type in every layer"),
}

# fields that steer training only: they change neither the weights nor what the converted model computes
_TRAINING_ONLY = frozenset({
    "attn_out_dropout_prob", "head_pred_dropout", "hidden_dropout_prob", "loss_function", "loss_kwargs",
    "init_method", "init_std", "init_small_embedding", "compile_model", "masked_prediction", "padding",
    "unpad_embeddings", "pad_logits", "use_fa2", "use_sdpa_attn_mask", "allow_embedding_resizing",
    "gradient_checkpointing", "num_initial_layers",
    # BertConfig fields FlexBERT never reads (only the Mosaic/ALiBi BERT classes do), and YAML extras
    "layer_norm_eps", "type_vocab_size", "position_embedding_type", "use_cache", "classifier_dropout",
    "max_position_embeddings", "activation_function",
})

# written by config.save_pretrained / the tokenizer decide these: replaced, never mapped
_METADATA = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "_attn_implementation_autoset", "_commit_hash", "pad_token_id", "bos_token_id", "eos_token_id",
    "cls_token_id", "sep_token_id", "mask_token_id",
})

# FlexBERT activation name (src/bert_layers/activation.py ACT2CLS) -> the same function in transformers' ACT2FN
_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu",
                "swish": "silu", "tanh": "tanh", "sigmoid": "sigmoid", "mish": "mish", None: "linear", "": "linear"}


def _unwrap_config(cfg: Mapping) -> dict:
    """Accept the stored config JSON, a YAML ``model_config`` dict, or a YAML with ``model: {model_config: ...}``."""
    if isinstance(cfg, Mapping) and isinstance(cfg.get("model"), Mapping) and "model_config" in cfg["model"]:
        cfg = cfg["model"]["model_config"]
    elif isinstance(cfg, Mapping) and isinstance(cfg.get("model_config"), Mapping):
        cfg = cfg["model_config"]
    if not isinstance(cfg, Mapping):
        raise ConversionError(f"FlexBERT config must be a dict, got {type(cfg).__name__}")
    return dict(cfg)


def _base_config_defaults() -> dict:
    base = PretrainedConfig().to_dict()
    base["id2label"] = {str(k): v for k, v in base.get("id2label", {}).items()}
    return base


def _activation(field: str, value) -> str:
    if not isinstance(value, (str, type(None))) or value not in _ACTIVATIONS:
        raise ConversionError(f"FlexBERT config field {field!r} = {value!r}: no equivalent transformers activation "
                              f"(supported: {sorted(k for k in _ACTIVATIONS if k)})")
    return _ACTIVATIONS[value]


def _map_config(cfg: Mapping, vocab_size: int) -> tuple[dict, dict]:
    """(ModernBertConfig kwargs without token ids, {dropped training-only field: value})."""
    raw = _unwrap_config(cfg)
    c = {**FLEXBERT_DEFAULTS, **raw}

    def fail(field, why):
        raise ConversionError(f"FlexBERT config field {field!r} = {c.get(field)!r} cannot be converted: {why}")

    base_defaults = _base_config_defaults()
    known = set(FLEXBERT_DEFAULTS) | _METADATA | _TRAINING_ONLY
    for field, value in raw.items():
        if field in known:
            continue
        if field in base_defaults:  # generic PretrainedConfig fields: harmless at their default
            v = {str(k): x for k, x in value.items()} if field == "id2label" and isinstance(value, Mapping) else value
            if v == base_defaults[field]:
                continue
            fail(field, "a generic transformers config field at a non-default value (a fine-tuned head?); "
                        "ModernBertForMaskedLM has no use for it")
        fail(field, "not a FlexBertConfig field; no transformers ModernBERT equivalent")

    for field, (allowed, why) in _REQUIRED.items():
        if c[field] not in allowed:
            fail(field, f"{why} (allowed: {list(allowed)})")

    hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    if hidden % heads:
        fail("num_attention_heads", f"hidden_size {hidden} is not a multiple of it")
    head_dim = hidden // heads
    for field in ("rotary_emb_dim", "local_attn_rotary_emb_dim"):
        if c[field] not in (None, head_dim):
            fail(field, f"ModernBERT rotates the full head dimension ({head_dim}); partial RoPE is not supported")

    if bool(c["attn_qkv_bias"]) != bool(c["attn_out_bias"]):
        fail("attn_qkv_bias", f"ModernBERT has one attention_bias for Wqkv and Wo, but attn_out_bias = "
                              f"{c['attn_out_bias']!r}")
    if bool(c["mlp_in_bias"]) != bool(c["mlp_out_bias"]):
        fail("mlp_out_bias", f"ModernBERT has one mlp_bias for Wi and Wo, but mlp_in_bias = {c['mlp_in_bias']!r}")

    norm_kwargs = dict(c["norm_kwargs"] or {})
    extra = set(norm_kwargs) - {"eps", "bias"}
    if extra:
        fail("norm_kwargs", f"only eps and bias map to ModernBERT's LayerNorm (norm_eps, norm_bias); "
                            f"got {sorted(extra)}")

    classifier_activation = _activation("head_pred_act", c["head_pred_act"])
    # transformers uses classifier_activation / classifier_bias for the MLM head *and* the classification head;
    # FlexBERT's classification-head fields (absent from an MLM checkpoint) may only differ at their defaults
    for cls_field, mlm_field in (("head_class_act", "head_pred_act"), ("head_class_bias", "head_pred_bias")):
        if c[cls_field] != FLEXBERT_DEFAULTS[cls_field] and c[cls_field] != c[mlm_field]:
            fail(cls_field, f"transformers uses one value for the MLM and the classification head, and "
                            f"{mlm_field} = {c[mlm_field]!r}")
    if c["head_class_norm"] not in (False, None, True, "layernorm"):
        fail("head_class_norm", "transformers' classification head always ends in a LayerNorm")
    pooling = c["pooling_type"]
    if pooling not in ("cls", "mean"):
        fail("pooling_type", "transformers ModernBERT pools with 'cls' or 'mean'")

    n_layers = int(c["num_hidden_layers"])
    window, every = int(c["sliding_window"]), int(c["global_attn_every_n_layers"])
    if window == -1 and every != -1:
        fail("global_attn_every_n_layers", "set without a sliding_window")
    # FlexBertUnpadRopeAttention: global iff every <= 0 and no window, or layer_id % every == 0
    if window == -1:
        layer_types = ["full_attention"] * n_layers
    elif every > 0:
        layer_types = ["full_attention" if i % every == 0 else "sliding_attention" for i in range(n_layers)]
    else:
        layer_types = ["sliding_attention"] * n_layers
    if window != -1 and (window <= 0 or window % 2):
        fail("sliding_window", "must be a positive even window (split evenly left and right)")
    global_theta = float(c["rotary_emb_base"])
    local_base = c["local_attn_rotary_emb_base"]
    local_theta = global_theta if local_base in (None, -1, 0) else float(local_base)

    cfg_vocab = int(c["vocab_size"])
    if "vocab_size" in raw and cfg_vocab != vocab_size and cfg_vocab + (-cfg_vocab % 8) != vocab_size:
        fail("vocab_size", f"the checkpoint's embedding has {vocab_size} rows")

    kwargs = {
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(c["intermediate_size"]),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "hidden_activation": _activation("hidden_act", c["hidden_act"]),
        "layer_types": layer_types,
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": global_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        "norm_eps": float(norm_kwargs.get("eps", 1e-5)),    # nn.LayerNorm's defaults when norm_kwargs omits them
        "norm_bias": bool(norm_kwargs.get("bias", True)),
        "attention_bias": bool(c["attn_out_bias"]),
        "attention_dropout": float(c["attention_probs_dropout_prob"]),
        "embedding_dropout": float(c["embed_dropout_prob"]),
        "mlp_bias": bool(c["mlp_in_bias"]),
        "mlp_dropout": float(c["mlp_dropout_prob"]),
        "decoder_bias": bool(c["decoder_bias"]),
        "classifier_activation": classifier_activation,
        "classifier_bias": bool(c["head_pred_bias"]),
        "classifier_dropout": float(c["head_class_dropout"]),
        "classifier_pooling": pooling,
        "initializer_range": float(c["initializer_range"]),
        "initializer_cutoff_factor": float(c["init_cutoff_factor"]),
        "deterministic_flash_attn": bool(c["deterministic_fa2"]),
        "tie_word_embeddings": bool(c["tie_word_embeddings"]),
    }
    if window != -1:
        kwargs["local_attention"] = window
    if window != -1 and every > 0:
        kwargs["global_attn_every_n_layers"] = every  # informative (layer_types decides); read by merge checks
    dropped = {f: raw[f] for f in sorted(_TRAINING_ONLY & set(raw)) if raw[f] != FLEXBERT_DEFAULTS.get(f, object())}
    return kwargs, dropped


def config_from_flexbert(cfg: Mapping, vocab_size: int, *, pad_token_id: int, cls_token_id: int,
                         sep_token_id: int, bos_token_id: int | None = None, eos_token_id: int | None = None,
                         mask_token_id: int | None = None, max_position_embeddings: int = 8192) -> ModernBertConfig:
    """A ``ModernBertConfig`` equivalent to a FlexBERT config (the JSON Composer stores, or a YAML ``model_config``).

    ``vocab_size`` is the checkpoint's embedding row count (authoritative). Token ids come from the tokenizer, not
    from the FlexBERT config (whose ``pad_token_id`` is bert-base-uncased's); ``bos`` defaults to ``cls`` and ``eos``
    to ``sep``; ``mask_token_id`` is kept in config.json for readers (not a ModernBertConfig field). RoPE and context:
    ``max_position_embeddings`` is the context the model is meant for (FlexBERT's RoPE has no such limit; 8192 is
    mmBERT's and the reference converter's default). Raises ConversionError naming any field ModernBERT cannot express.
    """
    kwargs, _ = _map_config(cfg, vocab_size)
    return _build_config(kwargs, {"pad": pad_token_id, "cls": cls_token_id, "sep": sep_token_id,
                                  "bos": bos_token_id, "eos": eos_token_id, "mask": mask_token_id},
                         max_position_embeddings)


def _build_config(kwargs: dict, ids: Mapping[str, int | None], max_position_embeddings: int) -> ModernBertConfig:
    extra = {"mask_token_id": int(ids["mask"])} if ids.get("mask") is not None else {}
    config = ModernBertConfig(
        **kwargs,
        max_position_embeddings=int(max_position_embeddings),
        pad_token_id=int(ids["pad"]), cls_token_id=int(ids["cls"]), sep_token_id=int(ids["sep"]),
        bos_token_id=int(ids["bos"] if ids.get("bos") is not None else ids["cls"]),
        eos_token_id=int(ids["eos"] if ids.get("eos") is not None else ids["sep"]),
        **extra,
    )
    config.architectures = ["ModernBertForMaskedLM"]
    return config


# --------------------------------------------------------------------------------------------------------------
# Tokenizer and special ids
# --------------------------------------------------------------------------------------------------------------

_ROLES = ("pad", "cls", "sep", "mask", "bos", "eos")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja")
_SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _content(value) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _special_ids(files: Mapping[str, Any]) -> dict[str, int]:
    """Role -> id from parsed tokenizer files (tokenizer_config.json, special_tokens_map.json, tokenizer.json)."""
    roles: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # tokenizer_config wins
        data = files.get(name)
        if isinstance(data, Mapping):
            for role in _ROLES:
                content = _content(data.get(f"{role}_token"))
                if content:
                    roles[role] = content
    ids: dict[str, int] = {}
    tok_cfg = files.get("tokenizer_config.json")
    if isinstance(tok_cfg, Mapping):
        for tid, entry in (tok_cfg.get("added_tokens_decoder") or {}).items():
            if _content(entry) is not None and str(tid).isdigit():
                ids.setdefault(_content(entry), int(tid))
    tok_json = files.get("tokenizer.json")
    if isinstance(tok_json, Mapping):
        for entry in tok_json.get("added_tokens") or []:
            if isinstance(entry, Mapping) and _content(entry) is not None and isinstance(entry.get("id"), int):
                ids.setdefault(_content(entry), entry["id"])
        vocab = (tok_json.get("model") or {}).get("vocab")
        if isinstance(vocab, Mapping):
            for token, tid in vocab.items():
                if isinstance(tid, int):
                    ids.setdefault(token, tid)
    return {role: ids[content] for role, content in roles.items() if content in ids}


def _complete_ids(found: Mapping[str, int | None], where: str) -> dict[str, int | None]:
    ids = {r: found.get(r) for r in _ROLES}
    ids["cls"] = ids["cls"] if ids["cls"] is not None else ids["bos"]  # e.g. Gemma (mmBERT): <bos> / <eos>
    ids["sep"] = ids["sep"] if ids["sep"] is not None else ids["eos"]
    missing = [r for r in ("pad", "cls", "sep") if ids[r] is None]
    if missing:
        raise ConversionError(f"special token id(s) {missing} unknown ({where}); pass special_ids={{'pad': ..., "
                              f"'cls': ..., 'sep': ..., 'mask': ...}} or a tokenizer_dir")
    return ids


def _read_tokenizer_dir(tokenizer_dir: Path) -> dict[str, Any]:
    files = {}
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = tokenizer_dir / name
        if path.is_file():
            try:
                files[name] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ConversionError(f"{path}: not readable JSON: {e}") from e
    if not any((tokenizer_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise ConversionError(f"{tokenizer_dir}: not a tokenizer folder (no tokenizer.json or tokenizer.model)")
    return files


def _write_stored_tokenizer(stored: Mapping[str, Mapping], out_dir: Path) -> tuple[list[str], list[str]]:
    """Write the tokenizer files Composer stored (HuggingFaceModel.get_metadata); (written, skipped)."""
    written, skipped = [], []
    for name, entry in stored.items():
        ext, content = entry.get("file_extension") or Path(name).suffix, entry["content"]
        if not _SAFE_FILE_NAME.fullmatch(name) or name in (CONFIG_FILE, WEIGHTS_FILE):
            skipped.append(name)
        elif ext == ".json":
            (out_dir / name).write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
            written.append(name)
        elif ext == ".txt" and isinstance(content, list):
            (out_dir / name).write_text("\n".join(content), encoding="utf-8")
            written.append(name)
        elif ext == ".model" and isinstance(content, (bytes, bytearray)):
            (out_dir / name).write_bytes(bytes(content))
            written.append(name)
        elif ext == ".jinja" and isinstance(content, str):
            (out_dir / name).write_text(content, encoding="utf-8")
            written.append(name)
        else:  # .py (tokenizer code: never written) and anything unexpected
            skipped.append(name)
    return sorted(written), sorted(skipped)


# --------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------

def _check_class(config_class: str | None, path: Path) -> None:
    if config_class and not str(config_class).endswith("ForMaskedLM"):
        raise ConversionError(f"{path}: the checkpoint holds a {config_class}, not a FlexBERT masked-LM model "
                              f"(FlexBertForMaskedLM); only MLM checkpoints convert to ModernBertForMaskedLM")


def convert_composer_checkpoint(pt_path: str | Path, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
                                config: Mapping | None = None, special_ids: Mapping[str, int] | None = None,
                                max_position_embeddings: int = 8192) -> dict:
    """Write ``config.json`` + ``model.safetensors`` of a FlexBERT Composer checkpoint into ``out_dir`` (new or
    empty), plus the tokenizer: the files of ``tokenizer_dir`` when given, else the tokenizer files the checkpoint
    stores (never ``.py`` code). Returns a summary: counts of mapped / unmapped / missing parameters, the sources
    of config and token ids, dropped training-only config fields, written files.

    ``config``: a FlexBERT config dict (stored JSON or YAML ``model_config``) overriding the stored one.
    ``special_ids``: ``{"pad", "cls", "sep", "mask", "bos", "eos"}`` ids overriding those read from the tokenizer.
    Raises ConversionError (naming them) for unmapped or missing parameters, shape mismatches, config fields
    ModernBERT cannot express, and pickles needing a global outside ``ALLOWED_GLOBALS``.
    """
    pt_path, out_dir = Path(pt_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConversionError(f"{out_dir}: output folder exists and is not empty; give a fresh one")
    ckpt = _read_checkpoint(pt_path)
    _check_class(ckpt["config_class"], pt_path)
    if config is not None:
        flex_cfg, config_source = config, "argument"
    elif ckpt["config"] is not None:
        flex_cfg, config_source = ckpt["config"], "checkpoint: state.integrations.huggingface.model.config.content"
    else:
        raise ConversionError(f"{pt_path}: the checkpoint stores no model config "
                              f"(state.integrations.huggingface.model.config); pass config=<FlexBERT model_config>")

    # names: Composer prefix, then PARAM_MAP
    mapped: dict[str, torch.Tensor] = {}
    flex_of: dict[str, str] = {}
    unmapped = []
    for key, tensor in ckpt["state_dict"].items():
        flex = key[len(COMPOSER_PREFIX):] if key.startswith(COMPOSER_PREFIX) else key
        hf = flexbert_to_hf_name(flex) if isinstance(tensor, torch.Tensor) else None
        if hf is None:
            unmapped.append(key)
        elif hf in mapped:
            raise ConversionError(f"{pt_path}: {key} and {flex_of[hf]} both map to {hf}")
        else:
            mapped[hf], flex_of[hf] = tensor, key
    if unmapped:
        raise ConversionError(f"{pt_path}: {len(unmapped)} checkpoint parameter(s) have no transformers ModernBERT "
                              f"name in PARAM_MAP: {_names(unmapped)}")
    emb = mapped.get("model.embeddings.tok_embeddings.weight")
    if emb is None:
        raise ConversionError(f"{pt_path}: missing parameter bert.embeddings.tok_embeddings.weight")

    # special ids
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        found, ids_source = _special_ids(_read_tokenizer_dir(tokenizer_dir)), f"tokenizer_dir {tokenizer_dir}"
    elif ckpt["tokenizer_files"]:
        found = _special_ids({n: e["content"] for n, e in ckpt["tokenizer_files"].items()})
        ids_source = "checkpoint tokenizer (state.integrations.huggingface.tokenizer)"
    else:
        found, ids_source = {}, "no tokenizer"
    if special_ids:
        unknown = set(special_ids) - set(_ROLES)
        if unknown:
            raise ConversionError(f"special_ids: unknown role(s) {sorted(unknown)}; roles are {list(_ROLES)}")
        found, ids_source = {**found, **special_ids}, f"special_ids argument over {ids_source}"
    ids = _complete_ids(found, ids_source)

    kwargs, dropped = _map_config(flex_cfg, int(emb.shape[0]))
    hf_config = _build_config(kwargs, ids, max_position_embeddings)
    hf_config.dtype = emb.dtype

    # every tensor against the model transformers builds from that config
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ModernBertForMaskedLM(hf_config).state_dict().items()}
    dropped_tied = []
    if hf_config.tie_word_embeddings:
        expected.pop("decoder.weight", None)
        dec = mapped.pop("decoder.weight", None)
        if dec is not None:
            if dec.shape != emb.shape or (dec.data_ptr() != emb.data_ptr() and not torch.equal(dec, emb)):
                raise ConversionError(f"{pt_path}: tie_word_embeddings is set but decoder.weight differs from "
                                      f"bert.embeddings.tok_embeddings.weight; the decoder would be replaced")
            dropped_tied.append(flex_of["decoder.weight"])
    unexpected = sorted(flex_of[k] for k in set(mapped) - set(expected))
    missing = sorted(k for k in set(expected) - set(mapped))
    if unexpected:
        raise ConversionError(f"{pt_path}: parameter(s) {_names(unexpected)} do not exist in ModernBertForMaskedLM "
                              f"under this config (a bias or norm the config says is absent?)")
    if missing:
        flex_missing = _names(hf_to_flexbert_name(k) or k for k in missing)
        raise ConversionError(f"{pt_path}: checkpoint lacks parameter(s) {flex_missing} "
                              f"(transformers: {_names(missing)})")
    bad = [f"{flex_of[k]} {tuple(t.shape)} (expected {expected[k]})" for k, t in mapped.items()
           if tuple(t.shape) != expected[k]]
    if bad:
        raise ConversionError(f"{pt_path}: shape mismatch: {_names(bad)}")

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in mapped.items()}, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    hf_config.save_pretrained(str(out_dir))
    if tokenizer_dir is not None:
        written = []
        for name in _TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, out_dir / name)
                written.append(name)
        skipped, tokenizer_source = [], f"tokenizer_dir {tokenizer_dir}"
    elif ckpt["tokenizer_files"]:
        written, skipped = _write_stored_tokenizer(ckpt["tokenizer_files"], out_dir)
        tokenizer_source = "checkpoint"
    else:
        written, skipped, tokenizer_source = [], [], None
    return {
        "source": str(pt_path),
        "out_dir": str(out_dir),
        "mapped": len(mapped),
        "unmapped": 0,
        "missing": 0,
        "dropped_tied": dropped_tied,
        "num_parameters": int(sum(t.numel() for t in mapped.values())),
        "dtype": str(emb.dtype).replace("torch.", ""),
        "config_source": config_source,
        "dropped_training_fields": dropped,
        "special_token_ids": {r: i for r, i in ids.items() if i is not None},
        "special_ids_source": ids_source,
        "tokenizer_source": tokenizer_source,
        "tokenizer_files": written,
        "skipped_tokenizer_files": skipped,
    }
