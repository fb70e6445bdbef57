"""One pre-norm block: x += mixer(norm1(x)); x += mlp(norm2(x)), residual stream in fp32.

The block never looks at which mixer it holds; a block without an MLP (Mamba) has no norm2/mlp.
"""

from __future__ import annotations

import torch
from torch import nn

from based_layers.mlp import GatedMLP
from based_layers.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, d_model: int, mixer: nn.Module, mlp_hidden: int, norm_eps: float,
                 residual_in_fp32: bool = True) -> None:
        super().__init__()
        self.norm1 = RMSNorm(d_model, norm_eps)
        self.mixer = mixer
        self.residual_in_fp32 = residual_in_fp32
        if mlp_hidden > 0:
            self.norm2 = RMSNorm(d_model, norm_eps)
            self.mlp = GatedMLP(d_model, mlp_hidden)
        else:
            self.norm2 = None
            self.mlp = None

    def _add(self, residual: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        if self.residual_in_fp32:
            return residual.float() + update.float()
        return residual + update.to(residual.dtype)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, initial_state: dict | None = None,
                return_state: bool = False):
        """x [B, T, D] (residual stream) -> [B, T, D] (and the mixer's state when `return_state`)."""
        mixed = self.mixer(self.norm1(x), doc_ids=doc_ids, initial_state=initial_state, return_state=return_state)
        mixed, state = mixed if return_state else (mixed, None)
        x = self._add(x, mixed)
        if self.mlp is not None:
            x = self._add(x, self.mlp(self.norm2(x)))
        return (x, state) if return_state else x

    def step(self, x: torch.Tensor, state: dict, reset: torch.Tensor | None = None):
        """One token: x [B, D] -> ([B, D], state)."""
        mixed, state = self.mixer.step(self.norm1(x), state, reset)
        x = self._add(x, mixed)
        if self.mlp is not None:
            x = self._add(x, self.mlp(self.norm2(x)))
        return x, state
