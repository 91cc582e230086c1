"""TIES merge (mmbert_dagster.merge, through mergekit) on hand-computed deltas and real ModernBERT folders."""

from __future__ import annotations

import dataclasses
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM

from model_helpers import SHAPE, SPECIALS, VOCAB
from mmbert_dagster.merge import MergeError, merge_checkpoints
from mmbert_dagster.train.model import build_model

TENSOR = "model.final_norm.weight"  # 64 values: small enough to compute TIES by hand
QUIET = lambda *_: None


def save(model, folder):
    model.save_pretrained(str(folder))
    (folder / "tokenizer.json").write_text('{"stand-in": "one tokenizer for all"}')
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(SHAPE, VOCAB, SPECIALS, 256, 160_000.0, attn="sdpa")
    return model, save(model, tmp_path_factory.mktemp("base"))


def variant(base_model, folder, delta: torch.Tensor):
    model = type(base_model)._from_config(base_model.config)
    model.load_state_dict(base_model.state_dict())
    with torch.no_grad():
        dict(model.named_parameters())[TENSOR].add_(delta)
    folder.mkdir()
    return save(model, folder)


def merged_tensors(out):
    return load_file(str(out / "model.safetensors"))


def test_ties_trims_elects_signs_and_averages_the_agreeing_deltas(base, tmp_path):
    model, base_dir = base
    i = torch.arange(64, dtype=torch.float32)
    a, b, c = 1 + i / 100, -(2 + i / 100), 0.5 + i / 100  # smallest 13 of each (i < 13) are trimmed at density 0.8
    folders = {name: variant(model, tmp_path / name, d) for name, d in (("a", a), ("b", b), ("c", c))}
    out = tmp_path / "merged"
    out.mkdir()
    merge_checkpoints(base_dir, folders, out, weights={"a": 1.0, "b": 1.0, "c": 1.0}, density=0.8, log=QUIET)
    theta0 = dict(model.named_parameters())[TENSOR].detach()
    delta = merged_tensors(out)[TENSOR] - theta0
    # i < 13: every delta trimmed -> base value
    assert torch.allclose(delta[:13], torch.zeros(13), atol=1e-6)
    # 13 <= i < 50: a + b + c = -0.5 + i/100 < 0 -> only b agrees -> b's delta
    assert torch.allclose(delta[13:50], b[13:50], atol=1e-5)
    # i > 50: the sum is positive -> a and c agree -> their mean
    assert torch.allclose(delta[51:], (a[51:] + c[51:]) / 2, atol=1e-5)
    # every other tensor: no deltas -> exactly the base
    merged = merged_tensors(out)
    for name, p in model.state_dict().items():
        if name != TENSOR and name in merged:
            assert torch.equal(merged[name], p), name


def test_weights_change_the_elected_sign_and_the_mean(base, tmp_path):
    model, base_dir = base
    i = torch.arange(64, dtype=torch.float32)
    a, b, c = 1 + i / 100, -(2 + i / 100), 0.5 + i / 100
    folders = {name: variant(model, tmp_path / name, d) for name, d in (("a", a), ("b", b), ("c", c))}
    out = tmp_path / "merged"
    out.mkdir()
    merge_checkpoints(base_dir, folders, out, weights={"a": 1.0, "b": 1.0, "c": 3.0}, density=0.8, scale=0.5, log=QUIET)
    delta = merged_tensors(out)[TENSOR] - dict(model.named_parameters())[TENSOR].detach()
    # a + b + 3c = 0.5 + 0.03 i > 0 everywhere: a and c agree, weighted mean (a + 3c) / 4, then x scale 0.5
    assert torch.allclose(delta[13:], 0.5 * (a[13:] + 3 * c[13:]) / 4, atol=1e-5)


def test_merging_identical_models_is_the_identity_and_loads_as_a_masked_lm(base, tmp_path):
    model, base_dir = base
    delta = torch.randn(64)
    folders = {k: variant(model, tmp_path / k, delta) for k in ("decay_eng", "decay_cont", "decay_all")}
    out = tmp_path / "merged"
    out.mkdir()
    merge_checkpoints(base_dir, folders, out, weights={k: 1.0 for k in folders}, density=0.8, log=QUIET)
    expected = load_file(str(folders["decay_eng"] / "model.safetensors"))
    merged = merged_tensors(out)
    trimmed = delta.abs() < delta.abs().sort(descending=True).values[int(0.8 * 64) - 1]
    for name, p in expected.items():
        if name == TENSOR:  # the trimmed 20 % fall back to the base; the kept deltas are exact
            assert torch.allclose(merged[name][~trimmed], p[~trimmed], atol=1e-6)
        else:
            assert torch.equal(merged[name], p), name
    loaded = AutoModelForMaskedLM.from_pretrained(str(out), local_files_only=True)
    assert loaded.config.rope_parameters["full_attention"]["rope_theta"] == 160_000.0
    assert json.loads((out / "merge_config.json").read_text())["merge_method"] == "ties"
    assert (out / "tokenizer.json").is_file()


def test_checkpoints_of_different_shapes_are_refused_naming_the_file_and_field(base, tmp_path):
    model, base_dir = base
    other = build_model(dataclasses.replace(SHAPE, hidden=32, intermediate=48), VOCAB, SPECIALS, 256, 160_000.0)
    wrong = save(other, tmp_path / "wrong")
    out = tmp_path / "merged"
    out.mkdir()
    with pytest.raises(MergeError, match=r"wrong/config.json: hidden_size = 32 but the base model"):
        merge_checkpoints(base_dir, {"decay_eng": base_dir, "decay_all": wrong}, out,
                   weights={"decay_eng": 1.0, "decay_all": 1.0}, log=QUIET)
    (tmp_path / "tok").mkdir()
    odd = save(model, tmp_path / "tok")
    (odd / "tokenizer.json").write_text('{"another": "tokenizer"}')
    with pytest.raises(MergeError, match="a different tokenizer"):
        merge_checkpoints(base_dir, {"decay_eng": base_dir, "decay_all": odd}, out,
                   weights={"decay_eng": 1.0, "decay_all": 1.0}, log=QUIET)
    assert list(out.iterdir()) == []  # nothing written


def test_reference_ties_agrees_with_mergekit_on_random_deltas(base, tmp_path):
    """merge.ties_reference (the asset check's re-computation) = mergekit's output, weights and scale included."""
    from mmbert_dagster.merge import ties_reference

    model, base_dir = base
    g = torch.Generator().manual_seed(3)
    deltas = {k: torch.randn(64, generator=g) for k in ("a", "b", "c")}
    folders = {k: variant(model, tmp_path / k, d) for k, d in deltas.items()}
    weights = {"a": 0.5, "b": 1.0, "c": 2.0}
    out = tmp_path / "merged"
    out.mkdir()
    merge_checkpoints(base_dir, folders, out, weights=weights, density=0.6, scale=0.9, log=QUIET)
    theta0 = dict(model.named_parameters())[TENSOR].detach()
    ref = ties_reference(theta0, [theta0 + deltas[k] for k in weights], list(weights.values()), 0.6, 0.9)
    assert torch.allclose(merged_tensors(out)[TENSOR], ref, atol=1e-6)


def test_linear_merge_is_the_weighted_average_of_the_models(base, tmp_path):
    """method="linear" (the ablation's plain average): Σ w_i θ_i / Σ w_i for every tensor, base ignored but for
    config and tokenizer; the reference re-computation agrees."""
    from mmbert_dagster.merge import compare_with_reference, linear_reference

    model, base_dir = base
    g = torch.Generator().manual_seed(5)
    deltas = {k: torch.randn(64, generator=g) for k in ("a", "b")}
    folders = {k: variant(model, tmp_path / k, d) for k, d in deltas.items()}
    out = tmp_path / "merged"
    out.mkdir()
    summary = merge_checkpoints(base_dir, folders, out, weights={"a": 1.0, "b": 3.0}, method="linear", log=QUIET)
    assert summary["method"] == "linear"
    theta0 = dict(model.named_parameters())[TENSOR].detach()
    expected = theta0 + (deltas["a"] + 3 * deltas["b"]).view_as(theta0) / 4
    assert torch.allclose(merged_tensors(out)[TENSOR], expected, atol=1e-6)
    assert torch.allclose(linear_reference([theta0 + deltas["a"].view_as(theta0), theta0 + deltas["b"].view_as(theta0)],
                                           [1.0, 3.0]), expected, atol=1e-6)
    check = compare_with_reference(out, base_dir, folders, weights={"a": 1.0, "b": 3.0}, density=0.8,
                                   method="linear")
    assert check["max_abs_difference"] <= 1e-5 and not check["non_finite"]
    assert json.loads((out / "merge_config.json").read_text())["merge_method"] == "linear"
