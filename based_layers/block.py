"""One pre-norm block: x += mixer(norm1(x)); x += mlp(norm2(x)), residual stream in fp32.

The block never looks at which mixer it holds; a block without an MLP (Mamba) has no norm2/mlp. With the
fused norm (`norm_backend` resolving to "triton") the add before norm2 runs inside norm2's kernel; the block's
input and output stay the residual stream, so checkpointing, compiling and sharding per block are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from based_layers.mlp import GatedMLP
from based_layers.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, d_model: int, mixer: nn.Module, mlp_hidden: int, norm_eps: float,
                 residual_in_fp32: bool = True, norm_backend: str = "reference", mlp_backend: str = "reference") -> None:
        super().__init__()
        self.norm1 = RMSNorm(d_model, norm_eps, norm_backend)
        self.mixer = mixer
        self.residual_in_fp32 = residual_in_fp32
        if mlp_hidden > 0:
            self.norm2 = RMSNorm(d_model, norm_eps, norm_backend)
            self.mlp = GatedMLP(d_model, mlp_hidden, mlp_backend)
        else:
            self.norm2 = None
            self.mlp = None

    def _add(self, residual: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        if self.residual_in_fp32:
            return residual.float() + update.float()
        return residual + update.to(residual.dtype)

    def add_norm(self, norm: RMSNorm, residual: torch.Tensor, update: torch.Tensor):
        """(norm(residual + update), residual + update): one kernel when the norm is fused."""
        if norm.fused(residual):
            dtype = torch.float32 if self.residual_in_fp32 else residual.dtype
            return norm(residual, update, residual_dtype=dtype)
        residual = self._add(residual, update)
        return norm(residual), residual

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, initial_state: dict | None = None,
                return_state: bool = False):
        """x [B, T, D] (residual stream) -> [B, T, D] (and the mixer's state when `return_state`)."""
        mixed = self.mixer(self.norm1(x), doc_ids=doc_ids, initial_state=initial_state, return_state=return_state)
        mixed, state = mixed if return_state else (mixed, None)
        x = self._update(x, mixed)
        return (x, state) if return_state else x

    def _update(self, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """The residual stream after the mixer's output `mixed` and the MLP."""
        if self.mlp is None:
            return self._add(x, mixed)
        h, x = self.add_norm(self.norm2, x, mixed)
        return self._add(x, self.mlp(h))

    def step(self, x: torch.Tensor, state: dict, reset: torch.Tensor | None = None):
        """One token: x [B, D] -> ([B, D], state)."""
        mixed, state = self.mixer.step(self.norm1(x), state, reset)
        return self._update(x, mixed), state
