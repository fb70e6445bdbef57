"""Residual add + RMSNorm with the residual stream in its own dtype (fp32 as published), forward and backward fused.

flash-attn's `layer_norm_fn(..., residual=..., prenorm=True, residual_in_fp32=True)` for RMSNorm: the new
residual stream x + update is written in `residual_dtype`, the normed output in `out_dtype` (the compute dtype
of the next matmul). Layouts: x, update [..., D] (any leading shape, unit stride on D); weight [D].
"""

from __future__ import annotations

import torch

from .._common import check_backend, check_same_device
from .reference import add_rms_norm_reference, rms_norm_reference

__all__ = ["add_rms_norm", "add_rms_norm_reference", "rms_norm_reference"]

_OP = "add_rms_norm"
_TRITON_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_MAX_DIM = 65536


def _check(x: torch.Tensor, update: torch.Tensor | None, weight: torch.Tensor) -> None:
    if not all(isinstance(t, torch.Tensor) for t in (x, weight)) or (
        update is not None and not isinstance(update, torch.Tensor)
    ):
        raise ValueError(f"{_OP}: x, update and weight must be torch.Tensors")
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{_OP}: expected x [..., D] and weight [D]; got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if update is not None and update.shape != x.shape:
        raise ValueError(f"{_OP}: update must have x's shape {tuple(x.shape)}; got {tuple(update.shape)}")
    check_same_device(_OP, x=x, update=update, weight=weight)


def add_rms_norm(
    x: torch.Tensor,
    update: torch.Tensor | None,
    weight: torch.Tensor,
    *,
    eps: float,
    out_dtype: torch.dtype | None = None,
    residual_dtype: torch.dtype | None = None,
    backend: str = "triton",
):
    """RMSNorm of x (update None) or of the new residual stream x + update.

    Returns y [..., D] in `out_dtype` (default: weight's dtype) when `update` is None, else (y, residual) with
    residual = x + update in `residual_dtype` (default: x's dtype); the norm is computed in fp32 from the
    residual as stored. Differentiable in x, update and weight; the gradient reaching `residual` is added to
    the norm's input gradient in the same backward pass.
    """
    _check(x, update, weight)
    out_dtype = out_dtype or weight.dtype
    residual_dtype = residual_dtype or x.dtype
    check_backend(_OP, backend, x)
    if backend == "reference":
        return add_rms_norm_reference(
            x, update, weight, eps=eps, out_dtype=out_dtype, residual_dtype=residual_dtype
        )
    dtypes = {x.dtype, weight.dtype, out_dtype, residual_dtype} | (
        {update.dtype} if update is not None else set()
    )
    if not dtypes <= set(_TRITON_FLOATS):
        raise ValueError(f"{_OP}: backend='triton' takes {_TRITON_FLOATS}; got {sorted(map(str, dtypes))}")
    if x.shape[-1] > _MAX_DIM:
        raise ValueError(
            f"{_OP}: backend='triton' keeps one row in registers: D = {x.shape[-1]} > {_MAX_DIM}"
        )
    from .triton_impl import add_rms_norm_triton

    return add_rms_norm_triton(x, update, weight, eps, out_dtype, residual_dtype)
