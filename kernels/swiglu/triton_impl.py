"""Triton SwiGLU: one pass forward (read y, write h), one pass backward (read y and dh, write dy).

Each program owns a [BLOCK_M rows x BLOCK_N columns] tile of the hidden dimension and reads the value and gate
columns of that tile once: the backward's bytes are the floor (y and dh read, dy written, once each).
Both directions are torch.library custom ops (`based::swiglu_fwd` / `_bwd`) with fake implementations and
autograd registered on the forward op, so torch.compile keeps them in its graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import new_output, rows_2d

BLOCK_M = 4
MAX_BLOCK_N = 1024


@triton.jit
def _swiglu_fwd_kernel(Y, H, M, N, sy, sh, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    y_ptr = Y + rows.to(tl.int64)[:, None] * sy + cols[None, :]
    value = tl.load(y_ptr, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(y_ptr + N, mask=mask, other=0.0).to(tl.float32)
    h = value * gate * tl.sigmoid(gate)
    tl.store(H + rows.to(tl.int64)[:, None] * sh + cols[None, :], h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(Y, DH, DY, M, N, sy, sdh, sdy, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    y_ptr = Y + r64 * sy + cols[None, :]
    value = tl.load(y_ptr, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(y_ptr + N, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(DH + r64 * sdh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    d_value = dh * gate * sig
    d_gate = dh * value * sig * (1.0 + gate * (1.0 - sig))
    dy_ptr = DY + r64 * sdy + cols[None, :]
    tl.store(dy_ptr, d_value.to(DY.dtype.element_ty), mask=mask)
    tl.store(dy_ptr + N, d_gate.to(DY.dtype.element_ty), mask=mask)


def _launch(kernel, rows: int, hidden: int, *args) -> None:
    block_n = min(MAX_BLOCK_N, triton.next_power_of_2(max(hidden, 1)))
    if rows and hidden:
        grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(hidden, block_n))
        kernel[grid](*args, BLOCK_M=BLOCK_M, BLOCK_N=block_n, num_warps=4 if block_n >= 512 else 2)


@torch.library.custom_op("based::swiglu_fwd", mutates_args=())
def swiglu_fwd(y: torch.Tensor) -> torch.Tensor:
    """h [..., H] = value * silu(gate) for y [..., 2H] = [value | gate], in y's dtype."""
    return _fwd_body(y)


def _fwd_body(y: torch.Tensor) -> torch.Tensor:
    y2 = rows_2d(y)
    rows, hidden = y2.shape[0], y2.shape[1] // 2
    h = new_output((*y.shape[:-1], hidden), y.dtype, y.device)
    _launch(_swiglu_fwd_kernel, rows, hidden, y2, h.view(rows, hidden), rows, hidden, y2.stride(0), hidden)
    return h


@swiglu_fwd.register_fake
def _(y):
    return y.new_empty((*y.shape[:-1], y.shape[-1] // 2))


@torch.library.custom_op("based::swiglu_bwd", mutates_args=())
def swiglu_bwd(dh: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dy [..., 2H] = [d value | d gate] in y's dtype, from dh [..., H] and the forward's input y."""
    return _bwd_body(dh, y)


def _bwd_body(dh: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y2, dh2 = rows_2d(y), rows_2d(dh)
    rows, hidden = y2.shape[0], y2.shape[1] // 2
    dy = new_output(y.shape, y.dtype, y.device)
    _launch(_swiglu_bwd_kernel, rows, hidden, y2, dh2, dy.view(rows, 2 * hidden), rows, hidden, y2.stride(0),
            dh2.stride(0), 2 * hidden)
    return dy


@swiglu_bwd.register_fake
def _(dh, y):
    return y.new_empty(y.shape)


def _setup_context(ctx, inputs, output) -> None:
    (y,) = inputs
    ctx.save_for_backward(y)


def _backward(ctx, dh):
    (y,) = ctx.saved_tensors
    return swiglu_bwd(dh, y)


swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerSwiGLU(torch.autograd.Function):
    """The custom op's forward and backward calling the bodies directly (eager mode skips the op's dispatch)."""

    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        return _fwd_body(y)

    @staticmethod
    def backward(ctx, dh):
        (y,) = ctx.saved_tensors
        return _bwd_body(dh, y)


def swiglu_triton(y: torch.Tensor) -> torch.Tensor:
    """See `kernels.swiglu.swiglu`. Under torch.compile the custom op (one node of the graph); in eager mode
    the same bodies without its dispatch."""
    y = y if y.stride(-1) == 1 else y.contiguous()
    fn = swiglu_fwd if torch.compiler.is_compiling() else _EagerSwiGLU.apply
    return fn(y)
