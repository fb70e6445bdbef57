"""SwiGLU over the fused fc1 output: h = value * silu(gate) for y = [value | gate], forward and backward in one
pass each.

The backward writes d[value | gate] into one [..., 2H] buffer, the layout fc1's backward reads, so the two
halves' gradients are never concatenated by a copy (the plain chunk + silu + mul form, compiled, reads y and dh
more than once and joins the halves; liger-kernel's SiLU-mul takes the halves as two tensors, so autograd
still joins them). Layout: y [..., 2H] with unit stride on the last dimension.
"""

from __future__ import annotations

import torch

from .._common import check_backend
from .reference import swiglu_reference

__all__ = ["swiglu", "swiglu_reference"]

_OP = "swiglu"
_TRITON_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def swiglu(y: torch.Tensor, *, backend: str = "triton") -> torch.Tensor:
    """y [..., 2H] = [value | gate] -> value * silu(gate) [..., H] in y's dtype (computed in fp32).
    Differentiable in y. backend: "triton" (one kernel each way) or "reference" (plain PyTorch)."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{_OP}: y must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() < 1 or y.shape[-1] % 2:
        raise ValueError(f"{_OP}: expected y [..., 2H] (an even last dimension); got shape {tuple(y.shape)}")
    check_backend(_OP, backend, y)
    if backend == "reference":
        return swiglu_reference(y)
    if y.dtype not in _TRITON_FLOATS:
        raise ValueError(f"{_OP}: backend='triton' takes {_TRITON_FLOATS}; got {y.dtype}")
    from .triton_impl import swiglu_triton

    return swiglu_triton(y)
