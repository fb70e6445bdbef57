"""Rotary position embedding, half-split ("rotate half", GPT-NeoX) as flash-attn's non-interleaved RoPE.

`rotary_dim` follows flash-attn: frequencies base^(-2i/rotary_dim) for i < ceil(rotary_dim/2), applied to
the first 2*ceil(rotary_dim/2) channels (so 35 rotates 36 channels, as the published attn-1b does).
"""

from __future__ import annotations

import torch


def rotary_dim_for(head_dim: int, fraction: float) -> int:
    return int(fraction * head_dim)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float) -> torch.Tensor:
    """x [B, T, H, D], positions [B, T] (long) -> x with its first channels rotated."""
    if rotary_dim <= 0:
        return x
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=x.device, dtype=torch.float32) / rotary_dim))
    n_rot = 2 * inv_freq.numel()
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [B, T, R/2]
    cos = angles.cos().unsqueeze(2)
    sin = angles.sin().unsqueeze(2)
    x_rot, x_pass = x[..., :n_rot], x[..., n_rot:]
    x1, x2 = x_rot.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, x_pass], dim=-1)
