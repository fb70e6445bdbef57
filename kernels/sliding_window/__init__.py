"""Sliding-window causal softmax attention: public functions with a `backend=` choice.

Query t attends keys max(doc_start(t), t - window) .. t: `window` previous tokens plus itself (the
published Based model: window=128). RoPE is applied by the caller.
"""

from __future__ import annotations

import torch

from .._common import check_backend, check_doc_ids, check_same_device, check_tensor
from . import ops
from .reference import (
    sliding_window_attention_dense,
    sliding_window_attention_reference,
    sliding_window_step_reference,
)

__all__ = ["sliding_window_attention", "sliding_window_attention_dense", "sliding_window_attention_reference",
           "sliding_window_step", "sliding_window_step_reference"]

_OP = "sliding_window_attention"
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TRITON_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_MAX_TRITON_HEAD_DIM = 256


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int,
                             doc_ids: torch.Tensor | None = None, scale: float | None = None,
                             backend: str = "triton") -> torch.Tensor:
    """Causal softmax attention over a sliding window.

    q, k, v [B, T, H, D] (one dtype); window >= 0: previous tokens each query sees besides itself;
    doc_ids [B, T] int (non-decreasing) or None; scale defaults to D^-0.5.
    Returns o [B, T, H, D] in q's dtype. Differentiable in q, k, v.
    backend: "triton" (fused kernels) or "reference" (plain PyTorch, banded, any device).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(_OP, name, t, 4, _FLOATS)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{_OP}: q, k, v must all be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{_OP}: q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"{_OP}: window must be an int >= 0 (previous tokens seen), got {window!r}")
    check_doc_ids(_OP, doc_ids, q.shape[0], q.shape[1])
    check_same_device(_OP, q=q, k=k, v=v, doc_ids=doc_ids)
    check_backend(_OP, backend, q)
    if backend == "reference":
        return sliding_window_attention_reference(q, k, v, window=window, doc_ids=doc_ids, scale=scale)
    if q.dtype not in _TRITON_FLOATS:
        raise ValueError(f"{_OP}: backend='triton' takes {_TRITON_FLOATS}; got {q.dtype}")
    if q.shape[-1] > _MAX_TRITON_HEAD_DIM:
        raise ValueError(f"{_OP}: backend='triton' supports head dim <= {_MAX_TRITON_HEAD_DIM}; got {q.shape[-1]}")
    if q.shape[1] == 0:
        raise ValueError(f"{_OP}: empty sequence (T = 0)")
    return ops.sliding_window_attention_triton(q, k, v, window=window, doc_ids=doc_ids, scale=scale)


def sliding_window_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, pos: torch.Tensor, *, scale: float | None = None,
                        backend: str = "triton") -> torch.Tensor:
    """One decode token over a ring buffer of the `window` previous keys and values.

    q, k, v [B, H, D]; k_cache, v_cache [B, W, H, D] with W = window, slot = position % W (the layout
    that a prefill fills from the last W tokens of each row's last document); pos [B] int: the position
    of the current token inside its document (0 starts a new document: the ring is then ignored).
    Attends the cached positions pos-W .. pos-1 that exist plus the token itself, then writes k, v into
    slot pos % W in place. Returns o [B, H, D]. One fused kernel on "triton".
    """
    op = "sliding_window_step"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, 3, _FLOATS)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(op, name, t, 4, _FLOATS)
    check_tensor(op, "pos", pos, 1, (torch.int32, torch.int64))
    batch, heads, dim = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{op}: q, k, v must all be [B, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k_cache.shape != v_cache.shape or (k_cache.shape[0], *k_cache.shape[2:]) != (batch, heads, dim):
        raise ValueError(f"{op}: caches must be [B, W, H, D] with B, H, D = {(batch, heads, dim)}; got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[1] < 1 or tuple(pos.shape) != (batch,):
        raise ValueError(f"{op}: need W >= 1 and pos [B]; got W={k_cache.shape[1]}, pos {tuple(pos.shape)}")
    check_same_device(op, q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, pos=pos)
    check_backend(op, backend, q)
    if backend == "reference":
        return sliding_window_step_reference(q, k, v, k_cache, v_cache, pos, scale=scale)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"{op}: backend='triton' updates the caches in place; their last dim must be contiguous")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return ops.sliding_window_step_call(q, k, v, k_cache, v_cache, pos, scale)
