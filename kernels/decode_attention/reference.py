"""Plain-PyTorch decode attention over a static KV cache (the ground truth of the Triton kernel)."""

from __future__ import annotations

import torch


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid: torch.Tensor,
    limit: int,
    scale: float,
) -> torch.Tensor:
    """q [B, H, D]; k_cache, v_cache [B, C, H, Dc] (Dc >= D; only the first D are read); valid [B, C] bool.

    One query per row attends the cache slots s < limit with valid[b, s]: softmax(q.k * scale) v, in fp32
    (fp64 for fp64). Returns o [B, H, D] in q's dtype.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dim = q.shape[-1]
    keys = k_cache[:, :limit, :, :dim].to(acc)
    values = v_cache[:, :limit, :, :dim].to(acc)
    scores = torch.einsum("bhd,bshd->bhs", q.to(acc), keys) * scale
    scores = scores.masked_fill(~valid[:, None, :limit], float("-inf"))
    return torch.einsum("bhs,bshd->bhd", scores.softmax(-1), values).to(q.dtype)
