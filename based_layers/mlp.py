"""SwiGLU MLP as published (flash-attn GatedMlp): fc1 d -> 2H, first half value, second half gate.

`backend` "triton" ("auto": on CUDA tensors) runs value * silu(gate) and its backward as one kernel each
(kernels/swiglu) over fc1's output; "reference" is the plain chunk + silu + mul. Under tensor parallelism fc1
is column-parallel with a local output (each rank's [value | gate] rows), which the kernel takes as it is.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from based_layers.config import resolve_backend
from kernels.swiglu import swiglu


class GatedMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, backend: str = "reference") -> None:
        super().__init__()
        self.backend = backend
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]: fc2(value * silu(gate))."""
        y = self.fc1(x)
        if resolve_backend(self.backend, y) == "triton":
            return self.fc2(swiglu(y, backend="triton"))
        value, gate = y.chunk(2, dim=-1)
        return self.fc2(value * F.silu(gate))
