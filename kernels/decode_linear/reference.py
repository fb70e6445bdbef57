"""Plain-PyTorch reference of decode_linear: y = x W^T + b."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K], weight [N, K], bias [N] or None -> [..., N] (torch's linear, cuBLAS on a GPU)."""
    return F.linear(x, weight, bias)


def decode_swiglu_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SwiGLU's fc1 and gate: y = x W^T [..., 2H] (rounded to x's dtype), value * silu(gate) in fp32 (float64 for
    float64 inputs), rounded to x's dtype."""
    value, gate = F.linear(x, weight).chunk(2, dim=-1)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (value.to(acc) * F.silu(gate.to(acc))).to(x.dtype)
