"""Plain-PyTorch SwiGLU of a fused fc1 output, the ground truth of the Triton kernel.

y [..., 2H] = [value | gate] (flash-attn GatedMlp's layout: first half value, second half gate);
h = value * silu(gate), computed in fp32 (float64 stays float64) and returned in y's dtype.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def swiglu_reference(y: torch.Tensor) -> torch.Tensor:
    """[..., 2H] -> [..., H]: value * silu(gate), one rounding to y's dtype."""
    cdt = torch.float64 if y.dtype == torch.float64 else torch.float32
    value, gate = y.to(cdt).chunk(2, dim=-1)
    return (value * F.silu(gate)).to(y.dtype)
