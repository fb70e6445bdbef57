"""Rotary position embedding, half-split ("rotate half", GPT-NeoX) as flash-attn's non-interleaved RoPE.

`rotary_dim` follows flash-attn: frequencies base^(-2i/rotary_dim) for i < ceil(rotary_dim/2), applied to
the first 2*ceil(rotary_dim/2) channels (so 35 rotates 36 channels, as the published attn-1b does).

`Rotary` keeps fp32 cos/sin tables for the first `TABLE_POSITIONS` positions, so that a parallel forward reads
its angles instead of computing base^x, cos and sin again for every element of q and k (which is what a
compiled forward did: those transcendentals were the three slowest copy kernels of the compiled Based-1.3B
step, docs/PERFORMANCE.md). The tables hold exactly the values `apply_rotary` computes, so both paths give the
same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

TABLE_POSITIONS = 8192


def rotary_dim_for(head_dim: int, fraction: float) -> int:
    return int(fraction * head_dim)


def inverse_frequencies(rotary_dim: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """fp32 [ceil(rotary_dim / 2)]: base^(-2i / rotary_dim)."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))


def rotary_angles(positions: torch.Tensor, rotary_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [...] (long) -> cos, sin [..., ceil(rotary_dim / 2)] in fp32."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inverse_frequencies(rotary_dim, base, positions.device)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos, sin [B, T, R/2] fp32 -> x with its first R channels rotated (in fp32)."""
    n_rot = 2 * cos.shape[-1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x_rot, x_pass = x[..., :n_rot], x[..., n_rot:]
    x1, x2 = x_rot.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, x_pass], dim=-1)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float) -> torch.Tensor:
    """x [B, T, H, D], positions [B, T] (long) -> x with its first channels rotated."""
    if rotary_dim <= 0:
        return x
    return rotate(x, *rotary_angles(positions, rotary_dim, base))


class Rotary(nn.Module):
    """RoPE of one mixer, with cos/sin tables for positions < `table_positions`.

    The tables are non-persistent fp32 buffers (not in any checkpoint) and are computed again after every
    `.to()`, `.double()`, `.bfloat16()` or `to_empty()`, so they keep fp32 and their exact values on any device
    and through meta-device initialisation.
    """

    def __init__(self, rotary_dim: int, base: float, table_positions: int = TABLE_POSITIONS) -> None:
        super().__init__()
        self.rotary_dim, self.base, self.table_positions = rotary_dim, base, table_positions
        self._build(None)  # the default device: meta under `with torch.device("meta")`

    def _build(self, device: torch.device | None) -> None:
        length = self.table_positions if self.rotary_dim > 0 else 0
        cos, sin = rotary_angles(torch.arange(length, device=device), max(self.rotary_dim, 0), self.base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.rebuild_tables()
        return self

    def rebuild_tables(self) -> None:
        """Compute the tables again where they are: for a loader that gives non-persistent buffers fresh memory
        without calling `.to()` (transformers 5 materialises them with `empty_like`, then runs `_init_weights`)."""
        self._build(self.cos.device)

    def angles(self, positions: torch.Tensor, in_sequence: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, R/2] fp32 of positions [B, T] (long).

        `in_sequence`: every position is below T (a parallel forward's positions inside their documents); the
        tables are then read without looking at the values whenever T <= table_positions. Otherwise (a decode
        step's absolute positions) the angles are computed.
        """
        if in_sequence and positions.shape[-1] <= self.table_positions:
            return self.cos[positions], self.sin[positions]
        return rotary_angles(positions, self.rotary_dim, self.base)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, in_sequence: bool = False) -> torch.Tensor:
        """x [B, T, H, D], positions [B, T] (long) -> x with its first `rotary_dim` channels rotated."""
        return self.pair(x, None, positions, in_sequence)[0]

    def pair(self, q: torch.Tensor, k: torch.Tensor | None, positions: torch.Tensor, in_sequence: bool = False):
        """q and k (or None) rotated with one lookup of their angles."""
        if self.rotary_dim <= 0:
            return q, k
        cos, sin = self.angles(positions, in_sequence)
        return rotate(q, cos, sin), None if k is None else rotate(k, cos, sin)

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, base={self.base}, table_positions={self.table_positions}"
