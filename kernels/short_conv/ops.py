"""PyTorch custom ops (namespace `based::`) around the Triton gated short-conv kernels.

One opaque operator per kernel call, with a fake implementation (shapes and dtypes) and autograd on the
operator, so that torch.compile keeps the kernels inside its graph (it cannot trace a raw Triton launch):
- based::short_conv_gated_fwd: y [B, T, C].
- based::short_conv_gated_bwd: du1, du2 [B, T, C], dweight [C, K].
- based::short_conv_gated_step: one decode token; shifts conv_state in place (mutates_args).
The bodies import Triton only when they run.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _prepare(u1: Tensor, u2: Tensor, weight: Tensor, doc_ids: Tensor | None):
    # kernels take any strides but the last (the two halves of an in_proj output are read in place)
    u1, u2, weight = (t if t.stride(-1) == 1 else t.contiguous() for t in (u1, u2, weight))
    return u1, u2, weight, None if doc_ids is None else doc_ids.contiguous()


@torch.library.custom_op("based::short_conv_gated_fwd", mutates_args=())
def short_conv_gated_fwd(u1: Tensor, u2: Tensor, weight: Tensor, doc_ids: Tensor | None,
                         initial_state: Tensor | None) -> Tensor:
    """y = silu(causal depthwise conv(u1)) * u2: u1, u2 [B, T, C], weight [C, K], initial_state [B, C, K-1]."""
    from .triton_impl import forward

    return forward(*_prepare(u1, u2, weight, doc_ids), initial_state)


@short_conv_gated_fwd.register_fake
def _(u1, u2, weight, doc_ids, initial_state):
    return torch.empty_like(u1, memory_format=torch.contiguous_format)


@torch.library.custom_op("based::short_conv_gated_bwd", mutates_args=())
def short_conv_gated_bwd(dy: Tensor, u1: Tensor, u2: Tensor, weight: Tensor, doc_ids: Tensor | None,
                         initial_state: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """du1, du2 [B, T, C] and dweight [C, K] (the inputs' dtypes, contiguous)."""
    from .triton_impl import backward

    return backward(dy, *_prepare(u1, u2, weight, doc_ids), initial_state)


@short_conv_gated_bwd.register_fake
def _(dy, u1, u2, weight, doc_ids, initial_state):
    fmt = torch.contiguous_format
    return (torch.empty_like(u1, memory_format=fmt), torch.empty_like(u2, memory_format=fmt),
            torch.empty_like(weight, memory_format=fmt))


def _setup(ctx, inputs, output) -> None:
    u1, u2, weight, doc_ids, initial_state = inputs
    ctx.save_for_backward(u1, u2, weight, doc_ids, initial_state)


def _backward(ctx, dy):
    u1, u2, weight, doc_ids, initial_state = ctx.saved_tensors
    du1, du2, dw = short_conv_gated_bwd(dy, u1, u2, weight, doc_ids, initial_state)
    # no gradient flows to the initial state (documented in short_conv_gated)
    return du1, du2, dw, None, None


short_conv_gated_fwd.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("based::short_conv_gated_step", mutates_args=("conv_state",))
def short_conv_gated_step(u1: Tensor, u2: Tensor, weight: Tensor, conv_state: Tensor) -> Tensor:
    """One decode token: u1, u2 [B, C]; conv_state [B, C, K] shifted in place. Returns y [B, C]."""
    return _step_body(u1, u2, weight, conv_state)


def _step_body(u1, u2, weight, conv_state):
    from .triton_impl import short_conv_gated_step_triton

    u1, u2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (u1, u2))
    return short_conv_gated_step_triton(u1, u2, weight, conv_state)


def short_conv_gated_step_call(u1, u2, weight, conv_state) -> Tensor:
    """The custom op under torch.compile, its body in eager mode (the op's dispatch costs ~7x a plain call;
    see taylor_linear_attn.ops.taylor_linear_attention_step_call)."""
    if torch.compiler.is_compiling():
        return short_conv_gated_step(u1, u2, weight, conv_state)
    return _step_body(u1, u2, weight, conv_state)


@short_conv_gated_step.register_fake
def _(u1, u2, weight, conv_state):
    return torch.empty_like(u1, memory_format=torch.contiguous_format)


def short_conv_gated_triton(u1, u2, weight, *, doc_ids=None, initial_state=None):
    """Triton path of `short_conv_gated` (arguments already validated), through based::short_conv_gated_fwd."""
    init = None if initial_state is None else initial_state.detach()
    return short_conv_gated_fwd(u1, u2, weight, doc_ids, init)
