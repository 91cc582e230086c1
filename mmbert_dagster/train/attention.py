"""Attention over packed rows, computed per document: no compute on padding, none across documents.

A packed micro-batch is ONE row of ``T`` tokens holding several documents back to back, delimited by
``cu_seqlens`` (int32, ``[0, len_0, len_0 + len_1, ..., T]``, flash-attn's convention). Registering
:func:`varlen_attention` with transformers' ``AttentionInterface`` under :data:`ATTN_NAME` lets us keep
transformers' own ``ModernBertForMaskedLM`` and only swap how each layer computes attention:

* CUDA with ``flash_attn`` installed: ``flash_attn_varlen_func`` on the whole row, ``window_size=(w, w)`` for
  the local (sliding) layers — the real path at scale.
* anywhere else (CPU; CUDA without flash-attn): a loop over the documents, one SDPA call per document, so the
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

flash-attn is imported lazily (on the first CUDA call) and its absence is not an error.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "mmbert_varlen"
BLOCKWISE_MIN_WINDOWS = 4  # documents at least this many local windows long are computed blockwise

_FLASH = None  # None: not tried yet; False: unavailable; else flash_attn_varlen_func


def flash_varlen_func():
    """``flash_attn.flash_attn_varlen_func`` if flash-attn is installed and CUDA is available, else ``None``."""
    global _FLASH
    if _FLASH is None:
        _FLASH = False
        if torch.cuda.is_available():
            try:
                from flash_attn import flash_attn_varlen_func

                _FLASH = flash_attn_varlen_func
            except ImportError:
                pass
    return _FLASH or None


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
    flash = flash_varlen_func() if query.is_cuda else None
    if flash is not None:
        dtype = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        q, k, v = (x[0].transpose(0, 1).to(dtype) for x in (query, key, value))  # (T, H, D)
        cu = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
        max_len = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
        out = flash(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scaling, causal=False,
                    window_size=(half_window, half_window) if half_window is not None else (-1, -1),
                    deterministic=bool(kwargs.get("deterministic") or False))
        return out.to(query.dtype).unsqueeze(0), None
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    # split (not slicing): its backward is one cat, where slices would each build a full-size zero gradient
    outs = [
        _document_attention(q, k, v, half_window, scaling, dropout)
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, varlen_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)  # the padded fallback builds SDPA's masks
