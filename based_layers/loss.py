"""The training loss of the head: mean token cross-entropy of hidden @ lm_head.weight.T, by `model.loss_impl`.

A parameterless module (no state_dict keys) so that parallelism can swap it for a vocab-parallel one
(pretrain/tensor_parallel.py) without the model knowing of process groups.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.linear_cross_entropy import linear_cross_entropy

# model.loss_impl -> backend of kernels.linear_cross_entropy
_BACKEND = {"plain": "reference", "fused_chunked": "chunked", "liger": "liger"}
IGNORE_INDEX = -100


def resolve_loss_impl(choice: str, device: torch.device) -> str:
    """`auto` -> fused_chunked on CUDA, plain elsewhere; other choices as given."""
    if choice != "auto":
        return choice
    return "fused_chunked" if device.type == "cuda" else "plain"


class LinearCrossEntropy(nn.Module):
    """forward(hidden [B, T, D], weight [V, D], labels [B, T]) -> mean cross-entropy (fp32 scalar).

    Labels equal to -100 are ignored (as F.cross_entropy does by default).
    """

    def __init__(self, impl: str = "plain", chunk_size: int = 4096) -> None:
        super().__init__()
        self.impl = impl
        self.chunk_size = chunk_size

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        backend = _BACKEND[resolve_loss_impl(self.impl, hidden.device)]
        return linear_cross_entropy(
            hidden.flatten(0, -2),
            weight,
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            chunk_size=self.chunk_size,
            backend=backend,
        )

    def extra_repr(self) -> str:
        return f"impl={self.impl}, chunk_size={self.chunk_size}"
