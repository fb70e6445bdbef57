"""Triton residual add + RMSNorm: forward in one pass over the rows, backward in one pass.

Forward (one row per program): reads x (and the update), writes the new residual stream in its own dtype
(fp32 as published) and the normed output in the compute dtype, plus 1/rms per row: the unfused chain
(cast, add, cast, pow, mean, rsqrt, two muls, cast) reads and writes the [rows, D] stream about ten times.
Backward (a fixed number of programs, each over a contiguous run of rows): recomputes x_hat from the saved
residual and 1/rms, adds the gradient arriving on the residual stream, writes dx (and d update) and a
per-program partial weight gradient that is summed on the host (as flash-attn's layer_norm does).

Both directions are torch.library custom ops (`based::add_rms_norm_fwd` / `_bwd`) with fake
implementations and autograd registered on the forward op, so torch.compile keeps them in its graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import new_output, next_pow2, num_sms, rows_2d
from .._pdl import pdl_options, release


@triton.jit
def _rms_norm_fwd_kernel(
    X, U, W, Y, R, RSTD, N, eps, sx, su, sy, sr, HAS_UPDATE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    release(PDL)  # kernels/_pdl.py: everything below may depend on the kernel before
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_UPDATE:
        # the sum is rounded to the residual dtype first, so the norm sees exactly the stored stream
        u = tl.load(U + row * su + cols, mask=mask, other=0.0).to(tl.float32)
        r = x.to(R.dtype.element_ty).to(tl.float32) + u.to(R.dtype.element_ty).to(tl.float32)
        r = r.to(R.dtype.element_ty)
        tl.store(R + row * sr + cols, r, mask=mask)
        x = r.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * sy + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    R,
    W,
    RSTD,
    DY,
    DRES,
    DX,
    DU,
    DW_PART,
    M,
    N,
    rows_per_program,
    sr,
    sdy,
    sdr,
    sdx,
    sdu,
    HAS_DRES: tl.constexpr,
    HAS_DU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (start + i).to(tl.int64)
        if row < M:
            r = tl.load(R + row * sr + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            dy = tl.load(DY + row * sdy + cols, mask=mask, other=0.0).to(tl.float32)
            x_hat = r * rstd
            wdy = w * dy
            dw += dy * x_hat
            c = tl.sum(x_hat * wdy, axis=0) / N
            dx = (wdy - x_hat * c) * rstd
            if HAS_DRES:
                dx += tl.load(DRES + row * sdr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * sdx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_DU:
                tl.store(DU + row * sdu + cols, dx.to(DU.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


@torch.library.custom_op("based::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(
    x: torch.Tensor,
    update: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
    residual_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [..., D] out_dtype, residual [..., D] residual_dtype (shape [0] without update), rstd [rows] fp32)."""
    return _fwd_body(x, update, weight, eps, out_dtype, residual_dtype)


def _fwd_body(x, update, weight, eps, out_dtype, residual_dtype):
    x2 = rows_2d(x)
    rows, dim = x2.shape
    y = new_output(x.shape, out_dtype, x.device)
    rstd = new_output((rows,), torch.float32, x.device)
    has_update = update is not None
    residual = new_output(x.shape if has_update else (0,), residual_dtype, x.device)
    u2 = rows_2d(update) if has_update else x2
    r2 = residual.view(rows, dim) if has_update else y.view(rows, dim)
    if rows:
        block = next_pow2(dim)
        _rms_norm_fwd_kernel[(rows,)](
            x2,
            u2,
            weight,
            y.view(rows, dim),
            r2,
            rstd,
            dim,
            eps,
            x2.stride(0),
            u2.stride(0),
            dim,
            dim,
            HAS_UPDATE=has_update,
            BLOCK=block,
            num_warps=_num_warps(block),
            **pdl_options(x.device, "norm"),
        )
    return y, residual, rstd


@add_rms_norm_fwd.register_fake
def _(x, update, weight, eps, out_dtype, residual_dtype):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    residual = x.new_empty(x.shape if update is not None else (0,), dtype=residual_dtype)
    return x.new_empty(x.shape, dtype=out_dtype), residual, x.new_empty((rows,), dtype=torch.float32)


@torch.library.custom_op("based::add_rms_norm_bwd", mutates_args=())
def add_rms_norm_bwd(
    dy: torch.Tensor,
    dresidual: torch.Tensor | None,
    residual: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dx_dtype: torch.dtype,
    du_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [..., D] dx_dtype, d update [..., D] du_dtype (shape [0] when du_dtype is None), dweight [D]).

    `residual` is what was normed (the new stream, or x without update); dx = d update = the gradient of
    the residual input of the norm plus `dresidual`, the gradient that arrives on the new stream.
    """
    return _bwd_body(dy, dresidual, residual, weight, rstd, dx_dtype, du_dtype)


def _bwd_body(dy, dresidual, residual, weight, rstd, dx_dtype, du_dtype):
    r2, dy2 = rows_2d(residual), rows_2d(dy)
    rows, dim = r2.shape
    dx = new_output(residual.shape, dx_dtype, dy.device)
    du = new_output(residual.shape if du_dtype is not None else (0,), du_dtype or dx_dtype, dy.device)
    programs = max(1, min(rows, 2 * num_sms(dy.device)))
    rows_per_program = triton.cdiv(rows, programs) if rows else 0
    dw_part = new_output((programs, dim), torch.float32, dy.device)
    dr2 = rows_2d(dresidual) if dresidual is not None else dy2
    du2 = du.view(rows, dim) if du_dtype is not None else dx.view(rows, dim)
    block = next_pow2(dim)
    if rows:
        _rms_norm_bwd_kernel[(programs,)](
            r2,
            weight,
            rstd,
            dy2,
            dr2,
            dx.view(rows, dim),
            du2,
            dw_part,
            rows,
            dim,
            rows_per_program,
            r2.stride(0),
            dy2.stride(0),
            dr2.stride(0),
            dim,
            dim,
            HAS_DRES=dresidual is not None,
            HAS_DU=du_dtype is not None,
            BLOCK=block,
            num_warps=_num_warps(block),
        )
    else:
        dw_part.zero_()
    return dx, du, dw_part.sum(0).to(weight.dtype)


@add_rms_norm_bwd.register_fake
def _(dy, dresidual, residual, weight, rstd, dx_dtype, du_dtype):
    du = residual.new_empty(residual.shape if du_dtype is not None else (0,), dtype=du_dtype or dx_dtype)
    return residual.new_empty(residual.shape, dtype=dx_dtype), du, weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, update, weight, eps, out_dtype, residual_dtype = inputs
    _, residual, rstd = output
    normed = residual if update is not None else x
    ctx.save_for_backward(normed, weight, rstd)
    ctx.x_dtype = x.dtype
    ctx.update_dtype = update.dtype if update is not None else None


def _backward_with(bwd, ctx, dy, dresidual):
    normed, weight, rstd = ctx.saved_tensors
    has_update = ctx.update_dtype is not None
    # the residual output is unused without update (shape [0]); with one, a None gradient means "not used"
    dres = dresidual if has_update and dresidual is not None else None
    separate_du = has_update and ctx.update_dtype != ctx.x_dtype
    dx, du, dw = bwd(dy, dres, normed, weight, rstd, ctx.x_dtype, ctx.update_dtype if separate_du else None)
    if not has_update:
        return dx, None, dw, None, None, None
    return dx, du if separate_du else dx, dw, None, None, None


def _backward(ctx, dy, dresidual, drstd):
    return _backward_with(add_rms_norm_bwd, ctx, dy, dresidual)


add_rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAddRMSNorm(torch.autograd.Function):
    """The same forward and backward as the custom op, calling the bodies directly: eager mode skips the op's
    Python dispatch (about 7x a plain call, see kernels/taylor_linear_attn/ops.py), twice per norm and step."""

    @staticmethod
    def forward(ctx, x, update, weight, eps, out_dtype, residual_dtype):
        out = _fwd_body(x, update, weight, eps, out_dtype, residual_dtype)
        _setup_context(ctx, (x, update, weight, eps, out_dtype, residual_dtype), out)
        ctx.mark_non_differentiable(out[2])
        return out

    @staticmethod
    def backward(ctx, dy, dresidual, drstd):
        return _backward_with(_bwd_body, ctx, dy, dresidual)


def add_rms_norm_triton(
    x: torch.Tensor,
    update: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
    residual_dtype: torch.dtype,
):
    """y, or (y, residual) when `update` is given; see `kernels.fused_norm.add_rms_norm`.

    Under torch.compile the custom op (one node of the graph); in eager mode the same bodies without its dispatch.
    """
    fn = add_rms_norm_fwd if torch.compiler.is_compiling() else _EagerAddRMSNorm.apply
    y, residual, _ = fn(x, update, weight, eps, out_dtype, residual_dtype)
    return y if update is None else (y, residual)
