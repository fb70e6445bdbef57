"""Gated short convolution (Based BaseConv core): y = silu(causal depthwise conv(u1)) * u2.

Public functions with a `backend=` choice. Layouts: u1, u2 [B, T, C]; weight [C, K] (tap K-1 multiplies
the current token: an nn.Conv1d(C, C, K, groups=C) weight [C, 1, K] viewed as [:, 0, :]).
"""

from __future__ import annotations

import torch

from .._common import check_backend, check_doc_ids, check_same_device, check_tensor
from . import ops
from .reference import short_conv_gated_reference, short_conv_gated_step_reference

__all__ = ["short_conv_gated", "short_conv_gated_reference", "short_conv_gated_step",
           "short_conv_gated_step_reference"]

_OP = "short_conv_gated"
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TRITON_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def short_conv_gated(u1: torch.Tensor, u2: torch.Tensor, weight: torch.Tensor, *,
                     doc_ids: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                     backend: str = "triton") -> torch.Tensor:
    """y = silu(conv(u1)) * u2 with a causal depthwise conv that resets at document starts.

    u1, u2 [B, T, C] (one dtype; views with a channel stride of 1 are read in place, e.g. the two halves
    of an in_proj output); weight [C, K]; doc_ids [B, T] int or None; initial_state [B, C, K-1]: the
    inputs before position 0, oldest first, read by the first document only (no gradient flows to it).
    Returns y [B, T, C] in u1's dtype; differentiable in u1, u2 and weight.
    """
    for name, t in (("u1", u1), ("u2", u2)):
        check_tensor(_OP, name, t, 3, _FLOATS)
    check_tensor(_OP, "weight", weight, 2, _FLOATS)
    if u1.shape != u2.shape or u1.dtype != u2.dtype:
        raise ValueError(f"{_OP}: u1 and u2 must match in shape and dtype; got {tuple(u1.shape)} {u1.dtype} and "
                         f"{tuple(u2.shape)} {u2.dtype}")
    batch, seqlen, channels = u1.shape
    if weight.shape[0] != channels or weight.shape[1] < 1:
        raise ValueError(f"{_OP}: weight must be [C, K] with C = {channels}; got {tuple(weight.shape)}")
    check_doc_ids(_OP, doc_ids, batch, seqlen)
    if initial_state is not None:
        check_tensor(_OP, "initial_state", initial_state, 3, _FLOATS)
        if tuple(initial_state.shape) != (batch, channels, weight.shape[1] - 1):
            raise ValueError(f"{_OP}: initial_state must be [B, C, K-1] = {(batch, channels, weight.shape[1] - 1)}; "
                             f"got {tuple(initial_state.shape)}")
    check_same_device(_OP, u1=u1, u2=u2, weight=weight, doc_ids=doc_ids, initial_state=initial_state)
    check_backend(_OP, backend, u1)
    if backend == "reference":
        return short_conv_gated_reference(u1, u2, weight, doc_ids=doc_ids, initial_state=initial_state)
    if u1.dtype not in _TRITON_FLOATS or weight.dtype not in _TRITON_FLOATS:
        raise ValueError(f"{_OP}: backend='triton' takes {_TRITON_FLOATS}; got {u1.dtype} and weight {weight.dtype}")
    if seqlen == 0:
        raise ValueError(f"{_OP}: empty sequence (T = 0)")
    return ops.short_conv_gated_triton(u1, u2, weight, doc_ids=doc_ids, initial_state=initial_state)


def short_conv_gated_step(u1: torch.Tensor, u2: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, *,
                          backend: str = "triton") -> torch.Tensor:
    """One decode token: u1, u2 [B, C]; conv_state [B, C, K] holds the last K inputs u1 (oldest first) and is
    shifted in place to end with this u1. Returns y [B, C] = silu(sum_j weight[:, j] state[:, :, j]) * u2."""
    op = "short_conv_gated_step"
    for name, t in (("u1", u1), ("u2", u2)):
        check_tensor(op, name, t, 2, _FLOATS)
    check_tensor(op, "weight", weight, 2, _FLOATS)
    check_tensor(op, "conv_state", conv_state, 3, _FLOATS)
    if u1.shape != u2.shape or tuple(conv_state.shape) != (*u1.shape, weight.shape[1]) or \
            weight.shape[0] != u1.shape[1]:
        raise ValueError(f"{op}: expected u1, u2 [B, C], weight [C, K], conv_state [B, C, K]; got "
                         f"{tuple(u1.shape)}, {tuple(u2.shape)}, {tuple(weight.shape)}, {tuple(conv_state.shape)}")
    check_same_device(op, u1=u1, u2=u2, weight=weight, conv_state=conv_state)
    check_backend(op, backend, u1)
    if backend == "reference":
        return short_conv_gated_step_reference(u1, u2, weight, conv_state)
    return ops.short_conv_gated_step_call(u1, u2, weight, conv_state)
