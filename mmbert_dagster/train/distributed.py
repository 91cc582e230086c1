"""Data-parallel training across processes started by torchrun (gloo on CPU, NCCL on GPU).

Inside ``run_stage``: :func:`setup` joins the process group when torchrun started us (``WORLD_SIZE > 1``);
every rank builds the same model (same seed), reads a disjoint slice of the documents, and trains the model
wrapped by :func:`data_parallel` — torch's ``DistributedDataParallel``, which broadcasts rank 0's weights once
and AVERAGES the gradients over the ranks during the backward pass of a step's last micro-batch
(:func:`gradient_sync`: the others accumulate locally under ``no_sync``). Each rank's loss is divided by the
step's global number of predicted tokens / ``world`` (see ``step.train_step``), so that average is exactly the
gradient of the whole step's mean loss.

From outside: :func:`launch` runs ``torchrun … -m mmbert_dagster.train.cli …`` in a subprocess as a
:class:`Launcher` describes it (one node: ``--standalone``; several: c10d rendezvous, each node started by a
prefix such as ``srun``); :func:`run_stage_distributed` wraps it for one stage and returns rank 0's metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mmbert_dagster.child import run_child
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


def data_parallel(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` when there are several ranks (rank 0's weights and buffers are
    broadcast now; buffers are not re-broadcast at every forward: ours are the RoPE frequencies, equal on every
    rank); ``model`` itself in a single process. Save and evaluate ``model``, train the returned module."""
    if info.world <= 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def gradient_sync(model: torch.nn.Module, sync: bool):
    """Context of one micro-batch's forward and backward: with ``sync`` False, DDP only accumulates the gradients
    locally (``no_sync``); with ``sync`` True (a step's last micro-batch) they are averaged over the ranks."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


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


@dataclass(frozen=True)
class Launcher:
    """How training processes are started: torchrun with ``nproc_per_node`` processes on each of ``nnodes`` nodes.

    One node: ``torchrun --standalone``. Several: every node runs the same torchrun command (started by
    ``prefix``, e.g. ``("srun", "--nodes=4", "--ntasks-per-node=1")`` under Slurm) and they meet at
    ``rdzv_endpoint`` (``host:port`` reachable from all nodes; c10d rendezvous assigns node ranks). The job file
    and the artifact root must then be on a filesystem every node sees.
    """

    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str = ""
    prefix: tuple[str, ...] = ()

    def __post_init__(self):
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ValueError(f"nproc_per_node and nnodes must be >= 1, got {self.nproc_per_node}, {self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes = {self.nnodes} needs rdzv_endpoint (host:port of the rendezvous)")

    @property
    def distributed(self) -> bool:
        return self.nproc_per_node * self.nnodes > 1

    def command(self, module_args: list[str], run_id: str = "mmbert") -> list[str]:
        if self.nnodes == 1:
            where = ["--standalone"]
        else:
            where = [f"--nnodes={self.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}",
                     f"--rdzv-id={run_id}"]
        return [*self.prefix, sys.executable, "-m", "torch.distributed.run", *where,
                f"--nproc-per-node={self.nproc_per_node}", "-m", "mmbert_dagster.train.cli", *module_args]


def launch(launcher: Launcher | int, module_args: list[str], *, env: dict | None = None, log=print,
           timeout: float | None = None, run_id: str = "mmbert") -> str:
    """Run ``launcher.command(module_args)`` (torchrun ... -m mmbert_dagster.train.cli); return its output, raise
    ``child.ChildProcessFailed`` (naming the command and quoting the end of the output) on failure.

    Output lines are passed to ``log`` as they arrive. An int means that many processes on this node.
    """
    launcher = Launcher(nproc_per_node=launcher) if isinstance(launcher, int) else launcher
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launcher.nproc_per_node)))
    cmd = launcher.command(module_args, run_id)
    return run_child(cmd, what=f"torchrun ({' '.join(cmd)})", log=log, timeout=timeout,
                     env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, **(env or {})})


def run_stage_distributed(stage: Stage, shape: ModelShape, launcher: Launcher | int, *, log=print, **kwargs) -> dict:
    """``run_stage`` in torchrun processes (an int: that many on this node); returns rank 0's metrics.
    ``kwargs``: run_stage's keyword arguments (paths, init_from, heldout_texts, seed, device, micro_batch_tokens,
    checkpoint_every, max_steps). The job file goes into ``state_dir`` (on the artifact root, which every node
    of a multi-node run must see)."""
    state_dir = Path(kwargs["state_dir"])
    state_dir.mkdir(parents=True, exist_ok=True)
    job_path = write_job(state_dir / "job.json", stage, shape, state_dir / "metrics.json", **kwargs)
    (state_dir / "metrics.json").unlink(missing_ok=True)
    launch(launcher, ["--job", str(job_path)], log=log, run_id=f"{stage.name}-{os.getpid()}")
    return json.loads((state_dir / "metrics.json").read_text())


def write_job(path: Path, stage: Stage, shape: ModelShape, metrics_out: Path, **kwargs) -> Path:
    """The job file ``python -m mmbert_dagster.train.cli --job`` reads (see that module)."""
    job = {"stage": dataclasses.asdict(stage), "shape": dataclasses.asdict(shape),
           "kwargs": {k: (str(v) if isinstance(v, Path) else v) for k, v in kwargs.items()},
           "metrics_out": str(metrics_out)}
    Path(path).write_text(json.dumps(job))
    return Path(path)
