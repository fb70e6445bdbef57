"""Triton sliding-window causal softmax attention (small windows): forward, backward, decode step.

Forward: one program per (query block of BM rows, batch x head); it visits only the key blocks that
intersect [m0 - window, m0 + BM), with online softmax in fp32 and the log-sum-exp saved for backward.
Masks: key j is visible to query i when max(i - window, start(i)) <= j <= i, start(i) the position where
query i's document starts (ops.py computes it from doc ids: a change of id starts a document): two compares
per element against per-row limits computed once per query block. Every tile applies the mask: skipping it
on the tiles that lie wholly inside the band and one document (a branch per tile) measured slower on the
H200 (docs/PERFORMANCE.md, seventh session).

Backward, both modes with delta = rowsum(dO * OUT) [B, H, T] (fp32; where it is computed: below) and block
sizes of their own (Plan.BMB, Plan.BNB for dK/dV, Plan.BMQ, Plan.BNQ for dQ; by default the forward's):
- "split" (the default): FlashAttention-2 style without atomics: one kernel per key block for dK, dV
  (visiting the query blocks within the window after it) and one per query block for dQ. Each recomputes
  P and re-reads the window. Bitwise deterministic.
- "fused": the dK, dV kernel alone; each key block also adds its share of dQ = scale * dS K to a
  zero-initialized fp32 [B, T, H, D] buffer with masked atomic adds (cast to q's dtype on the host). One
  pass over the window instead of two, but NOT bitwise deterministic: the order of the fp32 atomic adds
  varies from run to run (the values agree to fp32 rounding).
Every key block needs delta of all the queries it visits before it can form dS (computing it there would
re-read OUT for each of the 2-3 key blocks that visit a query block). "split" runs its dQ kernel first,
which loads dO anyway: it reads OUT beside it and writes delta for the dK/dV kernel after it. "fused"
keeps a separate pass for delta (a small, bandwidth-bound kernel that reads OUT and dO once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import interpreting, last_dim_contiguous, new_output, next_pow2
from .._pdl import pdl_options, release
from .ops import sliding_window_attention_triton  # noqa: F401  (re-exported: bench/, tests)

LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """tl.dot with fp32 accumulation; "emulate" multiplies bf16-rounded operands in fp32 (the interpreter's
    bf16 dot is broken in triton 3.9)."""
    if PREC == "emulate":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _row_band(offs_q, mask_q, START, WINDOW):
    """Per query row, its first and last visible key: max(q - WINDOW, the start of q's document) and q itself
    (-1 for rows past the sequence: they see nothing; keys past it lie after every valid query)."""
    start = tl.load(START + offs_q, mask=mask_q, other=0)
    return tl.maximum(offs_q - WINDOW, start), tl.where(mask_q, offs_q, -1)


@triton.jit
def _visible(offs_k, lo_q, hi_q):
    """[len(lo_q), len(offs_k)]: key visible to query (within the query's band)."""
    return (offs_k[None, :] >= lo_q[:, None]) & (offs_k[None, :] <= hi_q[:, None])


@triton.jit
def _fwd_kernel(Q, K, V, START, OUT, LSE, T, H, D, WINDOW, qk_scale,
                sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    m0 = i_m * BM
    offs_m = m0 + tl.arange(0, BM)
    mask_m = offs_m < T
    offs_d = tl.arange(0, BD)
    mask_d = offs_d < D
    q = tl.load(Q + i_b.to(tl.int64) * sqb + i_h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    lo_q, hi_q = _row_band(offs_m, mask_m, START + i_b.to(tl.int64) * T, WINDOW)
    k_ptr = K + i_b.to(tl.int64) * skb + i_h * skh
    v_ptr = V + i_b.to(tl.int64) * svb + i_h * svh
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    lo = (tl.maximum(m0 - WINDOW, 0) // BN) * BN
    hi = tl.minimum(T, m0 + BM)
    for n0 in range(lo, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < T
        k = tl.load(k_ptr + offs_n[:, None] * skt + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * svt + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        s = _mm(q, tl.trans(k), PREC) * qk_scale
        s = tl.where(_visible(offs_n, lo_q, hi_q), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # rows that have seen no visible key yet keep m = -inf; shift by 0 instead to avoid inf - inf
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PREC)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(OUT + i_b.to(tl.int64) * sob + i_h * soh + offs_m[:, None] * sot + offs_d[None, :],
             o.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + i_bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_safe), mask=mask_m)


@triton.jit
def _delta_kernel(OUT, DO, DELTA, T, H, D, sob, sot, soh, sdob, sdot, sdoh, BT: tl.constexpr, BD: tl.constexpr):
    """DELTA[b, h, t] = dO_t . O_t (the softmax backward's row term)."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_t = i_t * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    mask = (offs_t[:, None] < T) & (offs_d[None, :] < D)
    o = tl.load(OUT + i_b.to(tl.int64) * sob + i_h * soh + offs_t[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + i_b.to(tl.int64) * sdob + i_h * sdoh + offs_t[:, None] * sdot + offs_d[None, :], mask=mask,
                 other=0.0)
    tl.store(DELTA + i_bh.to(tl.int64) * T + offs_t, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1),
             mask=offs_t < T)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, START, DO, LSE, DELTA, DK, DV, DQ, T, H, D, WINDOW, qk_scale, scale,
                     sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
                     sdkb, sdkt, sdkh, sdvb, sdvt, sdvh, sdqb, sdqt, sdqh,
                     BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
                     ATOMIC_DQ: tl.constexpr):
    """dK, dV of one key block; with ATOMIC_DQ also its share of dQ, added to the fp32 buffer DQ."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    n0 = i_n * BN
    offs_n = n0 + tl.arange(0, BN)
    mask_n = offs_n < T
    offs_d = tl.arange(0, BD)
    mask_d = offs_d < D
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + i_b.to(tl.int64) * skb + i_h * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + i_b.to(tl.int64) * svb + i_h * svh + offs_n[:, None] * svt + offs_d[None, :], mask=kv_mask,
                other=0.0)
    start_ptr = START + i_b.to(tl.int64) * T
    q_ptr = Q + i_b.to(tl.int64) * sqb + i_h * sqh
    do_ptr = DO + i_b.to(tl.int64) * sdob + i_h * sdoh
    dq_ptr = DQ + i_b.to(tl.int64) * sdqb + i_h * sdqh
    lse_ptr = LSE + i_bh.to(tl.int64) * T
    delta_ptr = DELTA + i_bh.to(tl.int64) * T
    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BD], dtype=tl.float32)
    lo = (n0 // BM) * BM
    hi = tl.minimum(T, n0 + BN + WINDOW)
    for m0 in range(lo, hi, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < T
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_ptr + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_ptr + offs_m[:, None] * sdot + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + offs_m, mask=mask_m, other=0.0)
        lo_q, hi_q = _row_band(offs_m, mask_m, start_ptr, WINDOW)
        # transposed blocks: rows are keys, columns are queries
        s_t = _mm(k, tl.trans(q), PREC) * qk_scale
        visible_t = (offs_n[:, None] >= lo_q[None, :]) & (offs_n[:, None] <= hi_q[None, :])
        p_t = tl.where(visible_t, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += _mm(p_t.to(do.dtype), do, PREC)
        dp_t = _mm(v, tl.trans(do), PREC)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += _mm(ds_t, q, PREC)
        if ATOMIC_DQ:
            # rows >= T and columns >= D are masked off: they belong to the next head or batch, or lie
            # past the buffer; relaxed order suffices, the sums are read only after the kernel ends
            dq = _mm(tl.trans(ds_t), k, PREC) * scale
            tl.atomic_add(dq_ptr + offs_m[:, None] * sdqt + offs_d[None, :], dq, mask=q_mask, sem="relaxed")
    tl.store(DK + i_b.to(tl.int64) * sdkb + i_h * sdkh + offs_n[:, None] * sdkt + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + i_b.to(tl.int64) * sdvb + i_h * sdvh + offs_n[:, None] * sdvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, START, DO, LSE, DELTA, DQ, OUT, T, H, D, WINDOW, qk_scale, scale,
                   sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdqb, sdqt, sdqh, sob, sot, soh,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """dQ of one query block; first DELTA of its rows (rowsum(dO * OUT)), which the dK/dV kernel reads after."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    m0 = i_m * BM
    offs_m = m0 + tl.arange(0, BM)
    mask_m = offs_m < T
    offs_d = tl.arange(0, BD)
    mask_d = offs_d < D
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + i_b.to(tl.int64) * sqb + i_h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask,
                other=0.0)
    do = tl.load(DO + i_b.to(tl.int64) * sdob + i_h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=q_mask,
                 other=0.0)
    lse = tl.load(LSE + i_bh.to(tl.int64) * T + offs_m, mask=mask_m, other=0.0)
    o = tl.load(OUT + i_b.to(tl.int64) * sob + i_h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=q_mask,
                other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + i_bh.to(tl.int64) * T + offs_m, delta, mask=mask_m)
    lo_q, hi_q = _row_band(offs_m, mask_m, START + i_b.to(tl.int64) * T, WINDOW)
    k_ptr = K + i_b.to(tl.int64) * skb + i_h * skh
    v_ptr = V + i_b.to(tl.int64) * svb + i_h * svh
    dq = tl.zeros([BM, BD], dtype=tl.float32)
    lo = (tl.maximum(m0 - WINDOW, 0) // BN) * BN
    hi = tl.minimum(T, m0 + BM)
    for n0 in range(lo, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < T
        k = tl.load(k_ptr + offs_n[:, None] * skt + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * svt + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        s = _mm(q, tl.trans(k), PREC) * qk_scale
        p = tl.where(_visible(offs_n, lo_q, hi_q), tl.exp2(s - lse[:, None]), 0.0)
        dp = _mm(do, tl.trans(v), PREC)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, PREC)
    tl.store(DQ + i_b.to(tl.int64) * sdqb + i_h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _step_kernel(Q, K, V, KC, VC, POS, OUT, H, D, W, scale,
                 sqb, sqh, skb, skh, svb, svh, scb, scs, sch, svcb, svcs, svch, sob, soh,
                 BW: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr):
    """One decode token for one (batch, head): attend the ring of W past keys plus itself, then store k, v."""
    release(PDL)  # kernels/_pdl.py: everything below may depend on the kernel before
    i_bh = tl.program_id(0)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_d = tl.arange(0, BD)
    mask_d = offs_d < D
    slots = tl.arange(0, BW)
    pos = tl.load(POS + i_b).to(tl.int32)
    prev = pos - 1
    # newest earlier position held by each slot (slot = position % W); valid when >= 0
    slot_pos = prev - ((prev - slots) % W + W) % W
    valid = (slots < W) & (slot_pos >= 0)
    q = tl.load(Q + i_b * sqb + i_h * sqh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    k = tl.load(K + i_b * skb + i_h * skh + offs_d, mask=mask_d, other=0.0)
    v = tl.load(V + i_b * svb + i_h * svh + offs_d, mask=mask_d, other=0.0)
    kc_ptr = KC + i_b.to(tl.int64) * scb + i_h * sch
    vc_ptr = VC + i_b.to(tl.int64) * svcb + i_h * svch
    cache_mask = valid[:, None] & mask_d[None, :]
    kc = tl.load(kc_ptr + slots[:, None] * scs + offs_d[None, :], mask=cache_mask, other=0.0).to(tl.float32)
    vc = tl.load(vc_ptr + slots[:, None] * svcs + offs_d[None, :], mask=cache_mask, other=0.0).to(tl.float32)
    s = tl.where(valid, tl.sum(kc * q[None, :], axis=1) * scale, float("-inf"))
    s_self = tl.sum(k.to(tl.float32) * q, axis=0) * scale
    m = tl.maximum(tl.max(s, axis=0), s_self)
    p = tl.exp(s - m)
    p_self = tl.exp(s_self - m)
    o = (tl.sum(p[:, None] * vc, axis=0) + p_self * v.to(tl.float32)) / (tl.sum(p, axis=0) + p_self)
    tl.store(OUT + i_b * sob + i_h * soh + offs_d, o.to(OUT.dtype.element_ty), mask=mask_d)
    # every thread has read the ring before the slot of position pos - W is overwritten
    tl.debug_barrier()
    slot = pos % W
    tl.store(kc_ptr + slot * scs + offs_d, k.to(KC.dtype.element_ty), mask=mask_d)
    tl.store(vc_ptr + slot * svcs + offs_d, v.to(VC.dtype.element_ty), mask=mask_d)


# ----------------------------------------------------------------------------------------------------------
# host side


def _precision(dtype: torch.dtype) -> str:
    # bf16/fp16 operands go to the tensor cores as they are; fp32 operands use tf32 on the GPU (about 1e-3
    # relative) and exact fp32 products in the interpreter, where the CPU tests hold them to 2e-5
    if interpreting():
        return "ieee" if dtype == torch.float32 else "emulate"
    return "tf32"


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


BWD_MODES = ("split", "fused")


class Plan:
    """Block sizes of one call: query rows BM and key rows BN per tile of the forward; BMB and BNB of the
    backward's dK/dV kernel (default: the forward's); BMQ and BNQ of its dQ kernel (default: the dK/dV
    kernel's); warps of the forward, of the dK/dV kernel and of the dQ kernel (default: the dK/dV kernel's);
    pipeline stages of the forward and of the backward (default: the forward's); the backward mode `bwd`
    ("split" or "fused", see the module docstring; default "split")."""

    def __init__(self, head_dim: int, block_m: int | None = None, block_n: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None, bwd: str | None = None,
                 bwd_block_m: int | None = None, bwd_block_n: int | None = None,
                 bwd_warps: int | None = None, dq_block_m: int | None = None, dq_block_n: int | None = None,
                 dq_warps: int | None = None, bwd_stages: int | None = None) -> None:
        if bwd is not None and bwd not in BWD_MODES:
            raise ValueError(f"sliding_window_attention_triton: bwd={bwd!r}; expected one of {BWD_MODES} "
                             "(or None for 'split')")
        self.bwd = bwd or "split"
        self.BD = max(16, next_pow2(head_dim))
        self.BM = block_m or 64
        self.BN = block_n or 64
        self.BMB = bwd_block_m or self.BM
        self.BNB = bwd_block_n or self.BN
        self.BMQ = dq_block_m or self.BMB
        self.BNQ = dq_block_n or self.BNB
        self.num_warps = num_warps or 4
        self.bwd_warps = bwd_warps or self.num_warps
        self.dq_warps = dq_warps or self.bwd_warps
        self.num_stages = num_stages or 2
        self.bwd_stages = bwd_stages or self.num_stages


def forward(q, k, v, starts, window, scale, plan: Plan):
    """o, lse; `starts` [B, T] int32: where each token's document starts (ops.doc_start_positions)."""
    batch, seqlen, heads, dim = q.shape
    o = new_output(q.shape, q.dtype, q.device)
    lse = new_output((batch, heads, seqlen), torch.float32, q.device)
    grid = (triton.cdiv(seqlen, plan.BM), batch * heads)
    _fwd_kernel[grid](q, k, v, starts, o, lse, seqlen, heads, dim, window, scale * LOG2E,
                      *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o),
                      BM=plan.BM, BN=plan.BN, BD=plan.BD, PREC=_precision(q.dtype),
                      num_warps=plan.num_warps, num_stages=plan.num_stages)
    return o, lse


def _delta(o, do, plan: Plan) -> torch.Tensor:
    """rowsum(dO * OUT) [B, H, T] in fp32."""
    batch, seqlen, heads, dim = o.shape
    delta = new_output((batch, heads, seqlen), torch.float32, o.device)
    bt = max(1, min(64, 8192 // plan.BD))
    _delta_kernel[(triton.cdiv(seqlen, bt), batch * heads)](o, do, delta, seqlen, heads, dim, *_strides3(o),
                                                             *_strides3(do), BT=bt, BD=plan.BD)
    return delta


def backward(do, q, k, v, starts, o, lse, window, scale, plan: Plan):
    """dq, dk, dv by the plan's backward mode ("split": the dQ kernel, which also writes delta, then the dK/dV
    kernel; "fused": the delta pass, then one kernel, dQ by fp32 atomics)."""
    batch, seqlen, heads, dim = q.shape
    do = last_dim_contiguous(do)
    fused = plan.bwd == "fused"
    if fused:
        delta = _delta(o, do, plan)
        # the atomics add into fp32 zeros; "split" writes every element of dq itself
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        delta = new_output((batch, heads, seqlen), torch.float32, q.device)
        dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    args = (q, k, v, starts, do, lse, delta)
    consts = (seqlen, heads, dim, window, scale * LOG2E, scale)
    strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do))
    common = dict(BD=plan.BD, PREC=_precision(q.dtype), num_stages=plan.bwd_stages)
    if not fused:
        _bwd_dq_kernel[(triton.cdiv(seqlen, plan.BMQ), batch * heads)](
            *args, dq, o, *consts, *strides, *_strides3(dq), *_strides3(o), BM=plan.BMQ, BN=plan.BNQ,
            num_warps=plan.dq_warps, **common)
    _bwd_dkdv_kernel[(triton.cdiv(seqlen, plan.BNB), batch * heads)](
        *args, dk, dv, dq, *consts, *strides, *_strides3(dk), *_strides3(dv), *_strides3(dq), ATOMIC_DQ=fused,
        BM=plan.BMB, BN=plan.BNB, num_warps=plan.bwd_warps, **common)
    return (dq.to(q.dtype) if fused else dq), dk, dv


def sliding_window_step_triton(q, k, v, k_cache, v_cache, pos, *, scale=None):
    """One decode token (arguments already validated); k_cache, v_cache updated in place."""
    batch, heads, dim = q.shape
    window = k_cache.shape[1]
    scale = dim**-0.5 if scale is None else float(scale)
    o = new_output(q.shape, q.dtype, q.device)
    _step_kernel[(batch * heads,)](q, k, v, k_cache, v_cache, pos, o, heads, dim, window, scale,
                                   q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                   *_strides3(k_cache), *_strides3(v_cache), o.stride(0), o.stride(1),
                                   BW=max(16, next_pow2(window)), BD=max(16, next_pow2(dim)), num_warps=4,
                                   **pdl_options(q.device, "mixer"))
    return o

