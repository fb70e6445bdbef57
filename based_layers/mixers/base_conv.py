"""BaseConv: the gated short convolution of the published Based model.

in_proj: d -> expand*d (with bias); u1 = first half, u2 = second half; y = out_proj(silu(conv(u1)) * u2),
conv = causal depthwise Conv1d over u1 with kernel 3 and no bias (tap 2 multiplies the current token).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from based_layers.config import BaseConvConfig, resolve_backend, use_fused_step
from based_layers.packing import conv_history


class ShortConvolution(nn.Module):
    """Holds the depthwise Conv1d so the parameter is named `conv.conv.weight` as published."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=False)

    @property
    def taps(self) -> torch.Tensor:
        """[C, K]: the kernel, tap K-1 on the current token."""
        return self.conv.weight[:, 0, :]


class BaseConv(nn.Module):
    def __init__(self, d_model: int, cfg: BaseConvConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.d_inner = cfg.expand * d_model // 2
        self.kernel_size = cfg.kernel_size
        self.backend = cfg.backend
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=cfg.bias)
        self.conv = ShortConvolution(self.d_inner, cfg.kernel_size)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, initial_state: dict | None = None,
                return_state: bool = False):
        """x [B, T, D] -> [B, T, D] (and the conv tail state when `return_state`)."""
        u1, u2 = self.in_proj(x).chunk(2, dim=-1)
        initial = None if initial_state is None else initial_state["conv"][..., 1:]
        gated = self._gated_conv(u1, u2, doc_ids, initial)
        y = self.out_proj(gated)
        if not return_state:
            return y
        # contiguous: a compact buffer (not a view into the prompt-long history) for the step to update in place
        return y, {"conv": conv_history(u1, self.kernel_size, doc_ids, initial).contiguous()}

    def _gated_conv(self, u1, u2, doc_ids, initial):
        from kernels.short_conv import short_conv_gated

        return short_conv_gated(u1, u2, self.conv.taps, doc_ids=doc_ids, initial_state=initial,
                                backend=resolve_backend(self.backend, u1))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
        return {"conv": torch.zeros(batch_size, self.d_inner, self.kernel_size, device=device, dtype=dtype)}

    def step(self, x: torch.Tensor, state: dict, reset: torch.Tensor | None = None):
        """One token: x [B, D] -> y [B, D]; state["conv"] [B, C, K] holds the last K inputs u1, oldest first.

        On the Triton backend one fused kernel shifts state["conv"] in place and the returned state holds the
        same tensor; otherwise a new one is returned.
        """
        if use_fused_step(self.backend, self, x, state["conv"]):
            return self._step_fused(x, state, reset)
        u1, u2 = self.in_proj(x).chunk(2, dim=-1)
        buf = state["conv"]
        if reset is not None:
            buf = buf * (~reset).view(-1, 1, 1).to(buf.dtype)
        buf = torch.cat([buf[..., 1:], u1.unsqueeze(-1).to(buf.dtype)], dim=-1)
        conv = (buf * self.conv.taps.to(buf.dtype)).sum(-1)
        y = self.out_proj(F.silu(conv).to(u2.dtype) * u2)
        return y, {"conv": buf}

    def _step_fused(self, x: torch.Tensor, state: dict, reset: torch.Tensor | None):
        from kernels.short_conv import short_conv_gated_step

        buf = state["conv"]
        if reset is not None:
            buf.masked_fill_(reset.view(-1, 1, 1), 0.0)
        u1, u2 = self.in_proj(x).chunk(2, dim=-1)
        gated = short_conv_gated_step(u1, u2, self.conv.taps, buf, backend="triton")
        return self.out_proj(gated), {"conv": buf}
