"""Data-parallel training across processes started by torchrun (gloo on CPU, NCCL on GPU).

Inside ``run_stage``: :func:`setup` joins the process group when torchrun started us (``WORLD_SIZE > 1``);
every rank builds the same model (same seed; rank 0's weights are broadcast anyway), reads a disjoint slice of
the documents, and after its micro-batches :func:`all_reduce_gradients` SUMS the gradients of all ranks —
each rank's loss is already divided by the step's GLOBAL number of predicted tokens, so the sum is exactly the
gradient of the whole step's mean loss, whatever the number of micro-batches on each rank. (This is what
``DistributedDataParallel`` does, written out: one flat all-reduce per optimizer step, no hooks, and no
requirement that every rank runs the same number of backward passes.)

From outside: :func:`launch` runs ``torchrun --standalone --nproc-per-node N -m mmbert_dagster.train.cli …``
in a subprocess; :func:`run_stage_distributed` wraps it for one stage and returns rank 0's metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mmbert_dagster.recipe import ModelShape, Stage


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_type: str) -> DistInfo:
    """Join torchrun's process group if there is one (``WORLD_SIZE > 1``); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    initialized_here = False
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        initialized_here = True
    return DistInfo(rank, world, local_rank, initialized_here)


def teardown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_gradients(model: torch.nn.Module, info: DistInfo) -> None:
    """Sum every parameter's gradient over the ranks with one flat all-reduce."""
    if info.world <= 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).clone()
        offset += n


def broadcast_parameters(model: torch.nn.Module, info: DistInfo) -> None:
    if info.world > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def gather_objects(obj, info: DistInfo) -> list:
    """``obj`` of every rank, in rank order (on every rank)."""
    if info.world <= 1:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def torchrun_command(nproc: int, module_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "mmbert_dagster.train.cli", *module_args]


def launch(nproc: int, module_args: list[str], *, env: dict | None = None, log=print,
           timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc-per-node N -m mmbert_dagster.train.cli <module_args>``; raise on failure.

    Output lines are passed to ``log`` as they arrive.
    """
    run_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))),
               **(env or {})}
    cmd = torchrun_command(nproc, module_args)
    proc = subprocess.Popen(cmd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            log(line.rstrip())
        proc.wait(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    out = "".join(lines)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with {proc.returncode}: {' '.join(cmd)}\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def run_stage_distributed(stage: Stage, shape: ModelShape, nproc: int, *, log=print, **kwargs) -> dict:
    """``run_stage`` in ``nproc`` torchrun processes; returns rank 0's metrics. ``kwargs``: run_stage's
    keyword arguments (paths, init_from, heldout_texts, seed, device, micro_batch_tokens, checkpoint_every,
    max_steps)."""
    with tempfile.TemporaryDirectory(prefix="mmbert-job-") as tmp:
        job = {"stage": dataclasses.asdict(stage), "shape": dataclasses.asdict(shape),
               "kwargs": {k: (str(v) if isinstance(v, Path) else v) for k, v in kwargs.items()},
               "metrics_out": str(Path(tmp) / "metrics.json")}
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        launch(nproc, ["--job", str(job_path)], log=log)
        return json.loads(Path(job["metrics_out"]).read_text())
