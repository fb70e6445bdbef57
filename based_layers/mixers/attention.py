"""Full causal softmax attention of the Transformer++ baseline (flash-attn GPT MHA as published).

Wqkv: d -> 3d ([Q | K | V], head-major), partial RoPE (half-split, `rotary_fraction` of head_dim),
torch SDPA, out_proj back to d, no biases. Packed documents use a block-diagonal causal mask.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from based_layers.config import AttentionConfig
from based_layers.packing import positions_in_doc
from based_layers.rotary import Rotary, rotary_dim_for


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, cfg: AttentionConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.head_dim = d_model // cfg.num_heads
        self.rotary_dim = rotary_dim_for(self.head_dim, cfg.rotary_fraction)
        self.rope_base = cfg.rope_base
        self.rope = Rotary(self.rotary_dim, self.rope_base)
        self.Wqkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor, in_sequence: bool = False):
        batch, seqlen, _ = x.shape
        q, k, v = self.Wqkv(x).view(batch, seqlen, 3, -1, self.head_dim).unbind(2)
        return (*self.rope.pair(q, k, positions, in_sequence), v)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, initial_state: dict | None = None,
                return_state: bool = False):
        """x [B, T, D] -> [B, T, D] (and the KV cache of the last document when `return_state`)."""
        if initial_state is not None:
            raise ValueError("attention: continuing a parallel forward from a state is not supported; "
                             "prefill from an empty state, then call step() per token")
        batch, seqlen, _ = x.shape
        positions = positions_in_doc(doc_ids, batch, seqlen, x.device)
        q, k, v = self._qkv(x, positions, in_sequence=True)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        if doc_ids is None:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        else:
            causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=x.device).tril()
            mask = causal & (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1))
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask.unsqueeze(1))
        y = self.out_proj(o.transpose(1, 2).reshape(batch, seqlen, -1))
        if not return_state:
            return y
        return y, self._cache_state(k, v, positions, doc_ids)

    def _cache_state(self, k, v, positions, doc_ids) -> dict:
        """KV cache of each row's last document; rows shorter than the longest are masked by `valid`."""
        valid = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
        if doc_ids is not None:
            valid = doc_ids == doc_ids[:, -1:]
        return {"k": k, "v": v, "valid": valid, "next": positions[:, -1] + 1}

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
        heads = self.Wqkv.out_features // (3 * self.head_dim)
        empty = torch.zeros(batch_size, 0, heads, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "valid": torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
                "next": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def step(self, x: torch.Tensor, state: dict, reset: torch.Tensor | None = None):
        """One token x [B, D]; the cache grows by one entry per step."""
        valid, pos_now = state["valid"], state["next"]
        if reset is not None:
            valid = valid & ~reset.unsqueeze(1)
            pos_now = torch.where(reset, torch.zeros_like(pos_now), pos_now)
        q, k, v = self._qkv(x.unsqueeze(1), pos_now.unsqueeze(1))
        keys = torch.cat([state["k"], k.to(state["k"].dtype)], dim=1)
        values = torch.cat([state["v"], v.to(state["v"].dtype)], dim=1)
        valid = torch.cat([valid, torch.ones(valid.shape[0], 1, dtype=torch.bool, device=valid.device)], dim=1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2).to(q.dtype),
                                           values.transpose(1, 2).to(q.dtype), attn_mask=valid[:, None, None, :])
        y = self.out_proj(o.transpose(1, 2).reshape(x.shape[0], -1))
        return y, {"k": keys, "v": values, "valid": valid, "next": pos_now + 1}
