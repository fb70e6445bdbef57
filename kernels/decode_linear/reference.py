"""Plain-PyTorch reference of decode_linear: y = x W^T + b."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..swiglu.reference import swiglu_reference


def decode_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K], weight [N, K], bias [N] or None -> [..., N] (torch's linear, cuBLAS on a GPU)."""
    return F.linear(x, weight, bias)


def decode_swiglu_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SwiGLU's fc1 and gate: y = x W^T [..., 2H] (rounded to x's dtype), then kernels.swiglu's reference."""
    return swiglu_reference(F.linear(x, weight))
