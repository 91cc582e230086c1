"""A stand-in for Slurm's client commands on one machine, for tests/test_executors.py.

``python fake_slurm.py <command> [args...]`` with command one of sbatch, squeue, sacct, scancel, scontrol, srun
(the test puts small wrappers with those names first on PATH). State lives in ``$FAKE_SLURM_DIR``:
``jobs/<id>/meta.json`` (the job), ``jobs/<id>/<index>.state`` (one line per array task), ``jobs/<id>/script``.

* ``sbatch [--export=ALL,K=V] [--dependency=afterok:1,afterany:2] script``: reads the ``#SBATCH`` lines (array
  ``0-N%W``, output, dependency), prints ``Submitted batch job <id>`` and returns at once; a detached runner
  process waits for the dependencies, then runs ``bash script`` per array index (at most W at a time, default
  ``$FAKE_SLURM_CONCURRENCY`` or 2) with ``SLURM_ARRAY_TASK_ID`` etc. set and output to the ``--output`` file
  (``%A``/``%a``/``%j`` replaced). An ``afterok`` dependency that failed leaves the job PENDING forever, as Slurm does.
* ``sacct -j ids ...``: ``<id>_<index>|<STATE>`` per array task; exits 1 ("accounting storage is disabled")
  when ``$FAKE_SLURM_NO_SACCT`` is set.
* ``squeue -j ids ...``: the same for tasks that have not ended (PENDING, RUNNING).
* ``scancel ids``: stops the runner, marks unfinished tasks CANCELLED.
* ``scontrol show hostnames LIST``; ``srun [opts] cmd...``: runs cmd.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


def _root() -> Path:
    root = Path(os.environ["FAKE_SLURM_DIR"])
    (root / "jobs").mkdir(parents=True, exist_ok=True)
    return root


def _job(job_id: str) -> Path:
    return _root() / "jobs" / job_id


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _states(job_id: str) -> dict[int, str]:
    meta = json.loads((_job(job_id) / "meta.json").read_text())
    out = {}
    for idx in meta["array"]:
        p = _job(job_id) / f"{idx}.state"
        out[idx] = p.read_text().strip() if p.is_file() else "PENDING"
    return out


def _ids(args: list[str]) -> list[str]:
    for i, a in enumerate(args):
        if a == "-j" and i + 1 < len(args):
            return [x for x in args[i + 1].split(",") if x]
        if a.startswith("--jobs="):
            return [x for x in a.split("=", 1)[1].split(",") if x]
    return sorted(p.name for p in (_root() / "jobs").iterdir())


def sbatch(args: list[str]) -> int:
    export, deps, script = {}, [], None
    for a in args:
        if a.startswith("--export="):
            for item in a.split("=", 1)[1].split(",")[1:]:  # first item is ALL
                k, _, v = item.partition("=")
                export[k] = v
        elif a.startswith("--dependency="):
            deps = [d.split(":") for d in a.split("=", 1)[1].split(",") if d]
        elif not a.startswith("-"):
            script = a
    text = Path(script).read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", text, re.M))
    if not deps and directives.get("dependency"):  # the command line wins over the script, as in sbatch
        deps = [d.split(":") for d in directives["dependency"].split(",") if d]
    m = re.match(r"(\d+)-(\d+)(?:%(\d+))?$", directives.get("array", "0-0"))
    array = list(range(int(m.group(1)), int(m.group(2)) + 1))
    throttle = int(m.group(3)) if m.group(3) else int(os.environ.get("FAKE_SLURM_CONCURRENCY", "2"))
    root = _root()
    with open(root / "lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        counter = root / "next_id"
        job_id = str(int(counter.read_text()) if counter.is_file() else 1000)
        counter.write_text(str(int(job_id) + 1))
    job = _job(job_id)
    job.mkdir(parents=True)
    (job / "script").write_text(text)
    meta = {"id": job_id, "array": array, "throttle": throttle, "deps": deps, "export": export,
            "output": directives.get("output", "slurm-%A_%a.out"), "cwd": os.getcwd(),
            "name": directives.get("job-name", "")}
    _write(job / "meta.json", json.dumps(meta))
    runner = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_run", job_id], start_new_session=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _write(job / "runner.pid", str(runner.pid))
    print(f"Submitted batch job {job_id}")
    return 0


def _run(job_id: str) -> int:
    job = _job(job_id)
    meta = json.loads((job / "meta.json").read_text())
    for kind, dep in meta["deps"]:  # wait for the jobs this one depends on
        while True:
            states = _states(dep)
            if all(s in FINAL for s in states.values()):
                break
            if (job / "cancelled").exists():
                (job / "runner.pid").unlink(missing_ok=True)
                return 0
            time.sleep(0.2)
        if kind == "afterok" and any(s != "COMPLETED" for s in states.values()):
            _write(job / "reason", "DependencyNeverSatisfied")
            (job / "runner.pid").unlink(missing_ok=True)
            return 0  # stays PENDING, as in Slurm (until scancel)
    running: dict[int, subprocess.Popen] = {}
    todo = list(meta["array"])
    while todo or running:
        if (job / "cancelled").exists():
            break
        while todo and len(running) < meta["throttle"]:
            idx = todo.pop(0)
            out = meta["output"].replace("%A", job_id).replace("%a", str(idx)).replace("%j", job_id)
            env = {**os.environ, **meta["export"], "SLURM_JOB_ID": job_id, "SLURM_ARRAY_JOB_ID": job_id,
                   "SLURM_ARRAY_TASK_ID": str(idx), "SLURM_ARRAY_TASK_COUNT": str(len(meta["array"])),
                   "SLURM_NODELIST": "localhost", "SLURM_NODEID": "0", "SLURM_JOB_NAME": meta["name"]}
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w") as f:
                running[idx] = subprocess.Popen(["bash", str(job / "script")], env=env, cwd=meta["cwd"], stdout=f,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            _write(job / f"{idx}.state", "RUNNING")
        for idx, proc in list(running.items()):
            if proc.poll() is not None:
                _write(job / f"{idx}.state", "COMPLETED" if proc.returncode == 0 else "FAILED")
                del running[idx]
        time.sleep(0.1)
    for proc in running.values():  # cancelled
        proc.terminate()
        proc.wait()
    (job / "runner.pid").unlink(missing_ok=True)
    return 0


def sacct(args: list[str]) -> int:
    if os.environ.get("FAKE_SLURM_NO_SACCT"):
        print("sacct: error: Slurm accounting storage is disabled", file=sys.stderr)
        return 1
    for job_id in _ids(args):
        if _job(job_id).is_dir():
            for idx, state in _states(job_id).items():
                print(f"{job_id}_{idx}|{state}")
    return 0


def squeue(args: list[str]) -> int:
    ids = _ids(args)
    if any(not _job(j).is_dir() for j in ids):
        print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
        return 1
    for job_id in ids:
        for idx, state in _states(job_id).items():
            if state not in FINAL:
                print(f"{job_id}_{idx}|{state}")
    return 0


def scancel(args: list[str]) -> int:
    for job_id in [a for a in args if not a.startswith("-")]:
        job = _job(job_id)
        if not job.is_dir():
            continue
        (job / "cancelled").touch()
        pid_file = job / "runner.pid"
        deadline = time.time() + 10
        while pid_file.is_file() and time.time() < deadline:  # the runner stops its tasks and exits
            time.sleep(0.1)
        for idx, state in _states(job_id).items():
            if state not in FINAL:
                _write(job / f"{idx}.state", "CANCELLED")
    return 0


def scontrol(args: list[str]) -> int:
    if args[:2] == ["show", "hostnames"]:
        for host in (args[2] if len(args) > 2 else os.environ.get("SLURM_NODELIST", "")).split(","):
            print(host)
        return 0
    if args[:1] == ["requeue"]:
        return 0
    print(f"fake scontrol: unsupported {args}", file=sys.stderr)
    return 1


def srun(args: list[str]) -> int:
    i = 0
    while i < len(args) and args[i].startswith("-"):  # options; -n/-N/-c take a value
        i += 2 if args[i] in ("-n", "-N", "-c", "--ntasks", "--nodes") else 1
    os.execvp(args[i], args[i:])


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    handlers = {"sbatch": sbatch, "sacct": sacct, "squeue": squeue, "scancel": scancel, "scontrol": scontrol,
                "srun": srun}
    if command == "_run":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.exit(_run(rest[0]))
    sys.exit(handlers[command](rest))
