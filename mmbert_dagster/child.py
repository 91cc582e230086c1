"""One way to run work in a child process: a command (or a Python function in a fresh interpreter) whose output
is streamed to a log while it runs, kept in a file if asked, and quoted when the child fails.

Used wherever work runs in another process: datatrove's process pool (filtering, tokenization), fastText training
(a long-lived process can make it start from garbage, see data/langid.py), and torchrun (train/distributed.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # importable by the child even without an install
TAIL_LINES = 40
MESSAGE = "[mmbert] "  # a child's line meant for the parent's log (the rest is library chatter, kept in the file)


class ChildProcessFailed(RuntimeError):
    """A child process exited with a non-zero code; the message quotes the end of its output."""

    def __init__(self, message: str, returncode: int, tail: str):
        super().__init__(message)
        self.returncode, self.tail = returncode, tail


def python_command(entry: str, *args: str) -> list[str]:
    """``python -c`` calling ``module:function`` with ``args`` (strings) in a fresh interpreter."""
    module, _, function = entry.partition(":")
    code = f"import sys; from {module} import {function}; {function}(*sys.argv[1:])"
    return [sys.executable, "-c", code, *args]


def say(message: str) -> None:
    """In a child: print ``message`` for the parent's log (see :func:`messages_only`)."""
    print(MESSAGE + str(message), flush=True)


def messages_only(line: str) -> str | None:
    """A ``show`` for :func:`run_child`: only the lines the child wrote with :func:`say`."""
    return line[len(MESSAGE):] if line.startswith(MESSAGE) else None


def child_env(extra: dict | None = None) -> dict:
    """The parent's environment, unbuffered, offline for model hubs, with this package importable."""
    pythonpath = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "PYTHONPATH": pythonpath, **(extra or {})}


def run_child(cmd: Sequence[str], *, what: str, log: Callable[[str], None] | None = None,
              show: Callable[[str], str | None] = lambda line: line, log_file: Path | None = None,
              env: dict | None = None, timeout: float | None = None) -> str:
    """Run ``cmd``; every output line (stdout and stderr) goes to ``show``, and what it returns (None: nothing)
    to ``log``; all of it to ``log_file`` if given. Returns the whole output; raises ``ChildProcessFailed``
    naming ``what``, the exit code and the last lines when the child fails. Killed with the parent's exceptions."""
    lines: list[str] = []
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    sink = open(log_file, "w") if log_file else None
    proc = subprocess.Popen(list(cmd), env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            tail.append(line)
            if sink:
                sink.write(line + "\n")
            shown = show(line)
            if log and shown is not None:
                log(shown)
        proc.wait(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if sink:
            sink.close()
    if proc.returncode != 0:
        where = f"; full log {log_file}" if log_file else ""
        quoted = "\n".join(tail)
        raise ChildProcessFailed(f"{what} failed in its child process (exit {proc.returncode}){where}:\n{quoted}",
                                 proc.returncode, quoted)
    return "\n".join(lines)
