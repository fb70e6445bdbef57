"""Plain-PyTorch gated short convolution: y = silu(causal_depthwise_conv(u1)) * u2 (the Based BaseConv core).

Layouts: u1, u2 [B, T, C]; weight [C, K] (tap K-1 multiplies the current token, tap 0 the token K-1
back); doc_ids [B, T]; initial_state [B, C, K-1]: the inputs before position 0, oldest first.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def short_conv_gated_reference(u1, u2, weight, *, doc_ids=None, initial_state=None):
    """Taps that would reach into another document read zeros; the initial state feeds the first document."""
    batch, seqlen, channels = u1.shape
    k = weight.shape[1]
    cdt = torch.float64 if u1.dtype == torch.float64 else torch.float32
    x = u1.to(cdt)
    if initial_state is None:
        x_ext = F.pad(x, (0, 0, k - 1, 0))
    else:
        x_ext = torch.cat([initial_state.to(cdt).transpose(1, 2), x], dim=1)
    pos = torch.arange(seqlen, device=u1.device)
    conv = torch.zeros_like(x)
    for shift in range(k):
        tap = x_ext[:, k - 1 - shift: k - 1 - shift + seqlen]
        if doc_ids is not None and shift:
            same = torch.zeros(batch, seqlen, dtype=torch.bool, device=u1.device)
            same[:, shift:] = doc_ids[:, shift:] == doc_ids[:, :-shift]
            # positions t < shift read the initial state while t is still in the first document
            same |= (pos < shift)[None, :] & (doc_ids == doc_ids[:, :1])
            tap = tap * same.unsqueeze(-1).to(cdt)
        conv = conv + tap * weight[:, k - 1 - shift].to(cdt)
    return (F.silu(conv) * u2.to(cdt)).to(u1.dtype)


def short_conv_gated_step_reference(u1, u2, weight, conv_state):
    """One decode token: u1, u2 [B, C]; conv_state [B, C, K] (the last K inputs u1, oldest first) is shifted
    and receives u1 in place. Returns y [B, C] = silu(sum_j weight[:, j] * state[:, :, j]) * u2."""
    conv_state.copy_(torch.cat([conv_state[..., 1:], u1.unsqueeze(-1).to(conv_state.dtype)], dim=-1))
    cdt = torch.float64 if u1.dtype == torch.float64 else torch.float32
    conv = (conv_state.to(cdt) * weight.to(cdt)).sum(-1)
    return (F.silu(conv) * u2.to(cdt)).to(u1.dtype)
