"""Decode attention: one new query per row over a static KV cache (the Transformer++ decode step).

    decode_attention(q, k_cache, v_cache, valid, limit, scale, backend="triton")

q [B, H, D]; k_cache, v_cache [B, C, H, Dc] (Dc >= D, e.g. a head dim padded for other kernels; only the first
D are read); valid [B, C] bool; the query attends slots s < limit with valid[b, s]. Returns o [B, H, D].
"triton" is a split-K kernel (each row's slots spread over several programs, partial softmaxes combined);
"reference" is plain PyTorch.
"""

from __future__ import annotations

import torch

from .._common import check_backend, check_same_device, check_tensor
from .reference import decode_attention_reference

__all__ = ["decode_attention", "decode_attention_reference"]

_OP = "decode_attention"
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid: torch.Tensor,
    limit: int,
    scale: float,
    backend: str = "triton",
) -> torch.Tensor:
    """See the module docstring."""
    check_tensor(_OP, "q", q, 3, _FLOATS)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(_OP, name, t, 4, _FLOATS)
    check_tensor(_OP, "valid", valid, 2, (torch.bool,))
    batch, heads, dim = q.shape
    if (
        k_cache.shape != v_cache.shape
        or (k_cache.shape[0], k_cache.shape[2]) != (batch, heads)
        or k_cache.shape[3] < dim
    ):
        raise ValueError(
            f"{_OP}: caches must be [B, C, H, Dc] with B, H = {(batch, heads)} and Dc >= {dim}; got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if tuple(valid.shape) != (batch, k_cache.shape[1]) or not 1 <= limit <= k_cache.shape[1]:
        raise ValueError(
            f"{_OP}: need valid [B, C] = {(batch, k_cache.shape[1])} and 1 <= limit <= C; got valid "
            f"{tuple(valid.shape)}, limit {limit}"
        )
    check_same_device(_OP, q=q, k_cache=k_cache, v_cache=v_cache, valid=valid)
    check_backend(_OP, backend, q)
    if backend == "reference":
        return decode_attention_reference(q, k_cache, v_cache, valid, limit, scale)
    if q.dtype == torch.float64:
        raise ValueError(
            f"{_OP}: backend='triton' takes fp32/bf16/fp16 (use backend='reference' for float64)"
        )
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache)) or valid.stride(-1) != 1:
        raise ValueError(f"{_OP}: backend='triton' needs contiguous last dims")
    from .triton_impl import decode_attention_triton

    return decode_attention_triton(q, k_cache, v_cache, valid, limit, scale)
