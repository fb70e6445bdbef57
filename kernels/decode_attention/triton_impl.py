"""Split-K ("flash-decoding") Triton kernel: one query per (row, head), the cache split over programs.

A decode step reads the whole KV cache once; with one query per (row, head) there are only B x H rows of
work, too few programs to keep the GPU's memory system busy at small batches. The kernel splits each row's
cache slots over NS programs; each keeps an online softmax (max m, sum l, weighted values acc) over its slots
and a second kernel combines the partials (exp(m_i - max m) weights).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import new_output, num_sms
from .._pdl import pdl_options, release

BLOCK_N = 64
# programs to aim for per streaming multiprocessor
PROGRAMS_PER_SM = 4


@triton.jit
def _split_kernel(
    Q,
    K,
    V,
    VALID,
    ACC,
    M,
    L,
    H,
    D,
    limit,
    chunk,
    scale,
    sqb,
    sqh,
    skb,
    skc,
    skh,
    svb,
    svc,
    svh,
    svalb,
    NS,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    release(PDL)  # kernels/_pdl.py: everything below may depend on the kernel before
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // H
    h = row % H
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    b64 = b.to(tl.int64)  # a 32k cache of a few dozen rows passes 2^31 elements
    q = tl.load(Q + b64 * sqb + h * sqh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    m = tl.full([1], -1.0e30, tl.float32)
    l_sum = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    start = split * chunk
    stop = tl.minimum(start + chunk, limit)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < stop
        ok = tl.load(VALID + b64 * svalb + offs_n, mask=mask_n, other=0).to(tl.int1) & mask_n
        tile = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + b64 * skb + offs_n[:, None] * skc + h * skh + offs_d[None, :], mask=tile, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        s = tl.where(ok, s, -1.0e30)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.where(ok, tl.exp(s - m_new), 0.0)
        alpha = tl.exp(m - m_new)
        v = tl.load(V + b64 * svb + offs_n[:, None] * svc + h * svh + offs_d[None, :], mask=tile, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        m = m_new
    out = row * NS + split
    tl.store(ACC + out * BLOCK_D + offs_d, acc)
    tl.store(M + out + tl.arange(0, 1), m)
    tl.store(L + out + tl.arange(0, 1), l_sum)


@triton.jit
def _combine_kernel(ACC, M, L, OUT, D, NS, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """o[row] = sum_i exp(m_i - max m) acc_i / sum_i exp(m_i - max m) l_i over the row's NS partials."""
    release(PDL)  # kernels/_pdl.py: everything below may depend on the kernel before
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NS
    m = tl.load(M + row * NS + offs_s, mask=mask_s, other=-1.0e30)
    l_sum = tl.load(L + row * NS + offs_s, mask=mask_s, other=0.0)
    weight = tl.where(mask_s, tl.exp(m - tl.max(m, axis=0)), 0.0)
    acc = tl.load(
        ACC + (row * NS + offs_s[:, None]) * BLOCK_D + offs_d[None, :], mask=mask_s[:, None], other=0.0
    )
    o = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l_sum * weight, axis=0)
    tl.store(OUT + row * D + offs_d, o.to(OUT.dtype.element_ty), mask=offs_d < D)


def split_count(rows: int, limit: int, sms: int) -> int:
    """Programs per (row, head): PROGRAMS_PER_SM per multiprocessor in all, at most one per BLOCK_N slots."""
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, rows), triton.cdiv(limit, BLOCK_N)))


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid: torch.Tensor,
    limit: int,
    scale: float,
) -> torch.Tensor:
    """See kernels.decode_attention.decode_attention (same arguments; last dims contiguous)."""
    batch, heads, dim = q.shape
    rows = batch * heads
    splits = split_count(rows, limit, num_sms(q.device))
    chunk = triton.cdiv(triton.cdiv(limit, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(limit, chunk)
    block_d = triton.next_power_of_2(dim)
    acc = new_output((rows, splits, block_d), torch.float32, q.device)
    m = new_output((rows, splits), torch.float32, q.device)
    l_sum = new_output((rows, splits), torch.float32, q.device)
    valid_u8 = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    _split_kernel[(rows, splits)](
        q,
        k_cache,
        v_cache,
        valid_u8,
        acc,
        m,
        l_sum,
        heads,
        dim,
        limit,
        chunk,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        valid_u8.stride(0),
        splits,
        BLOCK_N=BLOCK_N,
        BLOCK_D=block_d,
        num_warps=4,
        **pdl_options(q.device, "attention"),
    )
    out = new_output((batch, heads, dim), q.dtype, q.device)
    _combine_kernel[(rows,)](
        acc, m, l_sum, out, dim, splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d, num_warps=4,
        **pdl_options(q.device, "attention"),
    )
    return out
