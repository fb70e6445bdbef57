"""decode_linear as a PyTorch custom op (torch.compile runs the kernel inside its graph)."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("based::decode_linear", mutates_args=())
def decode_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, block_n: int, block_k: int, num_stages: int,
                     num_warps: int) -> Tensor:
    """y [M, N] = x [M, K] weight[N, K]^T (+ bias) on the Triton kernel."""
    from .triton_impl import decode_linear_triton

    return decode_linear_triton(x, weight, bias, block_n=block_n, block_k=block_k, num_stages=num_stages,
                                num_warps=num_warps)


@decode_linear_op.register_fake
def _(x, weight, bias, block_n, block_k, num_stages, num_warps):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs[:3]
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx = dy @ weight if ctx.needs_input_grad[0] else None
    dw = dy.t() @ x if ctx.needs_input_grad[1] else None
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db, None, None, None, None


decode_linear_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("based::decode_swiglu", mutates_args=())
def decode_swiglu_op(x: Tensor, weight: Tensor, block_n: int, block_k: int, num_stages: int,
                     num_warps: int) -> Tensor:
    """value * silu(gate) [M, H] of x [M, K] weight[2H, K]^T on the Triton kernel (no autograd: decode only)."""
    from .triton_impl import decode_swiglu_triton

    return decode_swiglu_triton(x, weight, block_n=block_n, block_k=block_k, num_stages=num_stages,
                                num_warps=num_warps)


@decode_swiglu_op.register_fake
def _(x, weight, block_n, block_k, num_stages, num_warps):
    return x.new_empty((x.shape[0], weight.shape[0] // 2))
