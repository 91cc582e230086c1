"""The training core ends a stage with the same weights as the reference run stored in tests/data/reference_stage/
(recorded with the training loop of commit 415ca1f, before its refactor): a refactor of the loop, the optimizer
step, the data order or the data-parallel gradient sum must not change what a seed trains.

Inputs (tokenizer, shards, held-out texts) are stored too, so the check does not depend on the tokenizer trainer.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmbert_dagster.train.distributed import run_stage_distributed
from mmbert_dagster.train.loop import run_stage

from model_helpers import SHAPE
from stage_data import QUIET, STAGE

REF = Path(__file__).parent / "data" / "reference_stage"
MID = dataclasses.replace(STAGE, name="midtrain", tokens=1024, context_length=256, rope_theta=160_000.0,
                          warmup_tokens=0, mask_rate=0.15, init_from="pretrain")


def common() -> dict:
    return dict(shards_dir=REF / "shards", tokenizer_dir=REF / "tokenizer", seed=0, micro_batch_tokens=512)


def assert_same_weights(out: Path, name: str) -> None:
    got, want = load_file(str(out / "model.safetensors")), load_file(str(REF / f"{name}.safetensors"))
    assert got.keys() == want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= 1e-6, f"{name}: max |Δweight| = {worst:.3g} against the stored reference"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    heldout = json.loads((REF / "heldout.json").read_text())
    m = run_stage(STAGE, SHAPE, out_dir=root / "single/out", state_dir=root / "single/state", heldout_texts=heldout,
                  log=QUIET, **common())
    losses = json.loads((REF / "losses.json").read_text())
    assert m["losses"] == pytest.approx(losses["single"], abs=1e-6)
    assert m["heldout_loss"] == pytest.approx(losses["single_heldout"], abs=1e-6)
    return root


def test_a_seeded_stage_ends_with_the_reference_weights(single):
    assert_same_weights(single / "single/out", "single")


def test_a_continued_stage_with_context_extension_ends_with_the_reference_weights(single):
    run_stage(MID, SHAPE, out_dir=single / "mid/out", state_dir=single / "mid/state",
              init_from=single / "single/out", log=QUIET, **common())
    assert_same_weights(single / "mid/out", "mid")


def test_two_rank_data_parallel_stage_ends_with_the_reference_weights(tmp_path):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    stage = dataclasses.replace(STAGE, tokens=2 * 1024)
    run_stage_distributed(stage, SHAPE, 2, out_dir=tmp_path / "out", state_dir=tmp_path / "state", device="cpu",
                          checkpoint_every=1, log=QUIET, **common())
    assert_same_weights(tmp_path / "out", "ddp")
