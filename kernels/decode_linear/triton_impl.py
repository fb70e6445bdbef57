"""Triton kernel of decode_linear: y [M, N] = x [M, K] W[N, K]^T (+ b) for the few rows of a decode step.

At M <= 16 the product is a stream of the weights (2 bytes per weight, 1-16 rows of x). cuBLAS runs these
shapes at 1.6-2.7 TB/s on the H200 (bench/profile_decode.py, docs/PERFORMANCE.md: 64x8 tiles, split-K with a
second reduction kernel at N 1792). Here one program owns BN output columns over all of K: the x tile is
padded to 16 rows so the product runs on the tensor cores, and the K loop is software-pipelined
(num_stages) so that each program keeps several weight tiles in flight, which is what sets the bandwidth of
a stream with one pass over every byte. No split-K, so no partial sums and one launch per product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import interpreting, new_output
from .._pdl import bulk_prefetch_ok, pdl_options, prefetch_rows_l2, release
from . import MAX_ROWS

BLOCK_M = MAX_ROWS  # x padded to this many rows for tl.dot (at least 16)


@triton.jit
def _program_tile(M, N, BM: tl.constexpr, BN: tl.constexpr):
    """This program's output columns (BN of N) and the BM padded rows, with their masks."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def _dot(x, w, acc, EMULATE: tl.constexpr):
    """acc + x [BM, BK] @ w [BN, BK]^T in fp32."""
    if EMULATE:  # the interpreter's bf16 dot multiplies raw bit patterns (see taylor_linear_attn's _mm)
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    # fp32 inputs exact (not tf32); half inputs on the tensor cores as they are
    return tl.dot(x, tl.trans(w), acc, input_precision="ieee" if x.dtype == tl.float32 else "tf32")


@triton.jit
def _decode_linear_kernel(X, W, B, Y, M, N, K, sxm, swn, sym, row_bytes,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr,
                          EVEN_K: tl.constexpr, STAGES: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr,
                          PREFETCH: tl.constexpr):
    offs_m, offs_n, mask_m, mask_n = _program_tile(M, N, BM, BN)
    if PREFETCH:  # the weights are all this kernel reads before the previous kernel completes (kernels/_pdl.py)
        prefetch_rows_l2(W, tl.minimum(offs_n, N - 1), swn, row_bytes)
    release(PDL)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BK)
        if EVEN_K:
            x = tl.load(X + offs_m[:, None] * sxm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
            w = tl.load(W + offs_n[:, None].to(tl.int64) * swn + offs_k[None, :], mask=mask_n[:, None], other=0.0)
        else:
            mask_k = offs_k < K
            x = tl.load(X + offs_m[:, None] * sxm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)
            w = tl.load(W + offs_n[:, None].to(tl.int64) * swn + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = _dot(x, w, acc, EMULATE)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * sym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _pdl_args(weight: torch.Tensor) -> dict:
    """The products' PDL launch arguments (kernels/_pdl.py, group "linear")."""
    return pdl_options(weight.device, "linear", prefetch=bulk_prefetch_ok(weight))


def _prefetch_bytes(weight: torch.Tensor, block_k: int, num_stages: int) -> int:
    """Bytes of each weight row a program prefetches into L2 before the wait (kernels/_pdl.py): the K tiles its
    pipelined loop loads first (all of them would make the loop wait behind the whole row's prefetch)."""
    return min(weight.shape[1], block_k * num_stages) * weight.element_size()


def decode_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, block_n: int,
                         block_k: int, num_stages: int, num_warps: int) -> torch.Tensor:
    """x [M, K] (M <= 16, unit last stride), weight [N, K] contiguous, bias [N] or None -> y [M, N]."""
    rows, k = x.shape
    n = weight.shape[0]
    y = new_output((rows, n), x.dtype, x.device)
    if rows == 0 or n == 0:
        return y
    grid = (triton.cdiv(n, block_n),)
    _decode_linear_kernel[grid](x, weight, bias if bias is not None else weight, y, rows, n, k, x.stride(0),
                                weight.stride(0), y.stride(0), _prefetch_bytes(weight, block_k, num_stages),
                                BM=BLOCK_M, BN=block_n, BK=block_k, HAS_BIAS=bias is not None,
                                EVEN_K=k % block_k == 0, STAGES=num_stages, EMULATE=interpreting(),
                                num_warps=num_warps, **_pdl_args(weight))
    return y


@triton.jit
def _decode_swiglu_kernel(X, W, Y, M, H, K, sxm, swn, sym, row_bytes,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
                          STAGES: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    """Y [M, H] = value * silu(gate) of x W^T, W [2H, K] = [value rows; gate rows] (fc1 of SwiGLU): each program
    streams the value rows and the gate rows of its BN output columns, so the gate is applied in the epilogue
    and fc1's [M, 2H] output is never written. value and gate are rounded to Y's dtype first, as fc1's output
    would be before the SwiGLU op reads it."""
    offs_m, offs_n, mask_m, mask_n = _program_tile(M, H, BM, BN)
    if PREFETCH:
        rows = tl.minimum(offs_n, H - 1)
        prefetch_rows_l2(W, rows, swn, row_bytes)
        prefetch_rows_l2(W, rows + H, swn, row_bytes)
    release(PDL)
    acc_v = tl.zeros([BM, BN], dtype=tl.float32)
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    rows_v = W + offs_n[:, None].to(tl.int64) * swn
    rows_g = W + (offs_n[:, None] + H).to(tl.int64) * swn
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BK)
        if EVEN_K:
            mask_x = mask_m[:, None]
            mask_w = mask_n[:, None]
        else:
            mask_x = mask_m[:, None] & (offs_k < K)[None, :]
            mask_w = mask_n[:, None] & (offs_k < K)[None, :]
        x = tl.load(X + offs_m[:, None] * sxm + offs_k[None, :], mask=mask_x, other=0.0)
        w_v = tl.load(rows_v + offs_k[None, :], mask=mask_w, other=0.0)
        w_g = tl.load(rows_g + offs_k[None, :], mask=mask_w, other=0.0)
        acc_v = _dot(x, w_v, acc_v, EMULATE)
        acc_g = _dot(x, w_g, acc_g, EMULATE)
    out_dt = Y.dtype.element_ty
    value = acc_v.to(out_dt).to(tl.float32)
    gate = acc_g.to(out_dt).to(tl.float32)
    tl.store(Y + offs_m[:, None] * sym + offs_n[None, :], (value * gate * tl.sigmoid(gate)).to(out_dt),
             mask=mask_m[:, None] & mask_n[None, :])


def decode_swiglu_triton(x: torch.Tensor, weight: torch.Tensor, *, block_n: int, block_k: int, num_stages: int,
                         num_warps: int) -> torch.Tensor:
    """x [M, K] (M <= 16, unit last stride), weight [2H, K] contiguous -> value * silu(gate) [M, H]."""
    rows, k = x.shape
    hidden = weight.shape[0] // 2
    y = new_output((rows, hidden), x.dtype, x.device)
    if rows == 0 or hidden == 0:
        return y
    _decode_swiglu_kernel[(triton.cdiv(hidden, block_n),)](
        x, weight, y, rows, hidden, k, x.stride(0), weight.stride(0), y.stride(0),
        _prefetch_bytes(weight, block_k, num_stages),
        BM=BLOCK_M, BN=block_n, BK=block_k, EVEN_K=k % block_k == 0, STAGES=num_stages, EMULATE=interpreting(),
        num_warps=num_warps, **_pdl_args(weight))
    return y
