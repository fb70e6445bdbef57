"""Plain-PyTorch residual add + RMSNorm, the ground truth of the fused kernel.

It computes exactly what the model's unfused path does (`Block._add` then `RMSNorm.forward`):
residual = x.to(residual_dtype) + update.to(residual_dtype); y = residual / rms(residual) * weight, in fp32
(float64 stays float64), returned in `out_dtype`. Layouts: x, update [..., D]; weight [D].
"""

from __future__ import annotations

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """y [..., D] = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and returned in `out_dtype`."""
    cdt = _compute_dtype(x)
    x32 = x.to(cdt)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(cdt)).to(out_dtype)


def add_rms_norm_reference(
    x: torch.Tensor,
    update: torch.Tensor | None,
    weight: torch.Tensor,
    *,
    eps: float,
    out_dtype: torch.dtype | None = None,
    residual_dtype: torch.dtype | None = None,
):
    """`kernels.fused_norm.add_rms_norm` in plain PyTorch (same arguments but `backend`): y when `update` is None,
    else (y, residual) with residual = x + update in `residual_dtype` (the new residual stream)."""
    out_dtype = out_dtype or weight.dtype
    if update is None:
        return rms_norm_reference(x, weight, eps, out_dtype)
    residual_dtype = residual_dtype or x.dtype
    residual = x.to(residual_dtype) + update.to(residual_dtype)
    return rms_norm_reference(residual, weight, eps, out_dtype), residual
