"""Small shared fixtures for the model tests (no polars, datatrove or dagster: tests/test_cuda.py runs on a bare GPU box)."""

from __future__ import annotations

import copy
import socket

import numpy as np

from mmbert_dagster.recipe import ModelShape

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
VOCAB = 300
SHAPE = ModelShape(layers=3, hidden=64, intermediate=96, heads=2, global_every=3, local_window=32)


def random_doc(rng: np.random.Generator, n: int) -> np.ndarray:
    """``[CLS] n-2 ordinary tokens [SEP]``."""
    return np.concatenate([[SPECIALS["cls"]], rng.integers(5, VOCAB, n - 2), [SPECIALS["sep"]]]).astype(np.int64)


def reference_copy(model, attn: str = "sdpa"):
    """The same weights under transformers' own attention (deep-copied config: _from_config mutates it)."""
    ref = type(model)._from_config(copy.deepcopy(model.config), attn_implementation=attn).eval()
    ref.load_state_dict(model.state_dict())
    return ref


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
