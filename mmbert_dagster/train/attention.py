"""Attention over packed rows, computed per document: no compute on padding, none across documents.

A packed micro-batch is ONE row of ``T`` tokens holding several documents back to back, delimited by
``cu_seqlens`` (int32, ``[0, len_0, len_0 + len_1, ..., T]``, flash-attn's convention). Registering
:func:`varlen_attention` with transformers' ``AttentionInterface`` under :data:`ATTN_NAME` lets us keep
transformers' own ``ModernBertForMaskedLM`` and only swap how each layer computes attention:

* CUDA: a FlashAttention-2 varlen kernel on the whole row, ``window_size=(w, w)`` on the local (sliding)
  layers — the real path at scale. ``flash_attn.flash_attn_varlen_func`` when flash-attn is installed (the
  ``gpu`` extra), else PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (the same FA2 kernels, shipped
  inside PyTorch >= 2.10; used for the layers its version supports — the local layers need its
  ``window_size`` argument). ``MMBERT_VARLEN_KERNEL=flash_attn|torch|loop`` forces one (benchmarks, tests).
* anywhere else (CPU; a CUDA layer no kernel supports): a loop over the documents, one SDPA call per document
  (documents of equal length batched into one call — uniform lengths cost no more than a padded batch), so the
  work is sum(len_i^2) instead of T^2 and no document ever sees another. Local layers get a band mask
  ``|i - j| <= w`` inside each document; documents no longer than ``w + 1`` need no mask at all, and long
  documents (>= ``BLOCKWISE_MIN_WINDOWS`` windows) are computed blockwise — query blocks of one window, each
  against its keys +-w — so a local layer costs O(len * window) instead of O(len^2).

``w`` is ModernBERT's half window: ``config.local_attention // 2`` (64 for the 128-token window). transformers
passes ``sliding_window = w + 1`` to attention functions (its flash path then uses ``window_size=(w, w)``);
we follow the same convention.

The model receives ``attention_mask={"full_attention": None, "sliding_attention": None}`` (a dict skips
transformers' mask construction) and the cu_seqlens as the standard flash kwargs ``cu_seq_lens_q`` /
``max_length_q``, which ModernBERT forwards to the attention function. Without ``cu_seq_lens_q`` (an ordinary
padded batch, e.g. a ``fill-mask`` pipeline on a model loaded with this implementation) the call falls back to
transformers' SDPA path with its usual masks, so the name is safe to use everywhere.

Kernels are looked up lazily (on the first CUDA call); the absence of any is not an error.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "mmbert_varlen"
BLOCKWISE_MIN_WINDOWS = 4  # documents at least this many local windows long are computed blockwise

KERNEL_ENV = "MMBERT_VARLEN_KERNEL"
KERNELS = ("flash_attn", "torch", "loop")


@dataclass(frozen=True)
class VarlenKernel:
    """A FlashAttention-2 varlen kernel: ``fn(q, k, v, cu, max_len, scale, window)`` on (T, H, D) bf16/fp16."""

    name: str
    fn: Callable[..., torch.Tensor]
    sliding: bool  # supports window_size (the local layers)
    dropout: bool  # supports attention dropout


def _flash_attn_kernel() -> VarlenKernel | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None

    def fn(q, k, v, cu, max_len, scale, window, dropout=0.0):
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scale,
                                      causal=False, window_size=window)
    return VarlenKernel("flash_attn", fn, sliding=True, dropout=True)


def _torch_kernel() -> VarlenKernel | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # PyTorch < 2.10
        return None
    sliding = "window_size" in inspect.signature(varlen_attn).parameters

    def fn(q, k, v, cu, max_len, scale, window, dropout=0.0):
        extra = {"window_size": window} if window != (-1, -1) else {}
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **extra)
    return VarlenKernel("torch", fn, sliding=sliding, dropout=False)


@functools.cache
def varlen_kernel() -> VarlenKernel | None:
    """The CUDA varlen kernel to use: $MMBERT_VARLEN_KERNEL if set, else flash-attn, else PyTorch's; None = loop."""
    if not torch.cuda.is_available():
        return None
    forced = os.environ.get(KERNEL_ENV, "").strip()
    if forced and forced not in KERNELS:
        raise ValueError(f"${KERNEL_ENV}={forced!r}: expected one of {', '.join(KERNELS)}")
    if forced == "loop":
        return None
    found = {"flash_attn": _flash_attn_kernel, "torch": _torch_kernel}
    for name in ([forced] if forced else ["flash_attn", "torch"]):
        kernel = found[name]()
        if kernel is not None:
            return kernel
    if forced:
        raise RuntimeError(f"${KERNEL_ENV}={forced}: that kernel is not available here "
                           f"(flash_attn: pip install '.[gpu]'; torch: PyTorch >= 2.10)")
    return None


@functools.lru_cache(maxsize=256)
def band_mask(n_q: int, n_k: int, q_offset: int, half_window: int, device: str) -> torch.Tensor:
    """(n_q, n_k) bool, True = attend: query i (at key position i + q_offset) sees key j iff |i + q_offset - j| <= w."""
    q = torch.arange(n_q, device=device)[:, None] + q_offset
    k = torch.arange(n_k, device=device)[None, :]
    return (q - k).abs() <= half_window


def _document_attention(q, k, v, half_window: int | None, scaling: float, dropout: float) -> torch.Tensor:
    """Attention inside one document. q, k, v: (B, H, L, D) -> (B, H, L, D)."""
    length = q.shape[2]
    device = str(q.device)
    if half_window is None or length <= half_window + 1:  # global layer, or every pair is inside the window
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
    window = 2 * half_window
    if length < BLOCKWISE_MIN_WINDOWS * window:
        mask = band_mask(length, length, 0, half_window, device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    # blockwise: query block [qs, qe) needs keys [qs - w, qe + w) only
    outs = []
    for qs in range(0, length, window):
        qe = min(qs + window, length)
        ks, ke = max(0, qs - half_window), min(length, qe + half_window)
        mask = band_mask(qe - qs, ke - ks, qs - ks, half_window, device)
        outs.append(F.scaled_dot_product_attention(
            q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke], attn_mask=mask, dropout_p=dropout, scale=scaling))
    return torch.cat(outs, dim=2)


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, H, T, D), RoPE applied
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,  # w + 1 on local layers (transformers' convention), None on global ones
    cu_seq_lens_q: torch.Tensor | None = None,  # (n_docs + 1,) int32 document boundaries in the packed row
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Per-document attention for a packed row; returns (1, T, H, D) like transformers' attention functions."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"{ATTN_NAME}: a packed batch is one row, got batch size {query.shape[0]}")
    if attention_mask is not None:
        raise ValueError(f"{ATTN_NAME}: packed rows take cu_seqlens, not an attention mask")
    half_window = None if sliding_window is None else sliding_window - 1
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    kernel = varlen_kernel() if query.is_cuda else None
    if kernel is not None and (kernel.sliding or half_window is None) and (kernel.dropout or not dropout):
        dtype = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        q, k, v = (x[0].transpose(0, 1).to(dtype) for x in (query, key, value))  # (T, H, D)
        cu = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
        max_len = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
        window = (half_window, half_window) if half_window is not None else (-1, -1)
        out = kernel.fn(q, k, v, cu, max_len, scaling, window, **({"dropout": dropout} if dropout else {}))
        return out.to(query.dtype).unsqueeze(0), None
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    # split (not slicing): its backward is one cat, where slices would each build a full-size zero gradient
    qs, ks, vs = query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)
    outs: list[torch.Tensor | None] = [None] * len(lengths)
    for idx in _same_length_groups(lengths).values():
        if len(idx) == 1:
            i = idx[0]
            outs[i] = _document_attention(qs[i], ks[i], vs[i], half_window, scaling, dropout)
            continue
        # documents of equal length go through SDPA as one batch: one kernel call instead of one per document
        q, k, v = (torch.cat([x[i] for i in idx], dim=0) for x in (qs, ks, vs))
        for i, o in zip(idx, _document_attention(q, k, v, half_window, scaling, dropout).split(1, dim=0)):
            outs[i] = o
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _same_length_groups(lengths: list[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return groups


AttentionInterface.register(ATTN_NAME, varlen_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)  # the padded fallback builds SDPA's masks
