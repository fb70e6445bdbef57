"""Causal Taylor (Based) linear attention: public functions with a `backend=` choice.

phi(x) = [1, x / F^(1/4), vec(x x^T) / (sqrt(2) sqrt(F))], so phi(q).phi(k) = 1 + q.k/sqrt(F) + (q.k)^2/(2F);
y_t = sum_{s<=t, same doc} (phi(q_t).phi(k_s)) v_s / (sum_{s<=t, same doc} phi(q_t).phi(k_s) + eps).
"""

from __future__ import annotations

import torch

from .._common import check_backend, check_doc_ids, check_same_device, check_tensor
from . import ops
from .reference import (
    taylor_feature_map,
    taylor_linear_attention_quadratic,
    taylor_linear_attention_reference,
    taylor_linear_attention_step_reference,
)

__all__ = ["taylor_feature_map", "taylor_linear_attention", "taylor_linear_attention_quadratic",
           "taylor_linear_attention_reference", "taylor_linear_attention_step",
           "taylor_linear_attention_step_reference"]

_OP = "taylor_linear_attention"
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TRITON_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_MAX_TRITON_FEATURE_DIM = 16


def taylor_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-12,
                            doc_ids: torch.Tensor | None = None,
                            initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
                            output_final_state: bool = False, backend: str = "triton"):
    """Causal normalized Taylor linear attention.

    q, k [B, T, H, F]; v [B, T, H, Dv] (one dtype); doc_ids [B, T] int (non-decreasing; the state resets
    where it changes) or None; initial_state (kv [B, H, 1+F+F*F, Dv], k_sum [B, H, 1+F+F*F]) in fp32,
    read by the first document of each row only.
    Returns o [B, T, H, Dv] in v's dtype, or (o, (kv, k_sum)) with the fp32 state after the last position
    (the last document's) when `output_final_state`. Gradients flow to q, k, v and the initial state.
    backend: "triton" (fused kernels; F <= 16) or "reference" (plain PyTorch, chunked, any device).
    """
    _validate(q, k, v, doc_ids, initial_state, backend)
    if backend == "reference":
        return taylor_linear_attention_reference(q, k, v, eps=eps, doc_ids=doc_ids, initial_state=initial_state,
                                                 output_final_state=output_final_state)
    return ops.taylor_linear_attention_triton(q, k, v, eps=eps, doc_ids=doc_ids, initial_state=initial_state,
                                              output_final_state=output_final_state)


def _validate(q, k, v, doc_ids, initial_state, backend) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(_OP, name, t, 4, _FLOATS)
    if q.shape != k.shape:
        raise ValueError(f"{_OP}: q and k must have the same shape [B, T, H, F]; got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{_OP}: v [B, T, H, Dv] must match q [B, T, H, F] in B, T, H; got {tuple(v.shape)} "
                         f"and {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{_OP}: q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, seqlen, heads, f = q.shape
    check_doc_ids(_OP, doc_ids, batch, seqlen)
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError(f"{_OP}: initial_state must be a (kv, k_sum) tuple")
        nf = 1 + f + f * f
        kv, k_sum = initial_state
        if tuple(kv.shape) != (batch, heads, nf, v.shape[-1]) or tuple(k_sum.shape) != (batch, heads, nf):
            raise ValueError(f"{_OP}: initial_state must be kv {(batch, heads, nf, v.shape[-1])} and k_sum "
                             f"{(batch, heads, nf)}; got {tuple(kv.shape)} and {tuple(k_sum.shape)}")
    check_same_device(_OP, q=q, k=k, v=v, doc_ids=doc_ids,
                      kv=None if initial_state is None else initial_state[0],
                      k_sum=None if initial_state is None else initial_state[1])
    check_backend(_OP, backend, q)
    if backend == "triton":
        if q.dtype not in _TRITON_FLOATS:
            raise ValueError(f"{_OP}: backend='triton' takes {_TRITON_FLOATS}; got {q.dtype} "
                             "(use backend='reference' for float64)")
        if f > _MAX_TRITON_FEATURE_DIM:
            raise ValueError(f"{_OP}: backend='triton' supports feature dim <= {_MAX_TRITON_FEATURE_DIM} "
                             f"(the state holds F*F second-order features); got {f}. Use backend='reference'.")
        if seqlen == 0:
            raise ValueError(f"{_OP}: empty sequence (T = 0)")


def taylor_linear_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor,
                                 k_sum: torch.Tensor, eps: float = 1e-12, backend: str = "triton"):
    """One decode token: first add phi(k) v^T to the state, then read out with phi(q) (the published order).

    q, k [B, H, F]; v [B, H, Dv]; kv [B, H, 1+F+F*F, Dv] and k_sum [B, H, 1+F+F*F] fp32 contiguous,
    updated in place. Returns (o [B, H, Dv] in v's dtype, kv, k_sum). One fused kernel on "triton".
    """
    op = "taylor_linear_attention_step"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, 3, _FLOATS)
    check_tensor(op, "kv", kv, 4, (torch.float32, torch.float64))
    check_tensor(op, "k_sum", k_sum, 3, (torch.float32, torch.float64))
    batch, heads, f = q.shape
    nf = 1 + f + f * f
    if k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"{op}: q, k [B, H, F] and v [B, H, Dv] disagree: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if tuple(kv.shape) != (batch, heads, nf, v.shape[-1]) or tuple(k_sum.shape) != (batch, heads, nf):
        raise ValueError(f"{op}: state must be kv {(batch, heads, nf, v.shape[-1])} and k_sum {(batch, heads, nf)}; "
                         f"got {tuple(kv.shape)} and {tuple(k_sum.shape)}")
    check_same_device(op, q=q, k=k, v=v, kv=kv, k_sum=k_sum)
    check_backend(op, backend, q)
    if backend == "reference":
        return taylor_linear_attention_step_reference(q, k, v, kv, k_sum, eps)
    if kv.dtype != torch.float32 or not (kv.is_contiguous() and k_sum.is_contiguous()):
        raise ValueError(f"{op}: backend='triton' updates an fp32 contiguous state in place")
    if f > _MAX_TRITON_FEATURE_DIM:
        raise ValueError(f"{op}: backend='triton' supports feature dim <= {_MAX_TRITON_FEATURE_DIM}; got {f}")
    o = ops.taylor_linear_attention_step_call(q, k, v, kv, k_sum, float(eps))
    return o, kv, k_sum
