"""Where the data half's datatrove pipelines run: this machine, a Ray cluster, or a Slurm cluster.

datatrove's own executors do the work (``LocalPipelineExecutor``, ``RayPipelineExecutor``,
``SlurmPipelineExecutor``); this module chooses one from :class:`DataExecutorSettings`, and adds what they lack for
an orchestrator: waiting for a Slurm job array to end, per-task progress lines, and an error naming each failed
task (its rank and its log files) instead of a warning in a log.

Resume: every executor is built with ``skip_completed=True``, so a rerun with the same ``logging_dir`` runs only the
tasks without a completion marker (``<logging_dir>/completions/<rank:05d>``, written by datatrove when a task
succeeds). A task's outputs must therefore be per rank (datatrove writers with ``${rank}`` in the file name), so a
rerun task overwrites what the interrupted one left.

Environment (:func:`settings_from_env`; every name is optional):

======================================  ========================================================================
``MMBERT_DATA_EXECUTOR``                ``local`` (default), ``ray`` or ``slurm``
``MMBERT_DATA_WORKERS``                 tasks run at once (local, Ray) / array throttle ``%N`` (Slurm); 0 = auto
``MMBERT_DATA_CPUS_PER_TASK``           CPUs reserved per task (Ray, Slurm); default 1
``MMBERT_DATA_MEM_PER_CPU_GB``          memory per CPU in GB (Ray, Slurm); default 2; 0 = no reservation (Ray)
``MMBERT_RAY_ADDRESS``                  empty: start a Ray instance on this machine; ``auto``, ``host:port``,
                                        ``ray://host:port``: connect to a running cluster
``MMBERT_RAY_NUM_CPUS``                 CPUs of a Ray instance started here; 0 = all (``os.cpu_count()``)
``MMBERT_RAY_SHIP_CODE``                1/0: upload this package to the workers (runtime_env ``py_modules``);
                                        default: only when connecting to a cluster (``MMBERT_RAY_ADDRESS`` set)
``MMBERT_SLURM_PARTITION``              partition (required for ``slurm``)
``MMBERT_SLURM_TIME``                   time limit per array task, Slurm syntax; default ``01:00:00``
``MMBERT_SLURM_QOS``                    QOS; empty (default) = the cluster's default
``MMBERT_SLURM_ENV_COMMAND``            shell line run before each task, e.g. ``source /x/.venv/bin/activate``;
                                        default: activate the virtual environment of this Python, if any
``MMBERT_SLURM_SBATCH_ARGS``            more ``#SBATCH`` options: a JSON object or ``key=value,key=value``
                                        (``account=proj,constraint=cpu``); a value-less option is ``key=``
``MMBERT_SLURM_JOB_NAME_PREFIX``        job name = prefix + pipeline name; default ``mmbert-``
``MMBERT_SLURM_POLL_SECONDS``           how often ``sacct``/``squeue`` are asked while waiting; default 10
``MMBERT_SLURM_MAX_ARRAY_SIZE``         the cluster's MaxArraySize; more tasks are split over several arrays
======================================  ========================================================================

Ray: workers must import ``mmbert_dagster`` (the pipelines hold its classes, pickled by reference). A Ray instance
started here runs its workers with this Python (the virtual environment with this package installed, and Ray puts
the driver's working directory first on their ``sys.path``); for a cluster elsewhere the package is uploaded with
the job (runtime_env ``py_modules``, ~10 MiB), while datatrove and the other dependencies must be installed on the
cluster. Steps defined outside the package (a script's own classes) need their module on the workers' PYTHONPATH. A Ray instance started by this module stays up for the next pipeline of the process;
:func:`shutdown_ray` (or the end of the process) stops it. Task logs: ``<logging_dir>/logs/task_XXXXX.log``.

Slurm: datatrove's executor writes ``<logging_dir>/launch_script.slurm`` and submits it with ``sbatch`` (plus a
small ``merge_stats`` job that runs after the array); :func:`run_pipeline` then waits for the array, asking
``sacct`` (falling back to ``squeue`` where accounting is off) every ``poll_seconds``, and checks the completion
markers. The submitting machine and the compute nodes must share ``logging_dir`` and the output folders. Logs:
``<logging_dir>/logs/task_XXXXX.log`` (datatrove's) and ``<logging_dir>/slurm_logs/<jobid>_<index>.out`` (the
array task's stdout/stderr).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

KINDS = ("local", "ray", "slurm")

# Slurm job states after which an array task will not run again (sacct / squeue long names)
_SLURM_FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}
_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}|\d+-\d{1,2}:\d{1,2}|\d+-\d{1,2}:\d{1,2}:\d{1,2}"
                   r"|UNLIMITED|INFINITE|unlimited|infinite)$")
_RAY_ADDRESS = re.compile(r"^(|auto|ray://[\w.\-\[\]:]+:\d+|[\w.\-\[\]:]+:\d+)$")
_OPTION = re.compile(r"^[a-zA-Z][a-zA-Z0-9_-]*$")
_LOCAL_POLL = 0.5  # seconds between looks at the completion markers (local, Ray)


class DataExecutorError(RuntimeError):
    """Tasks of a datatrove pipeline failed (or never ran); ``failed`` holds their ranks, ``logs`` their log files."""

    def __init__(self, message: str, *, name: str = "", failed: list[int] | None = None,
                 logs: dict[int, list[str]] | None = None):
        super().__init__(message)
        self.name = name
        self.failed = list(failed or [])
        self.logs = dict(logs or {})


@dataclass(frozen=True)
class DataExecutorSettings:
    """Where datatrove pipelines run (see the module docstring for the environment variables)."""

    kind: str = "local"  # "local" | "ray" | "slurm"
    workers: int = 0  # tasks at once; 0 = auto: local min(CPUs, tasks), Ray all (the cluster's CPUs limit them),
    # Slurm no array throttle
    cpus_per_task: int = 1  # Ray and Slurm
    mem_per_cpu_gb: float = 2.0  # Ray and Slurm; 0: no memory reservation (Ray only)
    # Ray
    ray_address: str = ""  # "": start a Ray instance here; "auto", "host:port", "ray://host:port": connect
    ray_num_cpus: int = 0  # size of a Ray instance started here; 0 = os.cpu_count()
    ray_ship_code: bool | None = None  # upload mmbert_dagster to the workers; None: only for a cluster elsewhere
    # Slurm
    partition: str = ""
    time: str = "01:00:00"
    qos: str = ""  # "" = the cluster's default QOS
    env_command: str = ""  # "" = activate this Python's virtual environment (if it runs in one)
    sbatch_args: Mapping[str, Any] = field(default_factory=dict)  # extra #SBATCH options, e.g. {"account": "x"}
    job_name_prefix: str = "mmbert-"
    poll_seconds: float = 10.0
    max_array_size: int = 1001

    def __post_init__(self):
        def need(cond: bool, name: str, what: str):
            if not cond:
                raise ValueError(f"DataExecutorSettings.{name}: {what}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        need(self.kind in KINDS, "kind", f"must be one of {', '.join(KINDS)}")
        need(is_int(self.workers) and self.workers >= 0, "workers", "must be an integer >= 0 (0 = auto)")
        need(is_int(self.cpus_per_task) and self.cpus_per_task >= 1, "cpus_per_task", "must be an integer >= 1")
        need(is_num(self.mem_per_cpu_gb) and self.mem_per_cpu_gb >= 0, "mem_per_cpu_gb", "must be a number >= 0")
        need(isinstance(self.ray_address, str) and bool(_RAY_ADDRESS.match(self.ray_address)), "ray_address",
             "must be empty (start Ray here), 'auto', 'host:port' or 'ray://host:port'")
        need(is_int(self.ray_num_cpus) and self.ray_num_cpus >= 0, "ray_num_cpus", "must be an integer >= 0 (0 = all)")
        need(self.ray_ship_code is None or isinstance(self.ray_ship_code, bool), "ray_ship_code",
             "must be true, false or unset")
        need(isinstance(self.partition, str) and not re.search(r"\s", self.partition), "partition",
             "must be a partition name without spaces")
        need(isinstance(self.time, str) and bool(_TIME.match(self.time)), "time",
             "must be a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED")
        need(isinstance(self.qos, str) and not re.search(r"\s", self.qos), "qos", "must be a QOS name without spaces")
        need(isinstance(self.env_command, str) and "\n" not in self.env_command, "env_command",
             "must be one shell line")
        need(isinstance(self.sbatch_args, Mapping) and all(isinstance(k, str) and _OPTION.match(k)
                                                           for k in self.sbatch_args),
             "sbatch_args", "must map sbatch option names without dashes (e.g. 'account') to values")
        need(all(v is None or (isinstance(v, (str, int, float)) and not isinstance(v, bool) and "\n" not in str(v))
                 for v in self.sbatch_args.values()), "sbatch_args", "values must be strings or numbers, one line each")
        need(isinstance(self.job_name_prefix, str) and not re.search(r"\s", self.job_name_prefix), "job_name_prefix",
             "must not contain spaces")
        need(is_num(self.poll_seconds) and self.poll_seconds > 0, "poll_seconds", "must be a number > 0")
        need(is_int(self.max_array_size) and (self.max_array_size >= 1 or self.max_array_size == -1),
             "max_array_size", "must be an integer >= 1 (or -1: no limit)")
        if self.kind == "slurm":
            need(bool(self.partition), "partition", "is required for kind='slurm' (MMBERT_SLURM_PARTITION)")
            need(self.mem_per_cpu_gb > 0, "mem_per_cpu_gb", "must be > 0 for kind='slurm'")
        if self.kind == "ray" and not self.ray_address:
            cpus = self.ray_num_cpus or os.cpu_count() or 1
            need(self.cpus_per_task <= cpus, "cpus_per_task",
                 f"must fit the local Ray instance (ray_num_cpus = {cpus})")
        object.__setattr__(self, "sbatch_args", dict(self.sbatch_args))

    def __hash__(self):  # sbatch_args is a dict
        return hash(tuple((f.name, json.dumps(getattr(self, f.name), sort_keys=True, default=str))
                          for f in fields(self)))


# name -> (field, parser)
def _parse_bool(v: str) -> bool:
    s = v.strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no")


def _parse_sbatch_args(v: str) -> dict:
    v = v.strip()
    if not v:
        return {}
    if v.startswith("{"):
        parsed = json.loads(v)
        if not isinstance(parsed, dict):
            raise ValueError("expected a JSON object")
        return parsed
    out = {}
    for item in v.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise ValueError(f"{item.strip()!r} is not key=value")
        out[key.strip().lstrip("-")] = value.strip()
    return out


ENV_VARS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "MMBERT_DATA_EXECUTOR": ("kind", lambda v: v.strip().lower() or "local"),
    "MMBERT_DATA_WORKERS": ("workers", int),
    "MMBERT_DATA_CPUS_PER_TASK": ("cpus_per_task", int),
    "MMBERT_DATA_MEM_PER_CPU_GB": ("mem_per_cpu_gb", float),
    "MMBERT_RAY_ADDRESS": ("ray_address", str.strip),
    "MMBERT_RAY_NUM_CPUS": ("ray_num_cpus", int),
    "MMBERT_RAY_SHIP_CODE": ("ray_ship_code", _parse_bool),
    "MMBERT_SLURM_PARTITION": ("partition", str.strip),
    "MMBERT_SLURM_TIME": ("time", str.strip),
    "MMBERT_SLURM_QOS": ("qos", str.strip),
    "MMBERT_SLURM_ENV_COMMAND": ("env_command", str.strip),
    "MMBERT_SLURM_SBATCH_ARGS": ("sbatch_args", _parse_sbatch_args),
    "MMBERT_SLURM_JOB_NAME_PREFIX": ("job_name_prefix", str.strip),
    "MMBERT_SLURM_POLL_SECONDS": ("poll_seconds", float),
    "MMBERT_SLURM_MAX_ARRAY_SIZE": ("max_array_size", int),
}


def settings_from_env(environ: Mapping[str, str] | None = None, **overrides) -> DataExecutorSettings:
    """Settings from the ``MMBERT_*`` variables of ``environ`` (default ``os.environ``; table in the module
    docstring); keyword ``overrides`` (field names of :class:`DataExecutorSettings`) win over the environment.
    Empty variables count as unset. A malformed value, or an unknown ``MMBERT_RAY_*`` / ``MMBERT_SLURM_*`` name
    (a typo), raises ``ValueError`` naming the variable."""
    environ = os.environ if environ is None else environ
    names = {f.name for f in fields(DataExecutorSettings)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"settings_from_env: unknown setting(s) {unknown}; known: {sorted(names)}")
    typos = sorted(k for k in environ if k.startswith(("MMBERT_RAY_", "MMBERT_SLURM_")) and k not in ENV_VARS)
    if typos:
        raise ValueError(f"unknown environment variable(s) {typos}; known: "
                         f"{sorted(k for k in ENV_VARS if k.startswith(('MMBERT_RAY_', 'MMBERT_SLURM_')))}")
    values: dict[str, Any] = {}
    for var, (name, parse) in ENV_VARS.items():
        raw = environ.get(var)
        if raw is None or not raw.strip():
            continue
        try:
            values[name] = parse(raw)
        except ValueError as e:
            raise ValueError(f"{var}={raw!r}: {e}") from None
    values.update(overrides)
    try:
        return DataExecutorSettings(**values)
    except ValueError as e:
        # name the variable behind a bad field when it came from the environment
        for var, (name, _) in ENV_VARS.items():
            if f"DataExecutorSettings.{name}:" in str(e) and name in values and name not in overrides:
                raise ValueError(f"{var}: {e}") from None
        raise


# --------------------------------------------------------------------------------------------------------------
# Ray

_ray_started_here = False


def _package_dir() -> str:
    import mmbert_dagster

    return str(Path(mmbert_dagster.__file__).resolve().parent)


def ensure_ray(settings: DataExecutorSettings, log: Callable[[str], None] | None = None) -> bool:
    """Connect to (``ray_address`` set) or start (empty) Ray unless this process already is connected; returns
    whether this call started/connected it. Refuses a cluster on which no node fits one task."""
    global _ray_started_here
    import ray

    started = False
    if not ray.is_initialized():
        ship = settings.ray_ship_code if settings.ray_ship_code is not None else bool(settings.ray_address)
        runtime_env = {"py_modules": [_package_dir()], "excludes": ["__pycache__", "*.pyc"]} if ship else None
        kwargs: dict[str, Any] = {"include_dashboard": False, "runtime_env": runtime_env}
        if settings.ray_address:
            kwargs["address"] = settings.ray_address
        else:
            kwargs.update(address="local", num_cpus=settings.ray_num_cpus or os.cpu_count() or 1)
        t0 = time.perf_counter()
        ray.init(**kwargs)
        started = _ray_started_here = True
        if log:
            where = settings.ray_address or f"a Ray instance on this machine ({kwargs['num_cpus']} CPUs)"
            log(f"ray: connected to {where} in {time.perf_counter() - t0:.1f} s"
                + (" (mmbert_dagster shipped as py_modules)" if ship else ""))
    _check_ray_fits(settings)
    return started


def _check_ray_fits(settings: DataExecutorSettings) -> None:
    import ray

    need_mem = settings.mem_per_cpu_gb * settings.cpus_per_task * 1024 ** 3
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= settings.cpus_per_task and r.get("memory", 0) >= need_mem for r in nodes):
        largest = max(nodes, key=lambda r: r.get("CPU", 0), default={})
        raise DataExecutorError(
            f"no Ray node fits one task (cpus_per_task = {settings.cpus_per_task}, "
            f"mem_per_cpu_gb = {settings.mem_per_cpu_gb}: {need_mem / 1024 ** 3:.1f} GiB); largest node has "
            f"{largest.get('CPU', 0):g} CPUs, {largest.get('memory', 0) / 1024 ** 3:.1f} GiB: the tasks would wait "
            "forever")


def shutdown_ray() -> bool:
    """Shut down the Ray connection/instance that :func:`ensure_ray` started (no-op otherwise); returns whether
    it did."""
    global _ray_started_here
    if not _ray_started_here:
        return False
    import ray

    ray.shutdown()
    _ray_started_here = False
    return True


# --------------------------------------------------------------------------------------------------------------
# Executors

class _JobIds:
    """datatrove ``job_id_retriever`` that also records every id sbatch returned (the array jobs, then the
    ``merge_stats`` job), so that all arrays can be waited for."""

    def __init__(self):
        self.ids: list[str] = []

    def __call__(self, sbatch_output: str) -> str:
        # "Submitted batch job 123" or, with --parsable, "123" / "123;cluster"
        job_id = sbatch_output.split()[-1].split(";")[0]
        self.ids.append(job_id)
        return job_id


def _workers(settings: DataExecutorSettings, tasks: int) -> int:
    if settings.kind == "local":
        return max(1, min(settings.workers or os.cpu_count() or 1, tasks))
    if settings.kind == "ray":
        return min(settings.workers, tasks) if settings.workers else tasks
    return settings.workers or -1  # slurm: array throttle %N, -1 = none


def _env_command(settings: DataExecutorSettings) -> str | None:
    if settings.env_command:
        return settings.env_command
    if sys.prefix != sys.base_prefix and Path(sys.prefix, "bin", "activate").is_file():
        return f"source {Path(sys.prefix, 'bin', 'activate')}"
    return None


def make_executor(pipeline: list, settings: DataExecutorSettings, *, tasks: int, logging_dir: str | os.PathLike,
                  name: str, depends=None):
    """A datatrove executor of ``settings.kind`` for ``pipeline`` (``skip_completed=True``: a rerun with the same
    ``logging_dir`` runs only unfinished tasks). For Ray this also connects/starts Ray (:func:`ensure_ray`).
    ``depends``: an executor of the same kind that must finish first (datatrove's ``depends``)."""
    if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 1:
        raise ValueError(f"tasks must be an integer >= 1, got {tasks!r}")
    if not name or re.search(r"\s", name):
        raise ValueError(f"name must be a non-empty word (it names the Slurm job), got {name!r}")
    logging_dir = str(logging_dir)
    common = {"tasks": tasks, "workers": _workers(settings, tasks), "logging_dir": logging_dir, "depends": depends,
              "skip_completed": True}
    if settings.kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline, **common)
    if settings.kind == "ray":
        from datatrove.executor import RayPipelineExecutor

        ensure_ray(settings)
        return RayPipelineExecutor(pipeline, **common, cpus_per_task=settings.cpus_per_task,
                                   mem_per_cpu_gb=settings.mem_per_cpu_gb)
    from datatrove.executor import SlurmPipelineExecutor

    sbatch_args = dict(settings.sbatch_args)
    mem = settings.mem_per_cpu_gb
    if float(mem).is_integer():
        mem = int(mem)
    else:  # sbatch wants an integer with a unit
        sbatch_args.setdefault("mem-per-cpu", f"{round(mem * 1024)}M")
        mem = max(1, int(mem))
    return SlurmPipelineExecutor(
        pipeline, **common, time=settings.time, partition=settings.partition, cpus_per_task=settings.cpus_per_task,
        mem_per_cpu_gb=mem, job_name=f"{settings.job_name_prefix}{name}", qos=settings.qos or None,
        env_command=_env_command(settings), sbatch_args=sbatch_args, max_array_size=settings.max_array_size,
        job_id_retriever=_JobIds(), slurm_logs_folder=str(Path(logging_dir, "slurm_logs")),
    )


# --------------------------------------------------------------------------------------------------------------
# Work folders that survive a kill

def resumable_run_dir(work_dir: str | os.PathLike, kind: str, inputs: list[Path], **settings) -> Path:
    """The work folder of a cluster run, named after its input files (paths, sizes, mtimes), ``kind`` and
    ``settings`` (JSON-able): re-materializing after a kill finds the completion markers of the finished tasks."""
    key = json.dumps({"inputs": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in map(Path, inputs)],
                      "kind": kind, **settings}, sort_keys=True)
    return Path(work_dir) / f"run-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def retire_run_dir(run: Path) -> Path:
    """Rename a finished :func:`resumable_run_dir` (its logs stay) so that a later run on the same inputs starts
    afresh instead of finding every task complete; returns the new path."""
    done = run.with_name(f"done-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}-{run.name}")
    run.rename(done)
    return done


# --------------------------------------------------------------------------------------------------------------
# Running and waiting

def _completed(executor, tasks: int) -> set[int]:
    done = set()
    for f in executor.logging_dir.list_files("completions"):
        stem = f.rsplit("/", 1)[-1]
        if stem.isdigit() and int(stem) < tasks:
            done.add(int(stem))
    return done


def _last_error(text: str, loose: bool = False) -> str:
    """The exception line of a log's last traceback; ``loose``: else its last line mentioning an error (Slurm's
    ``slurmstepd: error: ... oom_kill``); "" when there is none."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = re.search(r"\b((?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit|Killed))\b(:.*)?$", ln)
        if m and not ln.startswith(("File ", "raise ", "+ ")):
            return m.group(0)[:300]
    if loose:
        for ln in reversed(lines):
            if re.search(r"error|killed|cancelled|time limit", ln, re.I):
                return ln[:300]
    return ""


def _task_logs(executor, rank: int, extra: list[str] = ()) -> tuple[list[str], str]:
    """Existing log files of a task (datatrove's task log first) and the error they end with."""
    paths, error = [], ""
    for rel in [f"logs/task_{rank:05d}.log"]:
        if executor.logging_dir.isfile(rel):
            paths.append(executor.logging_dir.resolve_paths(rel))
            with executor.logging_dir.open(rel, "r") as f:
                error = _last_error(f.read())
    for p in extra:
        if os.path.isfile(p):
            paths.append(p)
            if not error:
                error = _last_error(Path(p).read_text(errors="replace"), loose=True)
    return paths, error


def _failure(name: str, kind: str, executor, tasks: int, failed: list[int], details: dict[int, str],
             extra_logs: dict[int, list[str]], cause: str = "") -> DataExecutorError:
    logs, parts = {}, []
    for rank in failed:
        paths, error = _task_logs(executor, rank, extra_logs.get(rank, []))
        logs[rank] = paths or [executor.logging_dir.resolve_paths(f"logs/task_{rank:05d}.log")]
        what = details.get(rank, "")
        if not paths:
            tail = " (no log: the task did not start)"
        else:
            tail = f" (log: {', '.join(paths)})"
            error = error or "no error logged (stopped, or still running when the run ended)"
        parts.append(f"rank {rank}" + (f" [{what}]" if what else "") + (f": {error}" if error else "") + tail)
    message = (f"{name}: {len(failed)} of {tasks} {kind} task(s) failed: " + "; ".join(parts)
               + (f". {cause}" if cause else "")
               + f". Rerunning with the same logging_dir ({executor.logging_dir.resolve_paths('')}) runs only these.")
    return DataExecutorError(message, name=name, failed=failed, logs=logs)


def _progress(name: str, tasks: int, t0: float, done: set[int], seen: set[int], log) -> None:
    for rank in sorted(done - seen):
        seen.add(rank)
        log(f"{name}: task {rank} done, {len(seen)}/{tasks} complete ({time.perf_counter() - t0:.1f} s)")


def run_pipeline(pipeline: list, settings: DataExecutorSettings, *, tasks: int, logging_dir: str | os.PathLike,
                 name: str, log: Callable[[str], None] = print) -> dict:
    """Run ``pipeline`` as ``tasks`` datatrove tasks where ``settings`` say and wait until all have ended.

    Returns ``{kind, name, tasks, completed, skipped, failed, seconds, logging_dir}`` (``skipped``: tasks already
    complete from an earlier run in ``logging_dir``; ``failed`` is always empty, failures raise) plus, for Slurm,
    ``job_ids`` (the array jobs) and ``merge_job_id`` (datatrove's stats merge, which runs after them). Logs one
    line per finished task through ``log``. Raises :class:`DataExecutorError` naming every task without a
    completion marker at the end (rank, Slurm state, last error, log paths).

    ``local`` runs in this process (datatrove's forkserver pool for ``workers > 1``: call it from a guarded
    ``__main__`` or a child process, as ``filtering.py`` does)."""
    t0 = time.perf_counter()
    if settings.kind == "ray":
        ensure_ray(settings, log)
    executor = make_executor(pipeline, settings, tasks=tasks, logging_dir=logging_dir, name=name)
    before = _completed(executor, tasks)
    summary = {"kind": settings.kind, "name": name, "tasks": tasks, "skipped": len(before),
               "logging_dir": executor.logging_dir.resolve_paths("")}
    if len(before) == tasks:
        log(f"{name}: all {tasks} task(s) already complete in {summary['logging_dir']}; nothing to run")
        slurm = {"job_ids": [], "merge_job_id": ""} if settings.kind == "slurm" else {}
        return {**summary, "completed": tasks, "failed": [], "seconds": 0.0, **slurm}
    todo = tasks - len(before)
    log(f"{name}: {todo} of {tasks} task(s) to run on {settings.kind}"
        + (f" ({len(before)} already complete)" if before else "") + f"; logs in {summary['logging_dir']}")
    details: dict[int, str] = {}
    extra_logs: dict[int, list[str]] = {}
    cause = ""
    seen = set(before)
    if settings.kind == "slurm":
        summary["job_ids"], summary["merge_job_id"], details, extra_logs = _run_slurm(
            executor, settings, tasks, name, log, t0, seen)
    else:
        error: list[BaseException] = []

        def target():
            try:
                executor.run()
            except BaseException as e:  # noqa: BLE001 - reported below
                error.append(e)

        thread = threading.Thread(target=target, name=f"datatrove-{name}", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(_LOCAL_POLL)
            _progress(name, tasks, t0, _completed(executor, tasks), seen, log)
        if error:
            cause = f"The executor raised {type(error[0]).__name__}: {error[0]}"
    done = _completed(executor, tasks)
    _progress(name, tasks, t0, done, seen, log)
    failed = sorted(set(range(tasks)) - done)
    seconds = round(time.perf_counter() - t0, 3)
    if failed:
        raise _failure(name, settings.kind, executor, tasks, failed, details, extra_logs, cause)
    log(f"{name}: all {tasks} task(s) complete in {seconds:.1f} s ({settings.kind})")
    return {**summary, "completed": len(done), "failed": [], "seconds": seconds}


# --------------------------------------------------------------------------------------------------------------
# Slurm

def _expand_index(spec: str) -> list[int]:
    """Array indices of a sacct/squeue JobID suffix: '3', '[0-5%2]', '[1,4-6]'."""
    spec = spec.strip("[]").split("%")[0]
    out = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b.split(":")[0]) + 1))
        elif part.isdigit():
            out.append(int(part))
    return out


def _parse_states(text: str, job_ids: set[str]) -> dict[tuple[str, int], str]:
    states = {}
    for line in text.splitlines():
        cells = line.strip().split("|")
        if len(cells) < 2:
            continue
        m = re.match(r"^(\d+)(?:_(\d+|\[[^\]]*\]))?$", cells[0].strip())
        if not m or m.group(1) not in job_ids:
            continue
        state = cells[1].strip().split()[0].rstrip("+") if cells[1].strip() else "UNKNOWN"
        for idx in _expand_index(m.group(2)) if m.group(2) else [0]:
            states[(m.group(1), idx)] = state
    return states


def _slurm_cmd(args: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _sacct(job_ids: list[str]) -> dict[tuple[str, int], str] | None:
    r = _slurm_cmd(["sacct", "-j", ",".join(job_ids), "--format=JobID,State", "-n", "-P", "-X"])
    if r is None or r.returncode != 0:
        return None
    return _parse_states(r.stdout, set(job_ids))


def _squeue(job_ids: list[str]) -> dict[tuple[str, int], str] | None:
    r = _slurm_cmd(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%T"])
    if r is None:
        return None
    if r.returncode != 0:
        # squeue refuses ids it no longer knows (all ended and purged)
        return {} if "invalid job id" in (r.stderr + r.stdout).lower() else None
    return _parse_states(r.stdout, set(job_ids))


def _scancel(job_ids: list[str]) -> None:
    if job_ids:
        _slurm_cmd(["scancel", *job_ids])


def _run_slurm(executor, settings: DataExecutorSettings, tasks: int, name: str, log, t0: float, seen: set[int]):
    import shutil

    if "SLURM_ARRAY_TASK_ID" in os.environ:  # datatrove would take this process for one of the array's tasks
        raise DataExecutorError(f"{name}: kind='slurm' cannot submit from inside a Slurm array task "
                                f"(SLURM_ARRAY_TASK_ID={os.environ['SLURM_ARRAY_TASK_ID']}); run from a login node "
                                "or a non-array job")
    if shutil.which("sbatch") is None:
        raise DataExecutorError(f"{name}: kind='slurm' needs Slurm's sbatch on PATH (not found); run on a login node")
    try:
        executor.run()  # submits the array(s) and the merge_stats job, then returns
    except subprocess.CalledProcessError as e:
        raise DataExecutorError(f"{name}: sbatch failed (exit {e.returncode}); launch script "
                                f"{executor.logging_dir.resolve_paths('launch_script.slurm')}") from e
    ids = list(executor.job_id_retriever.ids)
    if not ids:  # nothing was submitted: everything was complete
        return [], "", {}, {}
    array_ids, merge_id = ids[:-1], ids[-1]
    with executor.logging_dir.open("ranks_to_run.json", "r") as f:
        ranks_to_run = json.load(f)
    size = executor.max_array_size if executor.max_array_size != -1 else len(ranks_to_run)
    # rank -> (array job id, array index): datatrove's RUN_OFFSET layout
    where = {rank: (array_ids[min(pos // size, len(array_ids) - 1)], pos % size)
             for pos, rank in enumerate(ranks_to_run)}
    expected = set(where.values())
    log(f"{name}: submitted Slurm job(s) {', '.join(array_ids)} ({len(ranks_to_run)} task(s), partition "
        f"{settings.partition}, time {settings.time}); launch script "
        f"{executor.logging_dir.resolve_paths('launch_script.slurm')}")

    states: dict[tuple[str, int], str] = {}
    last_counts = None
    empty_queue = 0
    warned = False
    all_done_at = None  # every marker written: the array tasks are exiting; wait for Slurm a little longer
    grace = max(60.0, 3 * settings.poll_seconds)
    try:
        while True:
            done = _completed(executor, tasks)
            _progress(name, tasks, t0, done, seen, log)
            if len(done) == tasks:
                all_done_at = all_done_at or time.perf_counter()
                if time.perf_counter() - all_done_at > grace:
                    log(f"{name}: all tasks complete, Slurm still lists some array tasks after {grace:.0f} s; "
                        "not waiting for them")
                    break
            acct = _sacct(array_ids)
            queue = None if acct is not None else _squeue(array_ids)
            if acct is not None:  # accounting: a state per array task, the final ones included
                states.update(acct)
            elif queue is not None:  # no accounting: the queue holds what has not ended
                for k in expected:
                    states[k] = queue.get(k, "ENDED")
            elif not warned:
                log(f"{name}: neither sacct nor squeue answered; waiting for the completion markers")
                warned = True
            counts: dict[str, int] = {}
            for k in expected:
                counts[states.get(k, "PENDING")] = counts.get(states.get(k, "PENDING"), 0) + 1
            if counts != last_counts:
                log(f"{name}: Slurm " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
                    + f" ({time.perf_counter() - t0:.1f} s)")
                last_counts = counts
            if acct is not None and all(states.get(k, "") in _SLURM_FINAL for k in expected):
                break
            # without accounting: done once the queue no longer holds our arrays (twice in a row)
            empty_queue = empty_queue + 1 if queue is not None and not queue else 0
            if empty_queue >= 2:
                break
            time.sleep(settings.poll_seconds)
    except BaseException:
        log(f"{name}: interrupted; cancelling Slurm job(s) {', '.join(ids)}")
        _scancel(ids)
        raise
    done = _completed(executor, tasks)
    details, extra = {}, {}
    for rank, (jid, idx) in where.items():
        if rank in done:
            continue
        details[rank] = f"Slurm {jid}_{idx} {states.get((jid, idx), 'ENDED')}"
        extra[rank] = [os.path.join(executor.slurm_logs_folder, f"{jid}_{idx}.out")]
    if len(done) < tasks:
        _scancel([merge_id])  # its afterok dependency can no longer be met: it would stay pending forever
    return array_ids, merge_id, details, extra
