"""Faults, driven through real processes: kill -9 during training and during a data asset's write, corrupted
artifacts, and two training materializations launched at once (the `gpu` pool)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmbert_dagster.artifacts import MANIFEST, verify_artifact
from mmbert_dagster.train.distributed import write_job

from graph_helpers import DAGSTER, REPO, cli_env, copy_home
from model_helpers import SHAPE
from stage_data import STAGE, make_stage_data

LONG_STAGE = dataclasses.replace(STAGE, tokens=40 * 1024)  # 40 optimizer steps of 1024 tokens


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return make_stage_data(tmp_path_factory.mktemp("fault_data"))


def training_process(data: dict, name: str) -> tuple[list[str], Path]:
    """The command the training asset runs per rank (``python -m mmbert_dagster.train.cli``) for one stage."""
    folder = data["root"] / name
    folder.mkdir()
    job = write_job(folder / "job.json", LONG_STAGE, SHAPE, folder / "metrics.json", shards_dir=data["shards"],
                    tokenizer_dir=data["tokenizer"], out_dir=folder / "out", state_dir=folder / "state", seed=0,
                    micro_batch_tokens=512, checkpoint_every=1, device="cpu")
    return [sys.executable, "-m", "mmbert_dagster.train.cli", "--job", str(job)], folder


def checkpointed_step(folder: Path) -> int:
    try:
        return json.loads((folder / "state" / "trainer_state" / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_rerun_resumes_to_the_same_weights(data):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd, full = training_process(data, "uninterrupted")
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)

    kill_at = random.randint(3, 20)
    cmd, folder = training_process(data, "killed")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while checkpointed_step(folder) < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the stage ended before step {kill_at}: cannot test the kill"
    killed_at = checkpointed_step(folder)
    assert killed_at >= kill_at and not (folder / "out" / "model.safetensors").exists()

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["resumed_from"] >= killed_at and metrics["steps"] == 40, (kill_at, killed_at, metrics["resumed_from"])
    a, b = load_file(str(full / "out" / "model.safetensors")), load_file(str(folder / "out" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"killed at step {kill_at}: weights differ by {worst}"
    assert torch.equal(a["model.embeddings.tok_embeddings.weight"], b["model.embeddings.tok_embeddings.weight"])


@pytest.mark.slow
def test_kill_9_during_a_data_asset_write_leaves_the_previous_artifact_and_the_rerun_completes(graph, tmp_path):
    home = copy_home(graph, tmp_path / "home", ["raw_corpus"])
    before = verify_artifact(home / "e2e" / "raw_corpus")
    # a bigger corpus than the session graph's, so the write takes long enough to be caught in the middle
    corpus = tmp_path / "bigger.jsonl"
    import polars as pl

    docs = pl.read_parquet(graph["corpus"])
    pl.concat([docs.with_columns(doc_id=pl.col("doc_id") + f"-{k}") for k in range(6)]).write_ndjson(corpus)
    config = json.dumps({"resources": {"corpus": {"config": {
        "kind": "local", "paths": [str(corpus)], "lang_field": "declared_lang", "id_field": "doc_id"}}}})
    cmd = [DAGSTER, "asset", "materialize", "--select", "raw_corpus", "--config-json", config]
    env = cli_env(home)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: the kill reaches every process
    parent = home / "e2e"
    deadline = time.time() + 120
    partial = []
    while not partial and proc.poll() is None and time.time() < deadline:
        partial = [p for p in parent.glob(".raw_corpus.tmp-*") if any(p.rglob("*.parquet"))]
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial, "the write finished before it could be killed"
    # the partial write stays out of sight; the previous artifact is whole and unchanged
    assert verify_artifact(parent / "raw_corpus") == before
    assert sorted(p.name for p in parent.iterdir() if not p.name.startswith(".")) == ["raw_corpus"]

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    after = verify_artifact(parent / "raw_corpus")
    assert after != before and not list(parent.glob(".raw_corpus.*"))  # stale temporaries cleaned up


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_shard_is_refused_by_name_and_nothing_is_trained(graph, tmp_path, damage):
    keys = ["raw_corpus", "tokenizer", "mixture_pretrain", "shards_pretrain"]
    home = copy_home(graph, tmp_path / "home", keys)
    shard = sorted((home / "e2e" / "shards_pretrain").glob("*.ds"))[0]
    raw = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(raw[: len(raw) // 2])
    else:
        raw[len(raw) // 2] ^= 0xFF
        shard.write_bytes(raw)
    proc = subprocess.run([DAGSTER, "asset", "materialize", "--select", "pretrain_checkpoint"], cwd=REPO,
                          env=cli_env(home), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"file {shard}" in out and ("truncated" if damage == "truncate" else "SHA-256") in out
    assert not (home / "e2e" / "pretrain_checkpoint").exists()


def step_window(instance, run_id: str, step_key: str) -> tuple[float, float]:
    from dagster import DagsterEventType

    times = {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event and event.step_key == step_key and event.event_type in (
                DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS):
            times[event.event_type] = record.timestamp
    return times[DagsterEventType.STEP_START], times[DagsterEventType.STEP_SUCCESS]


@pytest.mark.slow
def test_two_training_materializations_launched_at_once_are_serialized_by_the_gpu_pool(graph, tmp_path):
    from dagster import DagsterInstance

    keys = ["raw_corpus", "tokenizer", "midtrain_checkpoint", *(f"{p}_{s}" for p in ("mixture", "shards")
                                                                for s in ("decay_eng", "decay_cont"))]
    home = copy_home(graph, tmp_path / "home", keys)
    env = cli_env(home)
    DagsterInstance.from_config(str(home / "dagster")).dispose()  # create the run storage before two CLIs race to
    procs = {key: subprocess.Popen([DAGSTER, "asset", "materialize", "--select", key], cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for key in ("decay_eng", "decay_cont")}
    outputs = {key: p.communicate(timeout=600)[0] for key, p in procs.items()}
    for key, p in procs.items():
        assert p.returncode == 0, outputs[key][-3000:]
    instance = DagsterInstance.from_config(str(home / "dagster"))
    try:
        windows = {}
        for run in instance.get_runs():
            (key,) = {k.to_user_string() for k in run.asset_selection}
            windows[key] = step_window(instance, run.run_id, key)
    finally:
        instance.dispose()
    (a_start, a_end), (b_start, b_end) = sorted(windows.values())
    assert a_end <= b_start, f"the two training steps overlapped: {windows}"
    for key in procs:
        assert (home / "e2e" / key / MANIFEST).is_file()
