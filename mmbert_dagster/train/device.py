"""The compute device of a training (or evaluation) process: which one, its autocast, its default micro-batch.

CPU trains in fp32 (bf16 is 70-140x slower on CPUs without AVX-512/AMX); CUDA with bf16 autocast (weights
and optimizer state stay fp32).
"""

from __future__ import annotations

import contextlib

import torch

# Tokens per micro-batch and rank when the caller does not say (``micro_batch_tokens`` None or 0).
MICRO_BATCH_TOKENS = {
    "cpu": 8192,
    "cuda": 32768,  # 65536 runs out of memory for the base shape (256k vocabulary) on a 141 GB GPU
}


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: CUDA if there is one, else CPU; a bare ``"cuda"`` becomes this process's GPU (``local_rank``)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; nothing on CPU (fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def micro_batch_tokens_for(device: torch.device, requested: int | None = None) -> int:
    """``requested`` tokens per micro-batch and rank, or the device's default (``MICRO_BATCH_TOKENS``)."""
    if requested:
        return int(requested)
    return MICRO_BATCH_TOKENS.get(device.type, MICRO_BATCH_TOKENS["cpu"])
