"""Released checkpoints (mmbert_dagster/released.py): a local folder, hf:// from the hub cache (offline: in the
cache's own layout, or one clear error), a Composer .pt converted safely, and the checkpoint deciding the shape."""

import json
import os

import pytest
import torch

from mmbert_dagster.recipe import ModelShape
from mmbert_dagster.released import (
    RELEASED_JSON,
    ReleasedError,
    fetch_released,
    is_released_ref,
    parse_ref,
    read_released,
    reconcile_shape,
)

from test_composer import composer_checkpoint, flex_state, hf_config, logits, tokenizer_dir

QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def original():
    """A small ModernBERT (test_composer's shape) standing in for a released model."""
    from transformers import ModernBertForMaskedLM

    torch.manual_seed(0)
    return ModernBertForMaskedLM(hf_config()).eval()


def model_folder(model, folder, tmp_path):
    model.save_pretrained(str(folder))
    tok = tokenizer_dir(tmp_path)
    for f in tok.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_references_are_told_apart_from_stage_names():
    assert not is_released_ref("midtrain") and not is_released_ref("decay_all_mask30")
    assert is_released_ref("hf://jhu-clsp/mmBERT-base") and is_released_ref("./released")
    assert is_released_ref("/data/mmbert-base-ext.pt") and is_released_ref("~/models/mmbert")
    assert parse_ref("hf://jhu-clsp/mmBERT-base@v1.0").revision == "v1.0"
    assert parse_ref("hf://jhu-clsp/mmBERT-base").revision is None
    assert parse_ref("/x/mmbert-base-ext.pt").kind == "composer" and parse_ref("/x/folder").kind == "folder"
    with pytest.raises(ReleasedError, match="not a Hugging Face model id"):
        parse_ref("hf://no-org")


def test_a_local_folder_is_copied_with_its_record(tmp_path, original):
    src = model_folder(original, tmp_path / "released", tmp_path)
    out = tmp_path / "out"
    record = fetch_released(str(src), out, cache_dir=tmp_path / "cache", log=QUIET)
    assert record["kind"] == "folder" and record["shape"]["hidden"] == original.config.hidden_size
    assert read_released(out) == record and (out / RELEASED_JSON).is_file()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(record["files"])
    assert "README.md" not in record["files"]  # only the model's files


@pytest.mark.parametrize("remove, message", [("config.json", "lacks config.json"),
                                             ("tokenizer.json", "lacks tokenizer.json"),
                                             ("model.safetensors", "lacks model.safetensors")])
def test_a_folder_without_config_tokenizer_or_weights_is_one_clear_error(tmp_path, original, remove, message):
    src = model_folder(original, tmp_path / "released", tmp_path)
    (src / remove).unlink()
    with pytest.raises(ReleasedError, match=rf"{src}: .*{message}"):
        fetch_released(str(src), tmp_path / "out", cache_dir=tmp_path / "cache", log=QUIET)


def test_a_folder_of_another_architecture_is_refused(tmp_path, original):
    src = model_folder(original, tmp_path / "released", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ReleasedError, match="model_type = 'bert'"):
        fetch_released(str(src), tmp_path / "out", cache_dir=tmp_path / "cache", log=QUIET)


def test_hf_reference_offline_without_a_cached_copy_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ReleasedError, match=r"hf://jhu-clsp/mmBERT-base: not in the cache .* HF_HUB_OFFLINE=1"):
        fetch_released("hf://jhu-clsp/mmBERT-base", tmp_path / "out", cache_dir=tmp_path / "cache", log=QUIET)


def test_hf_reference_is_read_from_the_hub_cache_layout(tmp_path, original, monkeypatch):
    """The code path of an online fetch, offline: a snapshot in huggingface_hub's cache layout
    (models--org--name/snapshots/<commit>/, refs/main) is found by snapshot_download and copied (real files)."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # the test command's setting, read by huggingface_hub at import
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--jhu-clsp--mmBERT-tiny"
    snapshot = model_folder(original, repo / "snapshots" / commit, tmp_path)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "out"
    record = fetch_released("hf://jhu-clsp/mmBERT-tiny", out, cache_dir=tmp_path / "cache", log=QUIET)
    assert record["kind"] == "hf" and record["revision"] == commit
    assert (out / "model.safetensors").read_bytes() == (snapshot / "model.safetensors").read_bytes()
    assert not (out / "model.safetensors").is_symlink()


def test_a_composer_checkpoint_is_converted_into_the_same_model(tmp_path, original):
    from transformers import AutoModelForMaskedLM

    pt = tmp_path / "mmbert-tiny-ext.pt"
    torch.save(composer_checkpoint(flex_state(original)), pt)
    out = tmp_path / "out"
    record = fetch_released(str(pt), out, cache_dir=tmp_path / "cache", tokenizer_dir=tokenizer_dir(tmp_path),
                            log=QUIET)
    assert record["kind"] == "composer" and not (out / ".converted").exists()
    converted = AutoModelForMaskedLM.from_pretrained(str(out), local_files_only=True).eval()
    ids = torch.randint(5, hf_config().vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits(converted, ids), logits(original, ids), atol=1e-5)


def test_the_checkpoint_decides_the_shape_and_a_disagreeing_recipe_is_named(tmp_path, original):
    config = original.config.to_dict()
    shape = reconcile_shape(ModelShape(), (), config, "extend.toml")  # [model] absent: the checkpoint's shape
    assert (shape.layers, shape.hidden, shape.heads) == (config["num_hidden_layers"], config["hidden_size"],
                                                         config["num_attention_heads"])
    assert shape.local_rope_theta == 10_000.0
    agreeing = ModelShape(hidden=config["hidden_size"])
    assert reconcile_shape(agreeing, ("hidden",), config, "extend.toml") == shape
    with pytest.raises(ReleasedError, match=r"extend.toml: \[model\] disagrees .*layers = 22 but the checkpoint's "
                                            rf"config.json has {config['num_hidden_layers']}"):
        reconcile_shape(ModelShape(layers=22), ("layers",), config, "extend.toml")


def test_init_from_may_name_one_released_checkpoint_and_the_extend_preset_does():
    from mmbert_dagster.recipe import RecipeError, checkpoint_key, load_recipe, recipe_from_dict
    import tomllib
    from importlib import resources

    r = load_recipe("extend")
    assert r.released == "hf://jhu-clsp/mmBERT-base" and r.model_fields == ()
    assert r.lineage() == {"decay_new": "released_checkpoint", "decay_known": "released_checkpoint"}
    assert checkpoint_key(r.merge_base) == "released_checkpoint" and r.continues_released("decay_known")
    d = tomllib.loads((resources.files("mmbert_dagster.recipes") / "extend.toml").read_text())
    d["stages"]["decay_other"] = {"init_from": "/models/other"}
    with pytest.raises(RecipeError, match="a recipe continues one released checkpoint"):
        recipe_from_dict(d, "my.toml")
    d["stages"]["decay_other"] = {"init_from": "nowhere"}
    with pytest.raises(RecipeError, match=r"stages\.decay_other\.init_from: must name an earlier stage .* or a "
                                          r"released checkpoint"):
        recipe_from_dict(d, "my.toml")
    del d["stages"]["decay_other"]
    d["stages"]["base"]["init_from"] = "hf://no-org"
    with pytest.raises(RecipeError, match=r"stages\.decay_new\.init_from: hf://no-org: not a Hugging Face model id"):
        recipe_from_dict(d, "my.toml")
