"""Artifact root layout and atomic, checksummed artifact folders.

Every asset owns ``$MMBERT_HOME/<preset>/<asset_key>/``. It is built in a temporary sibling folder and renamed
into place only when complete, so a killed process never leaves a half-written artifact where a reader looks,
and the previous version stays intact until the new one is whole. A ``MANIFEST.json`` with the SHA-256 of every
file lets readers detect truncated or corrupted files instead of loading them silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "MANIFEST.json"
DEFAULT_HOME = ".mmbert"


class ArtifactError(RuntimeError):
    """A missing, incomplete or corrupted artifact."""


def mmbert_home() -> Path:
    """The artifact root: ``$MMBERT_HOME`` or ``./.mmbert`` in the working directory."""
    return Path(os.environ.get("MMBERT_HOME", DEFAULT_HOME)).expanduser().resolve()


@dataclass(frozen=True)
class ArtifactLayout:
    """The one place that decides where a recipe's artifacts and work folders live under the artifact root."""

    root: Path
    recipe: str  # the recipe's name: one folder per recipe

    def artifact(self, key: str) -> Path:
        """``<root>/<recipe>/<key>/``: the committed artifact of asset ``key``."""
        return Path(self.root) / self.recipe / key

    def work(self, key: str) -> Path:
        """``<root>/.work/<recipe>/<key>/``: scratch space that outlives a killed run (resume state, executor logs)."""
        return Path(self.root) / ".work" / self.recipe / key

    def cache(self, name: str) -> Path:
        """``<root>/.cache/<name>/``: downloads shared by every recipe (e.g. the Hugging Face hub's cache)."""
        return Path(self.root) / ".cache" / name


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_digest(folder: Path) -> str:
    """A short digest of an artifact's MANIFEST.json: it changes whenever any of the artifact's files changes."""
    return hashlib.sha256((Path(folder) / MANIFEST).read_bytes()).hexdigest()[:16]


def write_manifest(folder: Path, extra: dict | None = None) -> dict:
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"files": files, **(extra or {})}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_artifact(folder: Path, what: str | None = None) -> dict:
    """Check that ``folder`` is a complete artifact whose files match their checksums; return its manifest."""
    folder = Path(folder)
    label = what or folder.name
    if not folder.is_dir():
        raise ArtifactError(
            f"{label}: missing artifact {folder} — materialize the upstream asset first "
            f"(e.g. `dagster asset materialize --select {label}`)"
        )
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{label}: {folder} has no {MANIFEST}; it is incomplete — re-materialize it")
    manifest = json.loads(manifest_path.read_text())
    for rel, info in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise ArtifactError(f"{label}: file {path} listed in {MANIFEST} is missing")
        if path.stat().st_size != info["bytes"]:
            raise ArtifactError(
                f"{label}: file {path} is {path.stat().st_size} bytes, expected {info['bytes']} (truncated?)"
            )
        if sha256_file(path) != info["sha256"]:
            raise ArtifactError(f"{label}: file {path} fails its SHA-256 check (corrupted)")
    return manifest


@contextlib.contextmanager
def atomic_dir(final: Path, extra_manifest: dict | None = None) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``final``; on success write its manifest and swap it into place.

    On any exception the temporary folder is removed and ``final`` (if it existed) is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp, extra_manifest)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_TEMP = re.compile(r"^\.+(?P<key>[^.]+)\.(?:tmp|old)-(?:(?P<pid>\d+)-)?")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(parent: Path, key: str) -> list[Path]:
    """Remove temporary folders of artifact ``key`` left behind by killed processes.

    Only folders of this key whose writing process is gone are touched (other assets may be writing their own
    temporaries in the same folder right now). If a process died between the two renames of ``atomic_dir``,
    the ``.old-`` folder is the only complete version and is restored instead of deleted.
    """
    removed: list[Path] = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for p in sorted(parent.iterdir()):
        m = _TEMP.match(p.name)
        if not m or m["key"] != key:
            continue
        if m["pid"] and _alive(int(m["pid"])) and int(m["pid"]) != os.getpid():
            continue
        if ".old-" in p.name and not (parent / key).exists():
            os.rename(p, parent / key)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed
