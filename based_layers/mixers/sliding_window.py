"""Sliding-window softmax attention with RoPE (published Based `SlidingAttention`).

Wqkv: d -> 3d read as [Q | K | V], each head-major; RoPE (half-split) on q and k at their position in
the document; query t sees keys t - window .. t; out_proj back to d. No biases.
"""

from __future__ import annotations

import torch
from torch import nn

from based_layers.config import SlidingWindowConfig, resolve_backend, use_fused_step
from based_layers.packing import positions_in_doc
from based_layers.rotary import Rotary, rotary_dim_for


class SlidingWindowAttention(nn.Module):
    def __init__(self, d_model: int, cfg: SlidingWindowConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.head_dim = d_model // cfg.num_heads
        self.window = cfg.window
        self.rotary_dim = rotary_dim_for(self.head_dim, cfg.rotary_fraction)
        self.rope_base = cfg.rope_base
        self.rope = Rotary(self.rotary_dim, self.rope_base)
        self.backend = cfg.backend
        self.Wqkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor, in_sequence: bool = False):
        """x [B, T, D] -> rotated q, k and v, each [B, T, H, Dh]."""
        batch, seqlen, _ = x.shape
        q, k, v = self.Wqkv(x).view(batch, seqlen, 3, -1, self.head_dim).unbind(2)
        return (*self.rope.pair(q, k, positions, in_sequence), v)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, initial_state: dict | None = None,
                return_state: bool = False):
        """x [B, T, D] -> [B, T, D] (and the rolling K/V window when `return_state`)."""
        if initial_state is not None:
            raise ValueError("sliding_window: continuing a parallel forward from a state is not supported; "
                             "prefill from an empty state, then call step() per token")
        from kernels.sliding_window import sliding_window_attention

        batch, seqlen, _ = x.shape
        positions = positions_in_doc(doc_ids, batch, seqlen, x.device)
        q, k, v = self._qkv(x, positions, in_sequence=True)
        o = sliding_window_attention(q, k, v, window=self.window, doc_ids=doc_ids,
                                     backend=resolve_backend(self.backend, x))
        y = self.out_proj(o.reshape(batch, seqlen, -1))
        if not return_state:
            return y
        return y, self._window_state(k, v, positions, doc_ids)

    def _window_state(self, k, v, positions, doc_ids) -> dict:
        """The last `window` keys/values of each row's last document, in ring order (slot = pos % window)."""
        batch, seqlen, heads, dim = k.shape
        state = self.init_state(batch, k.device, k.dtype, heads=heads)
        lo = max(0, seqlen - self.window)
        pos = positions[:, lo:]
        if doc_ids is None:
            # one document per row, the same positions in every row: the last `window` slots are written with
            # an index tensor (boolean-mask indexing would wait for the GPU to count the entries, a host sync
            # in the middle of the prefill, and cannot be captured in a CUDA graph)
            slots = pos[0] % self.window
            state["k"][:, slots] = k[:, lo:]
            state["v"][:, slots] = v[:, lo:]
            state["pos"][:, slots] = pos
            state["next"] = positions[:, -1] + 1
            return state
        valid = torch.ones_like(pos, dtype=torch.bool) if doc_ids is None else doc_ids[:, lo:] == doc_ids[:, -1:]
        slots = pos % self.window
        rows = torch.arange(batch, device=k.device).unsqueeze(1).expand_as(slots)
        rows, slots, valid = rows[valid], slots[valid], valid
        state["k"][rows, slots] = k[:, lo:][valid]
        state["v"][rows, slots] = v[:, lo:][valid]
        state["pos"][rows, slots] = pos[valid]
        state["next"] = positions[:, -1] + 1
        return state

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype, heads: int | None = None) -> dict:
        heads = heads or self.Wqkv.out_features // (3 * self.head_dim)
        shape = (batch_size, self.window, heads, self.head_dim)
        return {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
            "pos": torch.full((batch_size, self.window), -1, device=device, dtype=torch.long),
            "next": torch.zeros(batch_size, device=device, dtype=torch.long),
        }

    def step(self, x: torch.Tensor, state: dict, reset: torch.Tensor | None = None):
        """One token x [B, D]; the window is a ring of `window` past entries plus the current token.

        On the Triton backend one fused kernel reads the ring and writes the new key/value into it in place
        (state["pos"] and state["next"] too); the returned state then holds the same tensors.
        """
        if use_fused_step(self.backend, self, x, state["k"], state["v"]):
            return self._step_fused(x, state, reset)
        batch = x.shape[0]
        pos_now = state["next"] if reset is None else torch.where(reset, torch.zeros_like(state["next"]), state["next"])
        stored = state["pos"] if reset is None else torch.where(reset.unsqueeze(1), torch.full_like(state["pos"], -1), state["pos"])
        q, k, v = self._qkv(x.unsqueeze(1), pos_now.unsqueeze(1))
        keys = torch.cat([state["k"].to(k.dtype), k], dim=1)  # [B, W+1, H, Dh]
        values = torch.cat([state["v"].to(v.dtype), v], dim=1)
        past_ok = (stored >= 0) & (stored >= (pos_now - self.window).unsqueeze(1))
        mask = torch.cat([past_ok, torch.ones(batch, 1, dtype=torch.bool, device=x.device)], dim=1)
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        scores = torch.einsum("bhd,bshd->bhs", q[:, 0].to(acc), keys.to(acc)) * self.head_dim**-0.5
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        o = torch.einsum("bhs,bshd->bhd", scores.softmax(-1), values.to(acc)).to(v.dtype)
        slot = pos_now % self.window
        rows = torch.arange(batch, device=x.device)
        new_k, new_v, new_pos = state["k"].clone(), state["v"].clone(), stored.clone()
        new_k[rows, slot], new_v[rows, slot], new_pos[rows, slot] = k[:, 0].to(new_k.dtype), v[:, 0].to(new_v.dtype), pos_now
        y = self.out_proj(o.reshape(batch, -1))
        return y, {"k": new_k, "v": new_v, "pos": new_pos, "next": pos_now + 1}

    def _step_fused(self, x: torch.Tensor, state: dict, reset: torch.Tensor | None):
        from kernels.sliding_window import sliding_window_step

        stored, pos_now = state["pos"], state["next"]
        if reset is not None:
            # position 0 makes the kernel ignore the whole ring; `pos` keeps the reference form's bookkeeping
            pos_now.masked_fill_(reset, 0)
            stored.masked_fill_(reset.unsqueeze(1), -1)
        q, k, v = self._qkv(x.unsqueeze(1), pos_now.unsqueeze(1))
        o = sliding_window_step(q[:, 0], k[:, 0], v[:, 0], state["k"], state["v"], pos_now, backend="triton")
        stored.scatter_(1, (pos_now % self.window).unsqueeze(1), pos_now.unsqueeze(1))
        pos_now.add_(1)
        y = self.out_proj(o.reshape(x.shape[0], -1))
        return y, {"k": state["k"], "v": state["v"], "pos": stored, "next": pos_now}
