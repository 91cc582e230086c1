"""The training core (mmbert_dagster.train): attention, packing, masking, schedule, checkpoints, loop, DDP."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses
import json
import re
import shutil
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from mmbert_dagster.data.shards import ShardError
from mmbert_dagster.data.tokenizer import train_tokenizer
from mmbert_dagster.recipe import Stage, TokenizerConfig
from mmbert_dagster.train.attention import ATTN_NAME
from mmbert_dagster.train.checkpoint import CheckpointError, read_state
from mmbert_dagster.train.inputs import TokenizerMismatch
from mmbert_dagster.train.loop import initial_model, run_stage
from mmbert_dagster.train.masking import mask_batch, mask_tokens, micro_batch_generator
from mmbert_dagster.train.metrics import read_metrics
from mmbert_dagster.train.model import build_model, context_of, extend_context, load_model, local_rope_theta_of
from mmbert_dagster.train.optim import micro_batch_geometry
from mmbert_dagster.train.packing import IGNORE, DataPosition, Packer, collate, split_document
from mmbert_dagster.train.schedule import accum_schedule, lr_at, total_steps_for, warmup_steps_for, warmup_steps_in

from model_helpers import SHAPE, SPECIALS, VOCAB, free_port, random_doc, reference_copy
from stage_data import QUIET, STAGE, WORDS, make_stage_data

# ------------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("window, lengths", [
    (16, [40, 100, 7, 70, 9, 64, 55]),  # 9 = w + 1 (no mask needed); 64+ = blockwise; the rest band-masked
    (128, [600, 200, 60, 130]),  # the real window: band mask (200) and blockwise (600) paths
    (16, [70, 9, 70, 100, 9, 70, 100]),  # equal lengths share one batched SDPA call on every path
])
def test_packed_loss_equals_per_document_loss(window, lengths):
    torch.manual_seed(0)
    shape = dataclasses.replace(SHAPE, local_window=window)
    model = build_model(shape, VOCAB, SPECIALS, 1024, 10_000.0).eval()
    assert model.config._attn_implementation == ATTN_NAME
    ref = reference_copy(model)
    rng = np.random.default_rng(0)
    docs = [random_doc(rng, n) for n in lengths]
    batch = mask_batch(collate(docs), 0.3, mask_id=SPECIALS["mask"], vocab_size=VOCAB,
                       special_ids=SPECIALS.values(), generator=torch.Generator().manual_seed(1))

    packed = model(**batch.model_inputs())
    packed_loss = packed.loss
    packed_loss.backward()
    packed_grad = model.model.embeddings.tok_embeddings.weight.grad.clone()

    n_pred = int((batch.labels != IGNORE).sum())
    total = 0.0
    bounds = batch.cu_seqlens.tolist()
    for s, e in pairwise(bounds):
        ids, labels = batch.input_ids[:, s:e], batch.labels[:, s:e]
        out = ref(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(n_pred))  # sum CE / all predictions
        total = total + out.loss
    total.backward()
    with torch.no_grad():
        logits = [ref(input_ids=torch.from_numpy(d)[None]).logits[0] for d in docs]
    with torch.no_grad():
        dense = model(**collate(docs).model_inputs()).logits[0]
    assert torch.allclose(dense, torch.cat(logits), atol=1e-5), (dense - torch.cat(logits)).abs().max()
    assert packed_loss.item() == pytest.approx(total.item(), abs=1e-5)
    ref_grad = ref.model.embeddings.tok_embeddings.weight.grad
    assert torch.allclose(packed_grad, ref_grad, atol=1e-6), (packed_grad - ref_grad).abs().max()

    # the test has teeth: one block-diagonal mask for all layers (sliding layers see whole documents) is wrong
    doc_of = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor([d.size for d in docs]))
    block = (doc_of[:, None] == doc_of[None, :])[None, None]
    with torch.no_grad():
        wrong = ref(input_ids=collate(docs).input_ids,
                    attention_mask={"full_attention": block, "sliding_attention": block}).logits[0]
    assert (wrong - dense).abs().max() > 1e-4


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = build_model(SHAPE, VOCAB, SPECIALS, 128, 10_000.0)
    rng = np.random.default_rng(3)
    docs = [random_doc(rng, int(n)) for n in rng.integers(20, 120, 8)]
    masked = [mask_batch(collate([d]), 0.3, mask_id=4, vocab_size=VOCAB, special_ids=SPECIALS.values(),
                         generator=torch.Generator().manual_seed(i)) for i, d in enumerate(docs)]
    n_pred = torch.tensor(sum(int((b.labels != IGNORE).sum()) for b in masked))

    def row(parts):
        b = collate([p.input_ids[0].numpy() for p in parts])
        b.labels = torch.cat([p.labels for p in parts], dim=1)
        return b

    def grads(rows):
        model.zero_grad()
        for b in rows:
            model(**b.model_inputs(), num_items_in_batch=n_pred).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    one = grads([row(masked)])
    accumulated = grads([row(masked[:3]), row(masked[3:5]), row(masked[5:])])
    assert torch.allclose(one, accumulated, atol=1e-6)
    assert micro_batch_geometry(4096, 1024, 2, 256) == (2, 1024)
    assert micro_batch_geometry(4096, 8192, 1, 256) == (1, 4096)
    assert micro_batch_geometry(1000, 300, 1, 512) == (4, 512)  # a context-length piece must fit


# ------------------------------------------------------------------------------------------ packing


def test_long_documents_are_cut_into_wrapped_pieces_of_at_most_context_length():
    rng = np.random.default_rng(0)
    doc = random_doc(rng, 300)
    pieces = split_document(doc, 128, SPECIALS["cls"], SPECIALS["sep"])
    assert len(pieces) == 3 and all(p.size <= 128 for p in pieces)
    assert max(p.size for p in pieces) - min(p.size for p in pieces) <= 1  # equal sizes, no tiny tail
    assert all(p[0] == SPECIALS["cls"] and p[-1] == SPECIALS["sep"] for p in pieces)
    assert np.array_equal(np.concatenate([p[1:-1] for p in pieces]), doc[1:-1])  # nothing lost or repeated
    short = random_doc(rng, 128)
    assert [p.tolist() for p in split_document(short, 128, 2, 3)] == [short.tolist()]


def test_packer_is_deterministic_resumable_and_splits_ranks_disjointly():
    rng = np.random.default_rng(1)
    docs = [random_doc(rng, int(n)) for n in rng.normal(100, 60, 60).clip(5, 400)]

    def packer(**kw):
        return Packer(docs, 512, 128, SPECIALS, **kw)

    p = packer(cycle=False)
    batches = list(p)
    content = []
    for b in batches:
        assert b.n_tokens <= 512 and b.labels is None
        bounds = b.cu_seqlens.tolist()
        assert bounds[0] == 0 and bounds[-1] == b.n_tokens and b.cu_seqlens.dtype == torch.int32
        assert b.max_seqlen == max(e - s for s, e in pairwise(bounds)) <= 128
        for s, e in pairwise(bounds):
            assert b.position_ids[0, s:e].tolist() == list(range(e - s))  # restart per document
            assert b.input_ids[0, s] == SPECIALS["cls"] and b.input_ids[0, e - 1] == SPECIALS["sep"]
            content.append(b.input_ids[0, s + 1:e - 1].numpy())
    assert np.array_equal(np.concatenate(content), np.concatenate([d[1:-1] for d in docs]))  # every token once

    # resume: a packer started at the position after batch k continues identically
    p2 = packer()
    first = [next(p2) for _ in range(4)]
    resumed = packer(position=DataPosition.from_dict(json.loads(json.dumps(p2.position.to_dict()))), cycle=False)
    for a, b in zip(batches[4:], resumed, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.cu_seqlens, b.cu_seqlens)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches, first))
    # cycling: after the last document the next epoch starts again at document 0 (of this rank)
    p3 = packer()
    for _ in range(len(batches)):
        next(p3)
    assert p3.position.epoch == 1

    # two ranks read disjoint documents that together are all of them
    seen = []
    for rank in (0, 1):
        for b in Packer(docs, 512, 128, SPECIALS, rank=rank, world=2, cycle=False):
            bounds = b.cu_seqlens.tolist()
            seen += [tuple(b.input_ids[0, s + 1:e - 1].tolist()) for s, e in pairwise(bounds)]
    pieces = [tuple(p[1:-1].tolist()) for d in docs for p in split_document(d, 128, 2, 3)]
    assert sorted(seen) == sorted(pieces)


def test_shuffle_window_mixes_documents_reads_every_piece_once_and_resumes():
    rng = np.random.default_rng(2)
    docs = [random_doc(rng, int(n)) for n in rng.integers(500, 900, 30)]  # 4..8 pieces each at context 128
    owner = {tuple(p.tolist()): i for i, d in enumerate(docs) for p in split_document(d, 128, 2, 3)}

    def read(batches):
        return [[owner[tuple(b.input_ids[0, s:e].tolist())] for s, e in pairwise(b.cu_seqlens.tolist())]
                for b in batches]

    def packer(**kw):
        return Packer(docs, 512, 128, SPECIALS, **{"shuffle_window": 8, "seed": 5, **kw})

    in_order = read(Packer(docs, 512, 128, SPECIALS, cycle=False))
    shuffled = read(packer(cycle=False))
    assert sorted(sum(shuffled, [])) == sorted(sum(in_order, []))  # every piece exactly once
    assert sorted(set(sum(shuffled, []))) == list(range(len(docs)))
    # the point of the window: a micro-batch holds pieces of several documents, not one long document's run
    def docs_per_batch(rows):
        return np.mean([len(set(r)) for r in rows])
    assert docs_per_batch(in_order) < 1.7 and docs_per_batch(shuffled) > 3.0, (docs_per_batch(in_order), docs_per_batch(shuffled))
    # a window only mixes its own documents: a batch draws from at most two adjacent windows
    assert all(max(r) // 8 - min(r) // 8 <= 1 for r in shuffled)
    assert read(packer(seed=6, cycle=False)) != shuffled

    # resume at every position, across window boundaries and into the next (reshuffled) epoch
    p = packer()
    stream = [next(p) for _ in range(2 * len(shuffled))]
    epoch2 = packer(position=DataPosition(1, 0, 0))
    assert read([next(epoch2) for _ in range(3)]) != shuffled[:3]  # the next epoch is reshuffled
    p = packer()
    for k in range(len(stream) - 3):
        assert torch.equal(next(p).input_ids, stream[k].input_ids)
        resumed = packer(position=DataPosition.from_dict(json.loads(json.dumps(p.position.to_dict()))))
        assert all(torch.equal(next(resumed).input_ids, b.input_ids) for b in stream[k + 1:k + 4])

    # ranks: disjoint, complete
    seen = sum((read(packer(rank=r, world=3, cycle=False)) for r in range(3)), [])
    assert sorted(sum(seen, [])) == sorted(sum(in_order, []))
    with pytest.raises(ValueError, match="windows of 8"):
        packer(position=DataPosition(0, 3, 0))  # not the first document of a window


# ------------------------------------------------------------------------------------------ masking


def test_masking_rate_80_10_10_split_and_never_special_tokens():
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(5, 1000, 200_000))
    special_pos = torch.from_numpy(rng.random(ids.numel()) < 0.05)
    ids[special_pos] = torch.from_numpy(rng.choice([0, 1, 2, 3], int(special_pos.sum())))
    masked, labels = mask_tokens(ids, 0.3, mask_id=4, vocab_size=1000, special_ids=SPECIALS.values(),
                                 generator=torch.Generator().manual_seed(0))
    selected = labels != IGNORE
    assert not selected[special_pos].any() and torch.equal(masked[special_pos], ids[special_pos])
    assert selected.sum() / (~special_pos).sum() == pytest.approx(0.3, abs=0.005)
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(masked[~selected], ids[~selected])
    n = int(selected.sum())
    to_mask = int((masked[selected] == 4).sum())
    unchanged = int((masked[selected] == ids[selected]).sum())
    random_ = n - to_mask - unchanged
    assert to_mask / n == pytest.approx(0.8, abs=0.01)
    assert unchanged / n == pytest.approx(0.1 + 0.1 / 995, abs=0.01)  # kept, plus random draws of the same id
    assert random_ / n == pytest.approx(0.1, abs=0.01)
    assert not torch.isin(masked[selected & (masked != 4)], torch.tensor([0, 1, 2, 3])).any()
    again, labels2 = mask_tokens(ids, 0.3, mask_id=4, vocab_size=1000, special_ids=SPECIALS.values(),
                                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, masked) and torch.equal(labels2, labels)  # seeded
    other, _ = mask_tokens(ids, 0.3, mask_id=4, vocab_size=1000, special_ids=SPECIALS.values(),
                           generator=micro_batch_generator(0, "pretrain", 0, 1, 0))
    assert not torch.equal(other, masked)
    # a tiny input still predicts one token
    _, few = mask_tokens(torch.tensor([2, 7, 3]), 0.01, mask_id=4, vocab_size=10, special_ids=[0, 1, 2, 3],
                         generator=torch.Generator().manual_seed(0))
    assert few.tolist() == [IGNORE, 7, IGNORE]


# ------------------------------------------------------------------------------------------ schedule


def test_lr_schedule_shapes_at_stage_boundaries():
    peak, final = 1e-3, 2e-5
    # warmup: linear to the peak at the last warmup step, then constant ("none")
    assert lr_at(0, 100, 10, peak, final, "none") == pytest.approx(peak / 10)
    assert lr_at(9, 100, 10, peak, final, "none") == pytest.approx(peak)
    assert all(lr_at(s, 100, 10, peak, final, "none") == peak for s in range(10, 100))
    assert lr_at(0, 100, 0, peak, final, "none") == peak
    # decays: over the whole stage, peak at the first step, exactly lr_final at the last
    for decay in ("1-sqrt", "linear"):
        lrs = [lr_at(s, 100, 0, peak, final, decay) for s in range(100)]
        assert lrs[0] == pytest.approx(peak) and lrs[-1] == pytest.approx(final, rel=1e-12)
        assert all(a >= b for a, b in pairwise(lrs))
    mid = 1 - np.sqrt(0.5)
    assert lr_at(50, 101, 0, peak, final, "1-sqrt") == pytest.approx(final + (peak - final) * mid)
    assert lr_at(50, 101, 0, peak, final, "linear") == pytest.approx(final + (peak - final) * 0.5)
    assert lr_at(10, 50, 10, peak, final, "linear") == pytest.approx(peak)  # decay starts after warmup
    with pytest.raises(ValueError, match="decay"):
        lr_at(0, 10, 0, peak, final, "cosine")
    # steps from tokens
    assert total_steps_for(STAGE) == 5 and warmup_steps_for(STAGE) == 2
    assert total_steps_for(dataclasses.replace(STAGE, tokens=100)) == 1


def test_batch_size_warm_up_grows_the_step_linearly_then_holds_the_full_batch():
    """mmBERT's pre-training grows the batch from 48 sequences over 60B tokens: here from 256 to 4096 tokens over
    the first 16k of a 64k-token stage, in micro-batches of 256 tokens (16 make the full batch)."""
    stage = dataclasses.replace(STAGE, tokens=65_536, batch_tokens=4096, batch_warmup_tokens=16_384,
                                batch_warmup_min_tokens=256, warmup_tokens=8192)
    assert accum_schedule(STAGE, 2, 512) is None  # no warm-up: a constant batch, tokens // batch_tokens steps
    accums = accum_schedule(stage, 16, 256)
    assert accums[0] == 1 and all(a <= b for a, b in pairwise(accums)) and max(accums) == 16
    seen = np.cumsum([0] + [a * 256 for a in accums])
    for k, a in enumerate(accums):  # linear in the tokens seen, then the full batch
        assert a == min(16, max(1, int(np.ceil((256 + (4096 - 256) * min(seen[k] / 16_384, 1)) / 256))))
    assert seen[-1] >= 65_536 > seen[-2]  # the stage's budget, and not a step more
    assert len(accums) > 65_536 // 4096  # more (smaller) steps than without the warm-up
    assert warmup_steps_in(accums, 256, 8192) == int(np.argmax(seen >= 8192))  # the LR warm-up counts tokens too


def test_a_stage_with_batch_size_warm_up_trains_with_growing_steps(data):
    stage = dataclasses.replace(STAGE, tokens=4096, batch_tokens=1024, batch_warmup_tokens=2048,
                                batch_warmup_min_tokens=256)
    m = train(data, "batch_warmup", stage=stage, micro_batch_tokens=256)
    assert m["steps"] == m["total_steps"] > 4 and not m["interrupted"]  # 4 steps without the warm-up
    rows = [r for r in read_metrics(data["root"] / "batch_warmup" / "out") if "train/tokens" in r]
    per_step = np.diff([0] + [r["train/tokens"] for r in rows])
    assert per_step[0] < per_step[-1] and per_step[-1] <= 1024


# ------------------------------------------------------------------------------------------ model


def test_extend_context_changes_global_rope_only_and_is_saved(tmp_path):
    torch.manual_seed(0)
    model = build_model(SHAPE, VOCAB, SPECIALS, 128, 10_000.0)
    local_before = model.model.rotary_emb.sliding_attention_inv_freq.clone()
    extend_context(model, 1024, 160_000.0)
    assert context_of(model) == (1024, 160_000.0)
    assert torch.equal(model.model.rotary_emb.sliding_attention_inv_freq, local_before)
    model.save_pretrained(str(tmp_path))
    loaded = load_model(tmp_path)
    assert context_of(loaded) == (1024, 160_000.0)
    assert loaded.config.rope_parameters["sliding_attention"]["rope_theta"] == SHAPE.local_rope_theta
    fresh = build_model(SHAPE, VOCAB, SPECIALS, 1024, 160_000.0)
    assert torch.allclose(loaded.model.rotary_emb.full_attention_inv_freq,
                          fresh.model.rotary_emb.full_attention_inv_freq)
    doc = collate([random_doc(np.random.default_rng(0), 700)])
    with torch.no_grad():
        assert torch.allclose(model(**doc.model_inputs()).logits, loaded(**doc.model_inputs()).logits, atol=1e-5)
    cfg = loaded.config
    assert (cfg.pad_token_id, cfg.cls_token_id, cfg.sep_token_id, cfg.mask_token_id) == (0, 2, 3, 4)
    assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention"] and cfg.sparse_prediction


def test_a_stage_local_rope_theta_moves_the_local_layers_and_is_saved(tmp_path):
    """mmBERT's context extension raises the local layers' θ too (configs/mmBERT-*-ext.yaml); 0 keeps the model's."""
    from mmbert_dagster.train.inputs import Vocabulary

    torch.manual_seed(0)
    model = build_model(SHAPE, VOCAB, SPECIALS, 128, 10_000.0)
    model.save_pretrained(str(tmp_path))
    vocab = Vocabulary(size=VOCAB, specials=SPECIALS)
    mid = dataclasses.replace(STAGE, name="midtrain", context_length=256, rope_theta=160_000.0)
    kept = initial_model(mid, SHAPE, vocab, tmp_path, seed=0, attn="auto", log=QUIET)
    assert context_of(kept) == (256, 160_000.0) and local_rope_theta_of(kept) == SHAPE.local_rope_theta
    moved = initial_model(dataclasses.replace(mid, local_rope_theta=160_000.0), SHAPE, vocab, tmp_path, seed=0,
                          attn="auto", log=QUIET)
    assert local_rope_theta_of(moved) == 160_000.0
    assert not torch.allclose(moved.model.rotary_emb.sliding_attention_inv_freq,
                              kept.model.rotary_emb.sliding_attention_inv_freq)
    moved.save_pretrained(str(tmp_path / "saved"))
    assert local_rope_theta_of(load_model(tmp_path / "saved")) == 160_000.0
    assert torch.equal(moved.model.embeddings.tok_embeddings.weight, kept.model.embeddings.tok_embeddings.weight)


# ------------------------------------------------------------------------------------------ the loop


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return make_stage_data(tmp_path_factory.mktemp("train_data"))


def train(data, name: str, stage: Stage = STAGE, **kw) -> dict:
    folder = data["root"] / name
    args = {"shards_dir": data["shards"], "tokenizer_dir": data["tokenizer"], "out_dir": folder / "out",
            "state_dir": folder / "state", "seed": 0, "micro_batch_tokens": 512, "log": QUIET}
    return run_stage(stage, SHAPE, **{**args, **kw})


@pytest.fixture(scope="module")
def uninterrupted(data) -> dict:
    return train(data, "full", heldout_texts=data["heldout"], checkpoint_every=100)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_stage_trains_and_reports_metrics(uninterrupted, data):
    m = uninterrupted
    assert m["steps"] == m["total_steps"] == 5 and not m["interrupted"] and m["accum"] == 2
    assert len(m["losses"]) == len(m["lr"]) == 5 and m["lr"][0] == pytest.approx(5e-4) and m["lr"][2] == 1e-3
    assert m["final_loss"] < m["initial_loss"] and np.isfinite(m["heldout_loss"])
    assert 4000 < m["tokens"] <= 5 * 1024 and m["tokens_per_s"] > 0
    lines = [json.loads(x) for x in (data["root"] / "full/out/logs/metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "train/loss" in x]
    assert [x["step"] for x in train_lines] == [1, 2, 3, 4, 5]
    assert all(0.2 < x["train/mask_rate"] < 0.4 for x in train_lines)
    assert any("heldout/loss" in x for x in lines)


def test_stop_at_step_k_then_resume_equals_uninterrupted_run(uninterrupted, data):
    stopped = train(data, "resumed", checkpoint_every=2, max_steps=3)  # "killed" after step 3, checkpoint at 2
    assert stopped["interrupted"] and stopped["steps"] == 3
    assert not (data["root"] / "resumed/out/model.safetensors").exists()
    state = read_state(data["root"] / "resumed/state")
    assert state["step"] == 2 and (state["positions"][0]["doc"], state["positions"][0]["piece"]) > (0, 0)
    resumed = train(data, "resumed", heldout_texts=data["heldout"], checkpoint_every=2)
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 5
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"], abs=1e-6)
    assert resumed["heldout_loss"] == pytest.approx(uninterrupted["heldout_loss"], abs=1e-6)
    a, b = weights(data["root"] / "full/out"), weights(data["root"] / "resumed/out")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    steps = [json.loads(x)["step"] for x in (data["root"] / "resumed/out/logs/metrics.jsonl").read_text().splitlines()
             if "train/loss" in x]
    assert steps == [1, 2, 3, 4, 5]  # step 3 was trained twice but is logged once
    # a finished stage run again only rewrites its output
    again = train(data, "resumed", checkpoint_every=2)
    assert again["resumed_from"] == 5 and again["losses"] == resumed["losses"]


def test_corrupted_or_foreign_checkpoint_is_refused(uninterrupted, data):
    folder = data["root"] / "bad"
    shutil.copytree(data["root"] / "full/state", folder / "state")
    with pytest.raises(CheckpointError, match="seed"):
        train(data, "bad", seed=1)
    with pytest.raises(CheckpointError, match="stage.shuffle_window_docs: checkpoint 64, this run 8"):
        train(data, "bad", stage=dataclasses.replace(STAGE, shuffle_window_docs=8))
    opt = folder / "state/trainer_state/optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        train(data, "bad")


@pytest.fixture(scope="module")
def other_tokenizer(data) -> Path:
    folder = data["root"] / "other_tokenizer"
    rows = [("eng_Latn", " ".join(WORDS[::-1]) * 3)] * 20
    train_tokenizer(rows, folder, TokenizerConfig(vocab_size=VOCAB - 64, sample_bytes_per_lang=50_000,
                                                  min_frequency=1), log=QUIET)
    return folder


def test_a_tokenizer_other_than_the_shards_one_is_refused(data, other_tokenizer):
    with pytest.raises(ShardError, match=r"another tokenizer than .*other_tokenizer/tokenizer.json.*vocabulary"):
        train(data, "wrong_tokenizer", tokenizer_dir=other_tokenizer)
    assert not (data["root"] / "wrong_tokenizer" / "out").exists()


def test_an_init_checkpoint_of_another_tokenizer_is_refused_before_the_first_step(uninterrupted, data,
                                                                                  other_tokenizer):
    """A decay continuing a mid-training checkpoint made before the tokenizer changed: the shards match the
    stage's tokenizer, the checkpoint does not (its token ids mean other words)."""
    old = data["root"] / "old_checkpoint"
    shutil.copytree(data["root"] / "full/out", old)
    shutil.copy2(other_tokenizer / "tokenizer.json", old / "tokenizer.json")
    mine, theirs = old / "tokenizer.json", data["tokenizer"] / "tokenizer.json"
    with pytest.raises(TokenizerMismatch, match=rf"{re.escape(str(mine))}.*{re.escape(str(theirs))}"):
        train(data, "old_init", init_from=old)
    assert not (data["root"] / "old_init").exists()  # no step, no checkpoint, no output


def test_output_folder_loads_with_automodel_and_fill_mask_pipeline_offline(uninterrupted, data):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    out = data["root"] / "full/out"
    assert ATTN_NAME not in (out / "config.json").read_text()  # loads without our code
    model = AutoModelForMaskedLM.from_pretrained(str(out))
    assert model.config._attn_implementation == "sdpa" and context_of(model) == (128, 10_000.0)
    tok = AutoTokenizer.from_pretrained(str(out))
    fill = pipeline("fill-mask", model=str(out))
    preds = fill(f"the world is {tok.mask_token} and equal")
    assert len(preds) == 5 and all(np.isfinite(p["score"]) for p in preds)
    # the saved weights are the trained ones: padded SDPA == packed per-document attention
    packed_model = load_model(out)
    enc = tok(["the world is free", "der die und das ist nicht mit für"], padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = model(**enc).logits
        docs = [ids[m.bool()].numpy() for ids, m in zip(enc["input_ids"], enc["attention_mask"])]
        packed = packed_model(**collate(docs).model_inputs()).logits[0]
    lengths = enc["attention_mask"].sum(1).tolist()
    assert torch.allclose(packed[:lengths[0]], padded[0, :lengths[0]], atol=1e-4)
    assert torch.allclose(packed[lengths[0]:], padded[1, :lengths[1]], atol=1e-4)


def test_next_stage_continues_from_previous_with_context_extension(uninterrupted, data):
    mid = dataclasses.replace(STAGE, name="midtrain", tokens=1024, context_length=256, rope_theta=160_000.0,
                              warmup_tokens=0, mask_rate=0.15, init_from="pretrain")
    m = train(data, "mid", stage=mid, init_from=data["root"] / "full/out")
    assert m["steps"] == 1 and m["context"] == [256, 160_000.0]
    # it started from the trained weights, not from scratch: lower loss than the first pre-training step
    assert m["initial_loss"] < uninterrupted["initial_loss"]
    cfg = json.loads((data["root"] / "mid/out/config.json").read_text())
    assert cfg["max_position_embeddings"] == 256
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 160_000.0
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0


def test_train_checkpoint_writes_the_checkpoint_folder_and_resumes_only_on_the_same_inputs(uninterrupted, data,
                                                                                            tmp_path):
    from mmbert_dagster.artifacts import write_manifest
    from mmbert_dagster.train import export
    from mmbert_dagster.train.stage_run import (
        TrainSettings,
        checkpoint_inputs,
        discard_work_dir,
        prepare_work_dir,
        reusable_checkpoint,
        train_checkpoint,
    )

    def artifact(name: str, content: str) -> Path:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        (folder / "file").write_text(content)
        write_manifest(folder)
        return folder

    upstream = {"shards_pretrain": artifact("shards_pretrain", "a"), "tokenizer": artifact("tokenizer", "b")}
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    export.write_inputs(work, {"shards_pretrain": "another run's"})
    out.mkdir()
    lines = []
    result = train_checkpoint(STAGE, SHAPE, shards_dir=data["shards"], tokenizer_dir=data["tokenizer"],
                              init_from=None, upstream=upstream, out_dir=out, work_dir=work,
                              heldout_texts=data["heldout"], seed=0,
                              settings=TrainSettings(device="cpu", micro_batch_tokens=512), log=lines.append)
    assert any("discarding resume state" in line for line in lines)
    assert (work / "trainer_state").is_dir()  # kept until the caller has committed `out`
    discard_work_dir(work)
    assert not work.exists()
    assert result.metrics == export.read_summary(out) and result.metrics["steps"] == 5
    assert export.read_inputs(out) == result.inputs and set(result.inputs) == set(upstream)
    assert export.read_probes(out) == result.probes and result.probes
    assert read_state(out)["step"] == 5 and (out / "logs/metrics.jsonl").is_file()
    a, b = weights(out), weights(data["root"] / "full/out")  # the same stage and seed as run_stage alone
    assert all(torch.equal(a[k], b[k]) for k in b)

    # a committed checkpoint is reused only for the same inputs and code version
    write_manifest(out)
    assert reusable_checkpoint(out, upstream, "") == result
    assert reusable_checkpoint(out, upstream, "another code version") is None
    assert reusable_checkpoint(tmp_path / "nothing", upstream, "") is None

    # resume state: kept for the same upstream artifacts, discarded once one of them changed
    inputs = prepare_work_dir(work, checkpoint_inputs(upstream), QUIET)
    (work / "trainer_state").mkdir()
    assert prepare_work_dir(work, checkpoint_inputs(upstream), QUIET) == inputs and (work / "trainer_state").is_dir()
    artifact("tokenizer", "c")
    assert reusable_checkpoint(out, upstream, "") is None  # an input changed
    assert prepare_work_dir(work, checkpoint_inputs(upstream), QUIET) != inputs
    assert not (work / "trainer_state").exists()


def _gloo_available() -> bool:
    import torch.distributed as dist

    # launched as `python -m torch.distributed.run` (torchrun), so no torchrun script on PATH is needed
    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.skipif(not _gloo_available(), reason="needs torch.distributed with gloo")
def test_two_process_torchrun_gloo_step(data):
    from mmbert_dagster.train.distributed import run_stage_distributed

    stage = dataclasses.replace(STAGE, tokens=2 * 1024)
    folder = data["root"] / "ddp"
    lines = []
    m = run_stage_distributed(stage, SHAPE, 2, log=lines.append, shards_dir=data["shards"],
                              tokenizer_dir=data["tokenizer"], out_dir=folder / "out", state_dir=folder / "state",
                              seed=0, device="cpu", micro_batch_tokens=256, checkpoint_every=1)
    # 2 micro-batches per rank: DDP accumulates the first under no_sync and averages at the second
    assert m["world"] == 2 and m["steps"] == 2 and m["accum"] == 2 and np.isfinite(m["final_loss"])
    state = read_state(folder / "state")
    assert [p["doc"] % 2 for p in state["positions"]] == [0, 1]  # each rank its own slice
    assert (folder / "out/model.safetensors").is_file()
    assert any("step 2/2" in line for line in lines)


def test_multi_node_launch_command_uses_c10d_rendezvous():
    from mmbert_dagster.train.distributed import Launcher

    single = Launcher(nproc_per_node=8).command(["--job", "j.json"])
    assert "--standalone" in single and "--nproc-per-node=8" in single
    multi = Launcher(nproc_per_node=8, nnodes=4, rdzv_endpoint="node0:29500",
                     prefix=("srun", "--nodes=4", "--ntasks-per-node=1")).command(["--job", "j.json"], "pretrain-1")
    assert multi[:3] == ["srun", "--nodes=4", "--ntasks-per-node=1"] and "--standalone" not in multi
    assert {"--nnodes=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500", "--rdzv-id=pretrain-1"} <= set(multi)
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        Launcher(nnodes=2)


@pytest.mark.slow
@pytest.mark.skipif(not _gloo_available(), reason="needs torch.distributed with gloo")
def test_two_nodes_meet_at_the_rendezvous_and_train_one_stage(data):
    """Two torchrun agents on one machine, started by a prefix the way `srun --nodes=2 --ntasks-per-node=1`
    starts one per node, meet at a c10d rendezvous and train as one 2-rank job."""
    from mmbert_dagster.train.distributed import Launcher, run_stage_distributed

    twice = ("sh", "-c", '"$@" & first=$!; "$@"; second=$?; wait $first && exit $second', "sh")
    launcher = Launcher(nproc_per_node=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}", prefix=twice)
    folder = data["root"] / "two_nodes"
    lines = []
    m = run_stage_distributed(dataclasses.replace(STAGE, tokens=2 * 1024), SHAPE, launcher, log=lines.append,
                              shards_dir=data["shards"], tokenizer_dir=data["tokenizer"], out_dir=folder / "out",
                              state_dir=folder / "state", seed=0, device="cpu", micro_batch_tokens=512)
    assert m["world"] == 2 and m["steps"] == 2 and np.isfinite(m["final_loss"])
    assert (folder / "out/model.safetensors").is_file()


def test_metrics_log_drops_steps_trained_again_after_resume(tmp_path):
    from mmbert_dagster.train.metrics import MetricsLog

    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.write(step, {"loss": 1.0 / step})
    log.write(3, {"loss": 0.5}, prefix="heldout")
    log.close()
    resumed = MetricsLog(tmp_path, resume_step=2)
    resumed.write(3, {"loss": 0.3})
    resumed.close()
    rows = [json.loads(x) for x in (tmp_path / "logs/metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("train/loss")) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.3)]
    if resumed.tensorboard:  # only where the tensorboard package is installed
        assert list((tmp_path / "logs/tensorboard").glob("events.out.tfevents.*"))
