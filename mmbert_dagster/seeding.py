"""Seeds derived from names, the same in every process (Python's own string hashing is salted per process)."""

import hashlib


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from ``parts`` (e.g. ``(seed, stage, "shuffle")``), independent of the process."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")
