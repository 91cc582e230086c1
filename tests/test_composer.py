"""mmbert_dagster.composer: FlexBERT Composer checkpoint -> transformers ModernBertForMaskedLM folder, safely.

A tiny random ModernBERT (4 layers: global, local, local, global; hidden 32; vocab 104) is renamed to FlexBERT
names, stored the way Composer stores a full training checkpoint (optimizer, timestamps with timedeltas, numpy RNG
state, metadata with torch's TorchVersion, the FlexBERT config JSON and tokenizer files under
state.integrations.huggingface), converted, and loaded back with plain transformers.
"""

from __future__ import annotations

import datetime
import json
import pickle
import random
import re
import types

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, ModernBertConfig, ModernBertForMaskedLM

from mmbert_dagster.composer import (
    COMPOSER_PREFIX,
    ConversionError,
    config_from_flexbert,
    convert_composer_checkpoint,
    flexbert_to_hf_name,
    load_composer_state,
    to_flexbert_names,
)

LAYERS, HIDDEN, HEADS, INTER, VOCAB, WINDOW = 4, 32, 2, 48, 104, 8
IDS = {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4}  # Gemma's order (mmBERT's tokenizer)

# The FlexBERT config JSON as Composer stores it (FlexBertConfig.save_pretrained over bert-base-uncased): the
# model_config of JHU-CLSP/mmBERT configs/mmBERT-base-decay.yaml with tiny sizes and distinct local / global θ.
STORED_CFG = {
    "_name_or_path": "bert-base-uncased", "architectures": ["BertForMaskedLM"], "model_type": "bert",
    "transformers_version": "4.44.1", "hidden_dropout_prob": 0.1, "max_position_embeddings": 512,
    "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
    "position_embedding_type": "absolute", "use_cache": True, "classifier_dropout": None,
    "gradient_checkpointing": False,
    "num_hidden_layers": LAYERS, "hidden_size": HIDDEN, "intermediate_size": INTER, "num_attention_heads": HEADS,
    "vocab_size": VOCAB, "padding": "unpadded", "mlp_layer": "glu", "bert_layer": "prenorm", "embed_norm": True,
    "final_norm": True, "hidden_act": "gelu", "init_method": "full_megatron", "mlp_in_bias": False,
    "mlp_out_bias": False, "attn_out_bias": False, "attn_qkv_bias": False, "compile_model": True,
    "head_pred_act": "gelu", "loss_function": "fa_cross_entropy", "normalization": "layernorm",
    "rotary_emb_dim": None, "sliding_window": WINDOW, "attention_layer": "rope", "embedding_layer": "sans_pos",
    "rotary_emb_base": 160000.0, "mlp_dropout_prob": 0, "unpad_embeddings": True, "masked_prediction": True,
    "embed_dropout_prob": 0, "skip_first_prenorm": True, "activation_function": "gelu",
    "attn_out_dropout_prob": 0.1, "rotary_emb_scale_base": None, "rotary_emb_interleaved": False,
    "allow_embedding_resizing": True, "global_attn_every_n_layers": 3, "local_attn_rotary_emb_base": 10000.0,
    "attention_probs_dropout_prob": 0, "norm_kwargs": {"eps": 1e-05, "bias": False},
    "loss_kwargs": {"reduction": "mean"},
    # FlexBertConfig defaults, present in every stored JSON
    "head_class_act": "silu", "head_class_bias": False, "head_class_dropout": 0.0, "head_class_norm": False,
    "head_pred_bias": False, "head_pred_dropout": 0.0, "head_pred_norm": True, "pooling_type": "cls",
    "decoder_bias": True, "encoder_layer": "base", "num_initial_layers": 1, "initial_attention_layer": None,
    "initial_bert_layer": None, "initial_mlp_layer": None, "init_std": 0.02, "init_cutoff_factor": 2.0,
    "deterministic_fa2": False, "local_attn_rotary_emb_dim": None, "use_fa2": True, "use_sdpa_attn_mask": False,
    "pad_logits": False, "init_small_embedding": False,
}

# JHU-CLSP/mmBERT@108ffb376ad65c2512801bb88931933dcd286baf configs/mmBERT-base-decay.yaml, model.model_config
MMBERT_BASE_DECAY = {
    "num_hidden_layers": 22, "hidden_size": 768, "intermediate_size": 1152, "num_attention_heads": 12,
    "vocab_size": 256000, "padding": "unpadded", "mlp_layer": "glu", "bert_layer": "prenorm", "embed_norm": True,
    "final_norm": True, "hidden_act": "gelu", "init_method": "full_megatron", "mlp_in_bias": False,
    "mlp_out_bias": False, "attn_out_bias": False, "attn_qkv_bias": False, "compile_model": True,
    "head_pred_act": "gelu", "loss_function": "fa_cross_entropy", "normalization": "layernorm",
    "rotary_emb_dim": None, "sliding_window": 128, "attention_layer": "rope", "embedding_layer": "sans_pos",
    "rotary_emb_base": 160000.0, "mlp_dropout_prob": 0, "unpad_embeddings": True, "masked_prediction": True,
    "embed_dropout_prob": 0, "skip_first_prenorm": True, "activation_function": "gelu",
    "attn_out_dropout_prob": 0.1, "rotary_emb_scale_base": None, "rotary_emb_interleaved": False,
    "allow_embedding_resizing": True, "global_attn_every_n_layers": 3, "local_attn_rotary_emb_base": 160000.0,
    "attention_probs_dropout_prob": 0, "norm_kwargs": {"eps": 1.0e-05, "bias": False},
    "loss_kwargs": {"reduction": "mean"},
}

TOKENIZER_CONFIG = {
    "pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
    "mask_token": {"content": "<mask>", "lstrip": True, "__type": "AddedToken"},
    "added_tokens_decoder": {str(i): {"content": f"<{r}>", "special": True} for r, i in IDS.items()},
}


def hf_config() -> ModernBertConfig:
    """The ModernBERT the tiny FlexBERT config describes, written out by hand (independent of the converter)."""
    return ModernBertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, hidden_activation="gelu", local_attention=WINDOW,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 160000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        norm_eps=1e-5, norm_bias=False, attention_bias=False, mlp_bias=False, decoder_bias=True,
        classifier_activation="gelu", pad_token_id=0, cls_token_id=2, sep_token_id=1, bos_token_id=2,
        eos_token_id=1, max_position_embeddings=8192, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def original() -> ModernBertForMaskedLM:
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(hf_config()).eval()
    with torch.no_grad():  # non-trivial norms and biases: a swapped name cannot go unnoticed
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def timestamp(seconds: float) -> dict:
    """composer Timestamp.state_dict(): ints and datetime.timedelta."""
    counts = dict.fromkeys(("iteration", "epoch", "batch", "sample", "token", "epoch_in_iteration",
                            "token_in_iteration", "batch_in_epoch", "sample_in_epoch", "token_in_epoch"), 7)
    wct = dict.fromkeys(("total_wct", "iteration_wct", "epoch_wct", "batch_wct"), datetime.timedelta(seconds=seconds))
    return {**counts, **wct}


def composer_checkpoint(model_state: dict, cfg: dict | None = STORED_CFG, tokenizer: dict | None = None,
                        **extra_state) -> dict:
    """A full Composer (0.24) training checkpoint around FlexBERT-named weights, as Trainer.save_checkpoint writes."""
    hf = {"model": {}, "tokenizer": tokenizer or {}}
    if cfg is not None:
        hf["model"]["config"] = {"file_extension": ".json", "content": cfg,
                                 "class": "src.bert_layers.model.FlexBertForMaskedLM"}
    state = {
        "model": {COMPOSER_PREFIX + k: v for k, v in model_state.items()},
        "optimizers": {"StableAdamW": {"state": {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(7.0)}},
                                       "param_groups": [{"lr": 8e-4, "betas": (0.9, 0.98), "eps": 1e-6,
                                                         "weight_decay": 1e-5, "foreach": None, "params": [0]}]}},
        "schedulers": {"LambdaLR": {"base_lrs": [8e-4], "last_epoch": 7, "_step_count": 8, "lr_lambdas": [None]}},
        "algorithms": [],
        "callbacks": {"SpeedMonitor": {"total_eval_wct": 0.0},
                      "CheckpointSaver": {"all_saved_checkpoints_to_timestamp": [("ep0-ba7.pt", timestamp(3.0))]}},
        "scaler": None,
        "timestamp": timestamp(12.5),
        "rank_zero_seed": 21,
        "train_metrics": {"LanguageCrossEntropy": {"state_dict": {"sum_loss": torch.tensor(1.5)},
                                                   "_computed": None}},
        "eval_metrics": {},
        "run_name": "tiny-mmbert",
        "dataset_state": {"train": None, "eval": {}},
        "integrations": {"huggingface": hf},
        "metadata": {"composer_env_info": {"composer_version": "0.24.1", "num_gpus": 8}, "device": "gpu",
                     "torch_version": torch.__version__, "precision": "amp_bf16", "world_size": 8,
                     "device_train_microbatch_size": 6},
        **extra_state,
    }
    return {"state": state, "rng": [{"python": random.getstate(), "numpy": np.random.get_state(),
                                     "torch": torch.random.get_rng_state()}]}


def flex_state(model) -> dict:
    return to_flexbert_names(model.state_dict())


def tokenizer_dir(tmp_path):
    """A real (tiny) tokenizers-library folder with Gemma-like special tokens."""
    from tokenizers import Tokenizer, models

    vocab = {f"<{r}>": i for r, i in IDS.items()} | {f"w{i}": i for i in range(5, VOCAB)}
    folder = tmp_path / "tok"
    folder.mkdir()
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    (folder / "special_tokens_map.json").write_text(json.dumps({"mask_token": "<mask>", "pad_token": "<pad>"}))
    (folder / "README.md").write_text("not a tokenizer file")
    return folder


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------------------------

def test_round_trip_logits_equal(tmp_path, original):
    pt = tmp_path / "mmbert-tiny-ext.pt"
    torch.save(composer_checkpoint(flex_state(original)), pt)
    out = tmp_path / "hf"
    summary = convert_composer_checkpoint(pt, out, tokenizer_dir=tokenizer_dir(tmp_path))

    assert summary["unmapped"] == 0 and summary["missing"] == 0
    assert summary["mapped"] == len(original.state_dict()) - 1  # decoder.weight is tied to the embedding
    assert summary["dropped_tied"] == ["model.decoder.weight"]
    assert summary["dropped_training_fields"]["attn_out_dropout_prob"] == 0.1  # listed, not silently dropped
    assert summary["special_token_ids"] == {"pad": 0, "cls": 2, "sep": 1, "mask": 4, "bos": 2, "eos": 1}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "special_tokens_map.json",
                                                     "tokenizer.json", "tokenizer_config.json"]

    loaded = AutoModelForMaskedLM.from_pretrained(str(out), local_files_only=True).eval()
    assert type(loaded) is ModernBertForMaskedLM
    want, got = original.config, loaded.config
    for field in ("layer_types", "rope_parameters", "local_attention", "norm_eps", "norm_bias", "attention_bias",
                  "mlp_bias", "decoder_bias", "hidden_activation", "classifier_activation", "vocab_size",
                  "pad_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id",
                  "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(got, field) == getattr(want, field), field
    assert json.loads((out / "config.json").read_text())["mask_token_id"] == 4

    torch.manual_seed(1)
    ids = torch.randint(5, VOCAB, (2, 24))  # longer than the local window: local layers really are local
    assert (logits(loaded, ids) - logits(original, ids)).abs().max().item() <= 1e-5


def test_load_composer_state_and_stored_tokenizer(tmp_path, original):
    """Config and tokenizer where Composer keeps them; the tokenizer files are written, never .py or odd paths."""
    stored_tok = {
        "tokenizer_config.json": {"file_extension": ".json", "content": TOKENIZER_CONFIG},
        "tokenizer.model": {"file_extension": ".model", "content": b"\x0a\x05fake-sentencepiece"},
        "tokenization_evil.py": {"file_extension": ".py", "content": "import os; os.system('true')"},
        "../outside.json": {"file_extension": ".json", "content": {}},
    }
    pt = tmp_path / "ckpt.pt"
    torch.save(composer_checkpoint(flex_state(original), tokenizer=stored_tok), pt)

    state, cfg = load_composer_state(pt)
    assert cfg == STORED_CFG
    assert set(state) == {COMPOSER_PREFIX + k for k in flex_state(original)}

    summary = convert_composer_checkpoint(pt, tmp_path / "hf")
    assert summary["config_source"].startswith("checkpoint")
    assert summary["special_token_ids"]["pad"] == 0 and summary["special_token_ids"]["cls"] == 2
    assert summary["tokenizer_files"] == ["tokenizer.model", "tokenizer_config.json"]
    assert summary["skipped_tokenizer_files"] == ["../outside.json", "tokenization_evil.py"]
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == b"\x0a\x05fake-sentencepiece"
    assert not (tmp_path / "outside.json").exists()


def test_numpy1_checkpoint_loads(tmp_path, original):
    """A checkpoint written under numpy 1.x (ModernBERT's environment) names numpy.core.multiarray._reconstruct."""
    reconstruct = np._core.multiarray._reconstruct

    class Numpy1Pickler(pickle._Pickler):
        def save_global(self, obj, name=None):
            if obj is reconstruct:
                self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
                self.memoize(obj)
                return
            super().save_global(obj, name)

    pt = tmp_path / "np1.pt"
    torch.save(composer_checkpoint(flex_state(original)), pt,
               pickle_module=types.SimpleNamespace(Pickler=Numpy1Pickler, __name__="numpy1_pickle"))
    assert "numpy.core.multiarray._reconstruct" in torch.serialization.get_unsafe_globals_in_checkpoint(str(pt))
    convert_composer_checkpoint(pt, tmp_path / "hf", special_ids={"pad": 0, "cls": 2, "sep": 1})
    assert (tmp_path / "hf" / "model.safetensors").is_file()


# The reference converter, copied verbatim: AnswerDotAI/ModernBERT@pretraining_documentation convert_to_hf.py
# (main(): after composer's write_huggingface_pretrained_from_composer_checkpoint, which first does
# consume_prefix_in_state_dict_if_present(weights_state_dict, prefix='model.')).
REFERENCE_VAR_MAP = (
    (re.compile(r"encoder\.layers\.(.*)"), r"layers.\1"),
    (re.compile(r"^bert\.(.*)"), r"model.\1"),  # Replaces 'bert.' with 'model.' at the start of keys
)


def reference_rename(composer_key: str) -> str:
    name = composer_key[len("model."):] if composer_key.startswith("model.") else composer_key
    for pattern, replacement in REFERENCE_VAR_MAP:
        name = re.sub(pattern, replacement, name)
    return name


# Pairs the reference's var_map produces for the Composer keys of a FlexBertForMaskedLM (module names from
# src/bert_layers/model.py FlexBertForMaskedLM / FlexBertModel, layers.py FlexBertUnpadPreNormLayer, attention.py
# FlexBertUnpadRopeAttention, mlp.py FlexBertGLU, embeddings.py FlexBertSansPositionEmbeddings).
REFERENCE_PAIRS = [
    ("model.bert.embeddings.tok_embeddings.weight", "model.embeddings.tok_embeddings.weight"),
    ("model.bert.embeddings.norm.weight", "model.embeddings.norm.weight"),
    ("model.bert.encoder.layers.0.attn.Wqkv.weight", "model.layers.0.attn.Wqkv.weight"),
    ("model.bert.encoder.layers.0.attn.Wo.weight", "model.layers.0.attn.Wo.weight"),
    ("model.bert.encoder.layers.1.attn_norm.weight", "model.layers.1.attn_norm.weight"),
    ("model.bert.encoder.layers.21.mlp_norm.weight", "model.layers.21.mlp_norm.weight"),
    ("model.bert.encoder.layers.21.mlp.Wi.weight", "model.layers.21.mlp.Wi.weight"),
    ("model.bert.encoder.layers.21.mlp.Wo.weight", "model.layers.21.mlp.Wo.weight"),
    ("model.bert.final_norm.weight", "model.final_norm.weight"),
    ("model.head.dense.weight", "head.dense.weight"),
    ("model.head.norm.weight", "head.norm.weight"),
    ("model.decoder.weight", "decoder.weight"),
    ("model.decoder.bias", "decoder.bias"),
]


def test_table_matches_reference(original):
    for composer_key, hf_name in REFERENCE_PAIRS:
        assert reference_rename(composer_key) == hf_name
        assert flexbert_to_hf_name(composer_key[len(COMPOSER_PREFIX):]) == hf_name

    # every parameter of the tiny model: FlexBERT names as FlexBERT's modules spell them, and the same target
    # names as the reference's regexes (biases included: a model with every bias switched on)
    biased = ModernBertForMaskedLM(ModernBertConfig(**{**hf_config().to_dict(), "attention_bias": True,
                                                       "mlp_bias": True, "norm_bias": True,
                                                       "classifier_bias": True}))
    for model in (original, biased):
        flex = to_flexbert_names(model.state_dict())
        expected = {"bert.embeddings.tok_embeddings.weight", "bert.embeddings.norm.weight",
                    "bert.final_norm.weight", "head.dense.weight", "head.norm.weight", "decoder.weight",
                    "decoder.bias"}
        for i in range(LAYERS):
            expected |= {f"bert.encoder.layers.{i}.{m}.weight" for m in ("attn.Wqkv", "attn.Wo", "mlp_norm",
                                                                         "mlp.Wi", "mlp.Wo")}
            expected |= {f"bert.encoder.layers.{i}.attn_norm.weight"} if i else set()
        if model is biased:
            expected |= {n.replace(".weight", ".bias") for n in expected if not n.endswith("tok_embeddings.weight")
                         and not n.startswith("decoder")}
        assert set(flex) == expected
        for name in flex:
            assert reference_rename(COMPOSER_PREFIX + name) == flexbert_to_hf_name(name)
            assert flexbert_to_hf_name(name) in model.state_dict()


def _touch(path: str) -> None:
    """What a malicious pickle would run on load; here: create a marker file."""
    with open(path, "w") as f:
        f.write("code ran")


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_non_allowlisted_global_is_refused(tmp_path, original, zip_format):
    # the payload is live: plain pickle runs it (on a different marker, in memory, not through torch.load)
    live = tmp_path / "plain-pickle-ran"
    pickle.loads(pickle.dumps(Payload(live)))
    assert live.exists()

    marker = tmp_path / "code-ran"
    pt = tmp_path / "evil.pt"
    ckpt = composer_checkpoint(flex_state(original))
    ckpt["state"]["callbacks"]["Evil"] = {"x": Payload(marker)}
    torch.save(ckpt, pt, _use_new_zipfile_serialization=zip_format)

    for call in (lambda: load_composer_state(pt),
                 lambda: convert_composer_checkpoint(pt, tmp_path / "hf", special_ids={"pad": 0, "cls": 2, "sep": 1})):
        with pytest.raises(ConversionError) as err:
            call()
        msg = str(err.value)
        assert str(pt) in msg and f"{_touch.__module__}._touch" in msg and "weights_only" in msg
        assert not marker.exists()
    assert not (tmp_path / "hf").exists()


def test_third_party_class_is_refused(tmp_path, original):
    """A plain class outside the allow-list (here pathlib.PosixPath) is refused too, by name."""
    from pathlib import PurePosixPath

    pt = tmp_path / "path.pt"
    ckpt = composer_checkpoint(flex_state(original))
    ckpt["state"]["run_dir"] = PurePosixPath("/runs/x")
    torch.save(ckpt, pt)
    with pytest.raises(ConversionError, match=r"pathlib\.PurePosixPath"):
        load_composer_state(pt)


@pytest.mark.parametrize("edit, named", [
    (lambda s: s.update({"bert.encoder.layers.0.attn.extra_proj.weight": torch.zeros(2)}),
     "model.bert.encoder.layers.0.attn.extra_proj.weight"),
    (lambda s: s.update({"bert.embeddings.position_embeddings.weight": torch.zeros(512, HIDDEN)}),
     "model.bert.embeddings.position_embeddings.weight"),
    (lambda s: s.pop("bert.final_norm.weight"), "bert.final_norm.weight"),
    (lambda s: s.pop("bert.encoder.layers.2.mlp.Wi.weight"), "bert.encoder.layers.2.mlp.Wi.weight"),
    # a norm ModernBERT's layer 0 does not have (skip_first_prenorm)
    (lambda s: s.update({"bert.encoder.layers.0.attn_norm.weight": torch.ones(HIDDEN)}),
     "model.bert.encoder.layers.0.attn_norm.weight"),
    # a bias the config says is absent
    (lambda s: s.update({"bert.encoder.layers.1.attn.Wo.bias": torch.zeros(HIDDEN)}),
     "model.bert.encoder.layers.1.attn.Wo.bias"),
    (lambda s: s.update({"head.dense.weight": torch.zeros(HIDDEN, HIDDEN + 1)}), "model.head.dense.weight"),
], ids=["extra", "position-embeddings", "missing-final-norm", "missing-layer-param", "layer0-attn-norm",
        "unexpected-bias", "shape"])
def test_unmapped_missing_or_mismatched_parameters(tmp_path, original, edit, named):
    state = flex_state(original)
    edit(state)
    pt = tmp_path / "bad.pt"
    torch.save(composer_checkpoint(state), pt)
    with pytest.raises(ConversionError, match=re.escape(named)):
        convert_composer_checkpoint(pt, tmp_path / "hf", special_ids={"pad": 0, "cls": 2, "sep": 1})
    assert not (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.parametrize("field, value", [
    ("normalization", "rmsnorm"), ("attention_layer", "base"), ("embedding_layer", "absolute_pos"),
    ("mlp_layer", "mlp"), ("bert_layer", "postnorm"), ("rotary_emb_interleaved", True), ("rotary_emb_dim", 8),
    ("rotary_emb_scale_base", 512), ("attn_qkv_bias", True), ("mlp_out_bias", True), ("skip_first_prenorm", False),
    ("final_norm", False), ("norm_kwargs", {"eps": 1e-5, "bias": False, "elementwise_affine": False}),
    ("hidden_act", "softplus"), ("head_class_act", "relu"), ("initial_attention_layer", "base"),
    ("some_new_flexbert_field", 1), ("id2label", {"0": "NEG", "1": "POS", "2": "NEU"}),
])
def test_unmappable_config_field(field, value):
    with pytest.raises(ConversionError, match=re.escape(repr(field))):
        config_from_flexbert({**STORED_CFG, field: value}, VOCAB, pad_token_id=0, cls_token_id=2, sep_token_id=1)


def test_unmappable_config_through_converter(tmp_path, original):
    pt = tmp_path / "ckpt.pt"
    torch.save(composer_checkpoint(flex_state(original), cfg=None), pt)
    ids = {"pad": 0, "cls": 2, "sep": 1}
    with pytest.raises(ConversionError, match="stores no model config"):
        convert_composer_checkpoint(pt, tmp_path / "a", special_ids=ids)
    with pytest.raises(ConversionError, match="'normalization'"):
        convert_composer_checkpoint(pt, tmp_path / "b", special_ids=ids,
                                    config={**STORED_CFG, "normalization": "rmsnorm"})
    # a YAML model_config (only the fields the YAML sets) is enough, passed in
    summary = convert_composer_checkpoint(pt, tmp_path / "c", special_ids=ids,
                                          config={"model": {"model_config": {**MMBERT_BASE_DECAY, **{
                                              k: STORED_CFG[k] for k in ("num_hidden_layers", "hidden_size",
                                                                         "intermediate_size", "num_attention_heads",
                                                                         "vocab_size", "sliding_window",
                                                                         "local_attn_rotary_emb_base")}}}})
    assert summary["config_source"] == "argument"


def test_mmbert_config_fields():
    cfg = config_from_flexbert(MMBERT_BASE_DECAY, 256000, pad_token_id=0, cls_token_id=2, sep_token_id=1,
                               mask_token_id=4)
    assert cfg.layer_types == ["full_attention" if i % 3 == 0 else "sliding_attention" for i in range(22)]
    assert cfg.layer_types[21] == "full_attention"
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 160000.0
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 160000.0
    assert (cfg.local_attention, cfg.sliding_window, cfg.global_attn_every_n_layers) == (128, 64, 3)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers) == \
        (768, 1152, 12, 22)
    assert (cfg.norm_eps, cfg.norm_bias, cfg.attention_bias, cfg.mlp_bias, cfg.decoder_bias) == \
        (1e-5, False, False, False, True)
    assert (cfg.hidden_activation, cfg.classifier_activation) == ("gelu", "gelu")
    assert (cfg.pad_token_id, cfg.cls_token_id, cfg.sep_token_id, cfg.bos_token_id, cfg.eos_token_id,
            cfg.mask_token_id) == (0, 2, 1, 2, 1, 4)
    # local θ -1 (FlexBERT: "use rotary_emb_base") and a sliding window disabled altogether
    cfg = config_from_flexbert({**MMBERT_BASE_DECAY, "local_attn_rotary_emb_base": -1, "rotary_emb_base": 10000.0},
                               256000, pad_token_id=0, cls_token_id=2, sep_token_id=1)
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    cfg = config_from_flexbert({**MMBERT_BASE_DECAY, "sliding_window": -1, "global_attn_every_n_layers": -1},
                               256000, pad_token_id=0, cls_token_id=2, sep_token_id=1)
    assert set(cfg.layer_types) == {"full_attention"}
    with pytest.raises(ConversionError, match="'vocab_size'"):
        config_from_flexbert(MMBERT_BASE_DECAY, 50368, pad_token_id=0, cls_token_id=2, sep_token_id=1)


def test_refuses_non_empty_out_dir_and_unknown_ids(tmp_path, original):
    pt = tmp_path / "ckpt.pt"
    torch.save(composer_checkpoint(flex_state(original)), pt)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="not empty"):
        convert_composer_checkpoint(pt, tmp_path / "used", special_ids={"pad": 0, "cls": 2, "sep": 1})
    with pytest.raises(ConversionError, match=r"\['pad', 'cls', 'sep'\] unknown"):
        convert_composer_checkpoint(pt, tmp_path / "fresh")  # no tokenizer anywhere, no ids given
