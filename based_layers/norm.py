"""RMSNorm with a weight only, as published (flash-attn RMSNorm): y = x / rms(x) * w."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x [..., D] -> [..., D]; computed in fp32, returned in the weight's dtype (autocast casts it at the next matmul)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(self.weight.dtype)
