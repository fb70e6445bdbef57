"""RMSNorm with a weight only, as published (flash-attn RMSNorm): y = x / rms(x) * w.

`backend` picks the plain PyTorch form ("reference", the published numerics written out) or the fused Triton
kernel ("triton"; "auto" = Triton on CUDA tensors), which also takes the residual add of a pre-norm block
(`forward(x, update)`), as flash-attn's fused add + RMSNorm does for the published runs.
"""

from __future__ import annotations

import torch
from torch import nn

from based_layers.config import resolve_backend
from kernels.fused_norm import add_rms_norm


class RMSNorm(nn.Module):
    """x [..., D] -> [..., D].

    Plain path: computed in fp32, returned in the weight's dtype (autocast casts it at the next matmul).
    Fused path: the same arithmetic in one kernel, returned directly in the compute dtype (autocast's, else the
    weight's), which is the value the next matmul would have read.
    """

    def __init__(self, dim: int, eps: float = 1e-5, backend: str = "reference") -> None:
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(dim))

    def fused(self, x: torch.Tensor) -> bool:
        """Whether this norm runs the fused kernel for `x` (then `forward` also takes the residual update)."""
        return resolve_backend(self.backend, x) == "triton"

    def forward(self, x: torch.Tensor, update: torch.Tensor | None = None,
                residual_dtype: torch.dtype | None = None):
        """norm(x) [..., D]; with `update` [..., D]: (norm(x + update), x + update in `residual_dtype`)."""
        if update is None and not self.fused(x):
            x32 = x.float()
            y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            return (y * self.weight.float()).to(self.weight.dtype)
        kind = x.device.type
        out_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.weight.dtype
        return add_rms_norm(x, update, self.weight, eps=self.eps, out_dtype=out_dtype,
                            residual_dtype=residual_dtype, backend=resolve_backend(self.backend, x))
