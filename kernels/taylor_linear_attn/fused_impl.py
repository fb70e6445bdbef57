"""Triton Taylor linear attention, fused form: one program per (row x head, value block) walks the chunks in
order with the whole state on chip, and each chunk's feature expansion is built once, as a tile.

This is the ThunderKittens structure of the Based kernel (the state in registers; per chunk a few large
products: phi(Q_c) S, phi(K_c)^T V_c and the intra-chunk scores) with what TK leaves out: the normalizer,
an fp32 state, document resets, initial/final state and any value head dim.

State pieces (the published feature layout, coefficients included, so a published state loads and stores
as it is): s0 [BV] (sum of v), s1 [FP, BV] (first-order rows, x / F^(1/4)), s2 [FP*FP, BV] (second-order rows
x_i x_j / sqrt(2F), row i*FP+j), and z0, z1 [FP], z2 [FP*FP] for the normalizer. F < FP pads with zero
features. The second-order feature tile of a chunk is the outer product x[:, :, None] * x[:, None, :]
reshaped to [BC, FP*FP]: built once per chunk, then used by one product each way.
The split forward (outer="split", the default; _fused_fwd_split_kernel) holds s2 as 2 or 4 row blocks, each a
loop-carried [FP*FP/NB, BV] tensor, and builds each block's feature tiles by products with 0/1 selectors, so
that at 64-token chunks every product is a Hopper wgmma and only one block's tiles are live at a time
(bench/triton_resources.py la-fwd prints what each configuration costs in registers, spills and smem).

Backward, in the same form: a forward-in-time pass rebuilds the state and gives dq; a reverse pass carries
the state's gradient dS and gives dk and dv. Nothing per chunk goes through HBM.
Documents (doc_ids): as the chunk-state kernels (triton_impl.py): a query reads the carried state only when
it is in the document of the token before the chunk, keys enter it only when they are in the chunk's last
document, and the state crosses a chunk only when that chunk has no document start.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._common import last_dim_contiguous, new_output, next_pow2
from .triton_impl import _chunk_docs, _mm, _precision, _strides3, final_state_grads, normalizer_grad


@triton.jit
def _selectors(FP: tl.constexpr):
    """0/1 matrices [FP, FP*FP] that pick the factors x_i and x_j of second-order column i*FP+j."""
    cols = tl.arange(0, FP * FP)
    rows = tl.arange(0, FP)
    return ((rows[:, None] == (cols // FP)[None, :]).to(tl.float32),
            (rows[:, None] == (cols % FP)[None, :]).to(tl.float32))


@triton.jit
def _outer(x, BC: tl.constexpr, FP: tl.constexpr, OUTER: tl.constexpr, SEL_PREC: tl.constexpr):
    """Second-order features of the rows of x [BC, FP] (fp32): [BC, FP*FP], column i*FP+j = x_i x_j.
    OUTER "reshape": a broadcast product reshaped; "select": the two factors gathered by products with 0/1
    matrices (exact: one nonzero term each), as the chunk-state kernels gather theirs."""
    if OUTER == "reshape":
        return tl.reshape(x[:, :, None] * x[:, None, :], (BC, FP * FP))
    else:
        sel_i, sel_j = _selectors(FP)
        return _mm(x, sel_i, SEL_PREC) * _mm(x, sel_j, SEL_PREC)


@triton.jit
def _outer_grad(d2, x, BC: tl.constexpr, FP: tl.constexpr, OUTER: tl.constexpr, SEL_PREC: tl.constexpr):
    """Chain rule of _outer: d2 [BC, FP*FP] -> dx [BC, FP] (x_i gets d_ij x_j + d_ji x_j)."""
    if OUTER == "reshape":
        d3 = tl.reshape(d2, (BC, FP, FP))
        return tl.sum(d3 * x[:, None, :], axis=2) + tl.sum(d3 * x[:, :, None], axis=1)
    else:
        sel_i, sel_j = _selectors(FP)
        xi = _mm(x, sel_i, SEL_PREC)
        xj = _mm(x, sel_j, SEL_PREC)
        return (_mm(d2 * xj, tl.trans(sel_i), SEL_PREC) + _mm(d2 * xi, tl.trans(sel_j), SEL_PREC))


@triton.jit
def _state_ptrs(BASE, ZBASE, offs_f, offs_r, offs_v, F: tl.constexpr, FP: tl.constexpr, DV):
    """Pointers and masks of one (row x head)'s published state [1+F+F*F, DV] and k_sum [1+F+F*F], split into
    the pieces 0 / first order [FP] / second order [FP*FP] (second-order row i*FP+j is published 1+F+i*F+j)."""
    ri = offs_r // FP
    rj = offs_r % FP
    row2 = 1 + F + ri * F + rj
    m1 = offs_f < F
    m2 = (ri < F) & (rj < F)
    mv = offs_v < DV
    p0 = BASE + offs_v
    p1 = BASE + (1 + offs_f)[:, None] * DV + offs_v[None, :]
    p2 = BASE + row2[:, None] * DV + offs_v[None, :]
    return p0, p1, p2, ZBASE + 1 + offs_f, ZBASE + row2, m1, m2, mv


@triton.jit
def _load_chunk(X, b_off, sxt, offs_t, offs_c, mask_t, nc):
    """A [BC, nc-wide] tile of one (row, head) of X (masked rows and columns are 0)."""
    return tl.load(X + b_off + offs_t[:, None] * sxt + offs_c[None, :], mask=mask_t[:, None] & (offs_c < nc)[None, :],
                   other=0.0)


@triton.jit
def _head_offsets(i_b, i_h, sqb, sqh, skb, skh, svb, svh):
    """Offsets of one (row, head) in Q, K and V ([B, T, H, D] with any strides)."""
    return (i_b.to(tl.int64) * sqb + i_h * sqh, i_b.to(tl.int64) * skb + i_h * skh,
            i_b.to(tl.int64) * svb + i_h * svh)


@triton.jit
def _chunk(Q, K, V, q_off, k_off, v_off, sqt, skt, svt, doc_ptr, t0, offs_f, offs_v, T, F, DV, BC: tl.constexpr):
    """The chunk of rows t0 .. t0+BC-1: its rows, their mask, q, k [BC, FP], v [BC, BV] and the document ids
    (each row's, the row before the chunk's, the chunk's last row's)."""
    offs_t = t0 + tl.arange(0, BC)
    mask_t = offs_t < T
    q = _load_chunk(Q, q_off, sqt, offs_t, offs_f, mask_t, F)
    k = _load_chunk(K, k_off, skt, offs_t, offs_f, mask_t, F)
    v = _load_chunk(V, v_off, svt, offs_t, offs_v, mask_t, DV)
    doc, doc_prev, doc_last = _chunk_docs(doc_ptr, t0, offs_t, mask_t, T, BC)
    return offs_t, mask_t, q, k, v, doc, doc_prev, doc_last


@triton.jit
def _intra_scores(q, k, offs_t, mask_t, doc, inv_sqrt_f, PREC: tl.constexpr):
    """x = q.k / sqrt(F) [BC, BC], the kept (causal, same-document) pairs and a = 1 + x + x^2/2 on them."""
    x = _mm(q, tl.trans(k), PREC) * inv_sqrt_f
    keep = (offs_t[:, None] >= offs_t[None, :]) & (doc[:, None] == doc[None, :]) & mask_t[None, :]
    return x, keep, tl.where(keep, 1.0 + x + 0.5 * x * x, 0.0)


@triton.jit
def _load_state(KV, KS, i_bh, offs_f, offs_r, offs_v, F: tl.constexpr, FP: tl.constexpr, DV, BV: tl.constexpr,
                HAS: tl.constexpr):
    """One (row x head)'s published state (kv, k_sum) as the pieces (s0, s1, s2, z0, z1, z2), zeros without HAS."""
    NF = 1 + F + F * F
    p0, p1, p2, pz1, pz2, m1, m2, mv = _state_ptrs(KV + i_bh.to(tl.int64) * NF * DV, KS + i_bh.to(tl.int64) * NF,
                                                   offs_f, offs_r, offs_v, F, FP, DV)
    if HAS:
        s0 = tl.load(p0, mask=mv, other=0.0)
        s1 = tl.load(p1, mask=m1[:, None] & mv[None, :], other=0.0)
        s2 = tl.load(p2, mask=m2[:, None] & mv[None, :], other=0.0)
        z0 = tl.load(KS + i_bh.to(tl.int64) * NF)
        z1 = tl.load(pz1, mask=m1, other=0.0)
        z2 = tl.load(pz2, mask=m2, other=0.0)
    else:
        s0 = tl.zeros([BV], dtype=tl.float32)
        s1 = tl.zeros([FP, BV], dtype=tl.float32)
        s2 = tl.zeros([FP * FP, BV], dtype=tl.float32)
        z1 = tl.zeros([FP], dtype=tl.float32)
        z0 = tl.sum(z1, axis=0)
        z2 = tl.zeros([FP * FP], dtype=tl.float32)
    return s0, s1, s2, z0, z1, z2


@triton.jit
def _store_state(KV, KS, i_bh, i_v, s0, s1, s2, z0, z1, z2, offs_f, offs_r, offs_v, F: tl.constexpr,
                 FP: tl.constexpr, DV):
    """The pieces back into the published layout; k_sum (the same in every value block) from block 0."""
    NF = 1 + F + F * F
    p0, p1, p2, pz1, pz2, m1, m2, mv = _state_ptrs(KV + i_bh.to(tl.int64) * NF * DV, KS + i_bh.to(tl.int64) * NF,
                                                   offs_f, offs_r, offs_v, F, FP, DV)
    tl.store(p0, s0, mask=mv)
    tl.store(p1, s1, mask=m1[:, None] & mv[None, :])
    tl.store(p2, s2, mask=m2[:, None] & mv[None, :])
    if i_v == 0:
        tl.store(KS + i_bh.to(tl.int64) * NF, z0)
        tl.store(pz1, z1, mask=m1)
        tl.store(pz2, z2, mask=m2)


@triton.jit
def _accumulate(s0, s1, s2, z0, z1, z2, x1, x2, y, zw, carry, PREC: tl.constexpr):
    """The state after a chunk: carry * state + phi(x)^T y, and the normalizer rows weighted by zw [BC].
    x1 [BC, FP], x2 [BC, FP*FP] are the chunk's first- and second-order feature tiles (rows that do not enter
    the state already zero); y [BC, BV] in the compute dtype. The forward passes (keys, values, zw = 1 on the
    keys that enter); the reverse pass of the backward (queries, dO / den, zw = the normalizer gradient)."""
    dt = y.dtype
    s2 = s2 * carry + _mm(tl.trans(x2.to(dt)), y, PREC)
    s1 = s1 * carry + _mm(tl.trans(x1.to(dt)), y, PREC)
    s0 = s0 * carry + tl.sum(y.to(tl.float32), axis=0)
    z2 = z2 * carry + tl.sum(x2 * zw[:, None], axis=0)
    z1 = z1 * carry + tl.sum(x1 * zw[:, None], axis=0)
    z0 = z0 * carry + tl.sum(zw, axis=0)
    return s0, s1, s2, z0, z1, z2


@triton.jit
def _fused_fwd_kernel(Q, K, V, DOC, OUT, DEN, KV0, KS0, KV1, KS1,
                      T, H, DV, NC, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                      eps, inv_sqrt_f, c1, c2,
                      F: tl.constexpr, FP: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr,
                      HAS_S0: tl.constexpr, STORE_END: tl.constexpr, PREC: tl.constexpr,
                      SEL_PREC: tl.constexpr, OUTER: tl.constexpr):
    """o and den of every chunk of one (row x head, value block), the state carried on chip."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_f = tl.arange(0, FP)
    offs_r = tl.arange(0, FP * FP)
    offs_v = i_v * BV + tl.arange(0, BV)
    mv = offs_v < DV
    s0, s1, s2, z0, z1, z2 = _load_state(KV0, KS0, i_bh, offs_f, offs_r, offs_v, F, FP, DV, BV, HAS_S0)
    q_off, k_off, v_off = _head_offsets(i_b, i_h, sqb, sqh, skb, skh, svb, svh)
    o_off = i_b.to(tl.int64) * sob + i_h * soh
    doc_ptr = DOC + i_b.to(tl.int64) * T
    dt = V.dtype.element_ty
    for c in range(NC):
        offs_t, mask_t, q, k, v, doc, doc_prev, doc_last = _chunk(Q, K, V, q_off, k_off, v_off, sqt, skt, svt,
                                                                  doc_ptr, c * BC, offs_f, offs_v, T, F, DV, BC)
        x, keep, sim = _intra_scores(q, k, offs_t, mask_t, doc, inv_sqrt_f, PREC)
        num = _mm(sim.to(dt), v, PREC)
        den = tl.sum(sim, axis=1)
        qf = q.to(tl.float32)
        q1 = qf * c1
        q2 = _outer(qf, BC, FP, OUTER, SEL_PREC) * c2
        num_s = _mm(q2.to(dt), s2.to(dt), PREC) + _mm(q1.to(dt), s1.to(dt), PREC) + s0[None, :]
        den_s = tl.sum(q2 * z2[None, :], axis=1) + tl.sum(q1 * z1[None, :], axis=1) + z0
        reads = doc == doc_prev
        num += tl.where(reads[:, None], num_s, 0.0)
        den += tl.where(reads, den_s, 0.0) + eps
        tl.store(OUT + o_off + offs_t[:, None] * sot + offs_v[None, :], (num / den[:, None]).to(OUT.dtype.element_ty),
                 mask=mask_t[:, None] & mv[None, :])
        if i_v == 0:
            tl.store(DEN + i_bh.to(tl.int64) * T + offs_t, den, mask=mask_t)
        writes = mask_t & (doc == doc_last)
        carry = (doc_last == doc_prev).to(tl.float32)
        kf = tl.where(writes[:, None], k.to(tl.float32), 0.0)
        s0, s1, s2, z0, z1, z2 = _accumulate(s0, s1, s2, z0, z1, z2, kf * c1, _outer(kf, BC, FP, OUTER, SEL_PREC) * c2,
                                             tl.where(writes[:, None], v, 0.0), writes.to(tl.float32), carry, PREC)
    if STORE_END:
        _store_state(KV1, KS1, i_bh, i_v, s0, s1, s2, z0, z1, z2, offs_f, offs_r, offs_v, F, FP, DV)


@triton.jit
def _block_selectors(b, R: tl.constexpr, FP: tl.constexpr, dtype: tl.constexpr):
    """0/1 matrices [FP, R] that pick the factors x_i, x_j of second-order rows b*R .. b*R+R-1 (row i*FP+j)."""
    r = b * R + tl.arange(0, R)
    rows = tl.arange(0, FP)
    # through fp32: the interpreter turns a bool into bf16 bits wrongly
    return ((rows[:, None] == (r // FP)[None, :]).to(tl.float32).to(dtype),
            (rows[:, None] == (r % FP)[None, :]).to(tl.float32).to(dtype))


@triton.jit
def _split_block(s2b, q_r, k_w, v_w, num, b, carry, c2, R: tl.constexpr, FP: tl.constexpr,
                 PREC: tl.constexpr, SEL_PREC: tl.constexpr):
    """One row block (rows b*R ..) of the second-order state [R, BV]: its readout by the chunk's queries q_r
    [BC, FP] (zero on rows that do not read the state) is added to num [BC, BV], then the keys k_w [BC, FP] and values v_w [BC, BV] (zero where they do not write) update it. Both feature
    tiles come from products with 0/1 selectors (exact), so they stay in the tensor cores' accumulator layout:
    the queries' [BC, R] feeds the readout as the A operand, the keys' is built transposed [R, BC] to feed
    the update (M = R rows) without a transpose of the tile."""
    dt = v_w.dtype
    sel_i, sel_j = _block_selectors(b, R, FP, q_r.dtype)
    q2 = _mm(q_r, sel_i, SEL_PREC) * _mm(q_r, sel_j, SEL_PREC) * c2
    num += _mm(q2.to(dt), s2b.to(dt), PREC)
    # (building it [BC, R] and transposing it through shared memory spills more: 400-1200 stack bytes)
    k_t = tl.trans(k_w)
    k2t = _mm(tl.trans(sel_i), k_t, SEL_PREC) * _mm(tl.trans(sel_j), k_t, SEL_PREC) * c2
    return s2b * carry + _mm(k2t.to(dt), v_w, PREC), num


@triton.jit
def _quad_form(x, zm, PREC: tl.constexpr, FP32_PREC: tl.constexpr):
    """x_t^T Z x_t per row of x [BC, FP] (16-bit or fp32) for the fp32 matrix Z [FP, FP]: the second-order
    normalizer sum_ij x_i x_j z_ij without the [BC, FP*FP] feature tile. Z enters the product as a 16-bit
    high part plus the 16-bit remainder (about fp32's accuracy: 2^-16 relative) for 16-bit x, at FP32_PREC
    (3xtf32 on the GPU) for fp32 x."""
    if x.dtype == tl.float32:
        w = _mm(x, tl.trans(zm), FP32_PREC)
    else:
        z_hi = zm.to(x.dtype)
        z_lo = (zm - z_hi.to(tl.float32)).to(x.dtype)
        w = _mm(x, tl.trans(z_hi), PREC) + _mm(x, tl.trans(z_lo), PREC)
    return tl.sum(x.to(tl.float32) * w, axis=1)


@triton.jit
def _load_s2_block(BASE, ZBASE, b, offs_v, F: tl.constexpr, FP: tl.constexpr, R: tl.constexpr, DV,
                   HAS_S0: tl.constexpr, BV: tl.constexpr):
    """Row block b of the initial second-order state (published layout) [R, BV]."""
    if HAS_S0:
        offs_f = tl.arange(0, FP)
        _, _, p2, _, _, _, m2, mv = _state_ptrs(BASE, ZBASE, offs_f, b * R + tl.arange(0, R), offs_v, F, FP, DV)
        return tl.load(p2, mask=m2[:, None] & mv[None, :], other=0.0)
    else:
        return tl.zeros([R, BV], dtype=tl.float32)


@triton.jit
def _store_s2_block(BASE, ZBASE, b, s2b, offs_v, F: tl.constexpr, FP: tl.constexpr, R: tl.constexpr, DV):
    offs_f = tl.arange(0, FP)
    _, _, p2, _, _, _, m2, mv = _state_ptrs(BASE, ZBASE, offs_f, b * R + tl.arange(0, R), offs_v, F, FP, DV)
    tl.store(p2, s2b, mask=m2[:, None] & mv[None, :])


@triton.jit
def _z2_ptrs(ZBASE, F: tl.constexpr, FP: tl.constexpr):
    """Pointers [FP, FP] and mask of the second-order k_sum (published rows 1+F+i*F+j) as a matrix."""
    i = tl.arange(0, FP)
    return ZBASE + 1 + F + i[:, None] * F + i[None, :], (i[:, None] < F) & (i[None, :] < F)


@triton.jit
def _fused_fwd_split_kernel(Q, K, V, DOC, OUT, DEN, KV0, KS0, KV1, KS1,
                            T, H, DV, NC, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                            eps, inv_sqrt_f, c1, c2,
                            F: tl.constexpr, FP: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr,
                            NB: tl.constexpr, HAS_S0: tl.constexpr, STORE_END: tl.constexpr, PREC: tl.constexpr,
                            SEL_PREC: tl.constexpr):
    """As _fused_fwd_kernel, with the second-order state split into NB (2 or 4) row blocks of R = FP*FP/NB
    rows, each its own loop-carried tensor: per chunk and block, one readout and one update product of
    moderate size, so only one block's feature tiles are live at a time. The second-order normalizer is kept
    as the [FP, FP] matrix Z (published k_sum rows 1+F+i*F+j) and read as q^T Z q: its per-block vectors,
    broadcast across the feature tiles, were what spilled (Triton 3.6, sm_90, 64-token chunks, 4 warps: value
    block 16 spill-free, 32: 256 stack bytes, 64: 680)."""
    R: tl.constexpr = FP * FP // NB
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_f = tl.arange(0, FP)
    offs_v = i_v * BV + tl.arange(0, BV)
    NF = 1 + F + F * F
    base0 = KV0 + i_bh.to(tl.int64) * NF * DV
    zbase0 = KS0 + i_bh.to(tl.int64) * NF
    p0, p1, _, pz1, _, m1, _, mv = _state_ptrs(base0, zbase0, offs_f, tl.arange(0, FP * FP), offs_v, F, FP, DV)
    if HAS_S0:
        s0 = tl.load(p0, mask=mv, other=0.0)
        s1 = tl.load(p1, mask=m1[:, None] & mv[None, :], other=0.0)
        z0 = tl.load(zbase0)
        z1 = tl.load(pz1, mask=m1, other=0.0)
        pzm, mzm = _z2_ptrs(zbase0, F, FP)
        zm = tl.load(pzm, mask=mzm, other=0.0)
    else:
        s0 = tl.zeros([BV], dtype=tl.float32)
        s1 = tl.zeros([FP, BV], dtype=tl.float32)
        z0 = 0.0
        z1 = tl.zeros([FP], dtype=tl.float32)
        zm = tl.zeros([FP, FP], dtype=tl.float32)
    s2a = _load_s2_block(base0, zbase0, 0, offs_v, F, FP, R, DV, HAS_S0, BV)
    s2b = _load_s2_block(base0, zbase0, 1, offs_v, F, FP, R, DV, HAS_S0, BV)
    s2c = _load_s2_block(base0, zbase0, 2 % NB, offs_v, F, FP, R, DV, HAS_S0, BV)
    s2d = _load_s2_block(base0, zbase0, 3 % NB, offs_v, F, FP, R, DV, HAS_S0, BV)
    q_off, k_off, v_off = _head_offsets(i_b, i_h, sqb, sqh, skb, skh, svb, svh)
    o_off = i_b.to(tl.int64) * sob + i_h * soh
    doc_ptr = DOC + i_b.to(tl.int64) * T
    dt = V.dtype.element_ty
    for c in range(NC):
        offs_t, mask_t, q, k, v, doc, doc_prev, doc_last = _chunk(Q, K, V, q_off, k_off, v_off, sqt, skt, svt,
                                                                  doc_ptr, c * BC, offs_f, offs_v, T, F, DV, BC)
        x, keep, sim = _intra_scores(q, k, offs_t, mask_t, doc, inv_sqrt_f, PREC)
        reads = doc == doc_prev
        writes = mask_t & (doc == doc_last)
        carry = (doc_last == doc_prev).to(tl.float32)
        q_r = tl.where(reads[:, None], q.to(tl.float32), 0.0).to(q.dtype)
        k_w = tl.where(writes[:, None], k.to(tl.float32), 0.0).to(k.dtype)
        v_w = tl.where(writes[:, None], v.to(tl.float32), 0.0).to(v.dtype)
        q1 = q_r.to(tl.float32) * c1
        num = _mm(sim.to(dt), v, PREC) + _mm(q1.to(dt), s1.to(dt), PREC)
        num += tl.where(reads[:, None], s0[None, :], 0.0)
        den = tl.sum(sim, axis=1) + tl.sum(q1 * z1[None, :], axis=1) + tl.where(reads, z0, 0.0) + eps
        den += _quad_form(q_r, zm, PREC, SEL_PREC) * c2
        s2a, num = _split_block(s2a, q_r, k_w, v_w, num, 0, carry, c2, R, FP, PREC, SEL_PREC)
        s2b, num = _split_block(s2b, q_r, k_w, v_w, num, 1, carry, c2, R, FP, PREC, SEL_PREC)
        if NB == 4:
            s2c, num = _split_block(s2c, q_r, k_w, v_w, num, 2, carry, c2, R, FP, PREC,
                                              SEL_PREC)
            s2d, num = _split_block(s2d, q_r, k_w, v_w, num, 3, carry, c2, R, FP, PREC,
                                              SEL_PREC)
        tl.store(OUT + o_off + offs_t[:, None] * sot + offs_v[None, :], (num / den[:, None]).to(OUT.dtype.element_ty),
                 mask=mask_t[:, None] & mv[None, :])
        if i_v == 0:
            tl.store(DEN + i_bh.to(tl.int64) * T + offs_t, den, mask=mask_t)
        k1 = k_w.to(tl.float32) * c1
        s1 = s1 * carry + _mm(tl.trans(k1.to(dt)), v_w, PREC)
        s0 = s0 * carry + tl.sum(v_w.to(tl.float32), axis=0)
        z1 = z1 * carry + tl.sum(k1, axis=0)
        z0 = z0 * carry + tl.sum(writes.to(tl.float32), axis=0)
        zm = zm * carry + _mm(tl.trans(k_w), k_w, SEL_PREC) * c2
    if STORE_END:
        base1 = KV1 + i_bh.to(tl.int64) * NF * DV
        zbase1 = KS1 + i_bh.to(tl.int64) * NF
        e0, e1, _, ez1, _, m1, _, mv = _state_ptrs(base1, zbase1, offs_f, tl.arange(0, FP * FP), offs_v, F, FP, DV)
        tl.store(e0, s0, mask=mv)
        tl.store(e1, s1, mask=m1[:, None] & mv[None, :])
        first_block = i_v == 0
        if first_block:
            tl.store(zbase1, z0)
            tl.store(ez1, z1, mask=m1)
            pzm, mzm = _z2_ptrs(zbase1, F, FP)
            tl.store(pzm, zm, mask=mzm)
        _store_s2_block(base1, zbase1, 0, s2a, offs_v, F, FP, R, DV)
        _store_s2_block(base1, zbase1, 1, s2b, offs_v, F, FP, R, DV)
        if NB == 4:
            _store_s2_block(base1, zbase1, 2, s2c, offs_v, F, FP, R, DV)
            _store_s2_block(base1, zbase1, 3, s2d, offs_v, F, FP, R, DV)


@triton.jit
def _bwd_intra(q, k, v, g, hh, offs_t, mask_t, doc, inv_sqrt_f, PREC: tl.constexpr):
    """Intra-chunk part of the backward: a = 1 + x + x^2/2 on the kept pairs and dL/dx (this value block's
    share; hh carries the normalizer gradient in value block 0 only)."""
    x, keep, a = _intra_scores(q, k, offs_t, mask_t, doc, inv_sqrt_f, PREC)
    da = _mm(g, tl.trans(v), PREC) + hh[:, None]
    return a, tl.where(keep, da * (1.0 + x), 0.0)


@triton.jit
def _load_g_hh(DO, DEN, HH, do_off, sdot, bh_t, offs_t, offs_v, mask_t, DV, i_v):
    """g = dO / den [BC, BV] (fp32) and the normalizer gradient hh [BC] (zero outside value block 0)."""
    do = _load_chunk(DO, do_off, sdot, offs_t, offs_v, mask_t, DV)
    den = tl.load(DEN + bh_t + offs_t, mask=mask_t, other=1.0)
    hh = tl.load(HH + bh_t + offs_t, mask=mask_t, other=0.0) * (i_v == 0).to(tl.float32)
    return do.to(tl.float32) / den[:, None], hh


@triton.jit
def _fused_bwd_dq_kernel(Q, K, V, DOC, DO, DEN, HH, KV0, KS0, DQ,
                         T, H, DV, NC, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
                         sdqv, sdqb, sdqt, sdqh, inv_sqrt_f, c1, c2,
                         F: tl.constexpr, FP: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr,
                         HAS_S0: tl.constexpr, PREC: tl.constexpr, SEL_PREC: tl.constexpr,
                         CHAIN_PREC: tl.constexpr, OUTER: tl.constexpr):
    """dq (this value block's part) of every chunk, rebuilding the state in time order as the forward does."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_f = tl.arange(0, FP)
    offs_r = tl.arange(0, FP * FP)
    offs_v = i_v * BV + tl.arange(0, BV)
    s0, s1, s2, z0, z1, z2 = _load_state(KV0, KS0, i_bh, offs_f, offs_r, offs_v, F, FP, DV, BV, HAS_S0)
    q_off, k_off, v_off = _head_offsets(i_b, i_h, sqb, sqh, skb, skh, svb, svh)
    do_off = i_b.to(tl.int64) * sdob + i_h * sdoh
    dq_ptr = DQ + i_v.to(tl.int64) * sdqv + i_b.to(tl.int64) * sdqb + i_h * sdqh
    doc_ptr = DOC + i_b.to(tl.int64) * T
    dt = V.dtype.element_ty
    for c in range(NC):
        offs_t, mask_t, q, k, v, doc, doc_prev, doc_last = _chunk(Q, K, V, q_off, k_off, v_off, sqt, skt, svt,
                                                                  doc_ptr, c * BC, offs_f, offs_v, T, F, DV, BC)
        g, hh = _load_g_hh(DO, DEN, HH, do_off, sdot, i_bh.to(tl.int64) * T, offs_t, offs_v, mask_t, DV, i_v)
        a, dx = _bwd_intra(q, k, v, g.to(dt), hh, offs_t, mask_t, doc, inv_sqrt_f, PREC)
        dq = _mm(dx.to(dt), k, PREC) * inv_sqrt_f
        reads = doc == doc_prev
        g_r = tl.where(reads[:, None], g, 0.0).to(dt)
        h_r = tl.where(reads, hh, 0.0)
        dphi2 = _mm(g_r, tl.trans(s2.to(dt)), PREC) + h_r[:, None] * z2[None, :]
        dphi1 = _mm(g_r, tl.trans(s1.to(dt)), PREC) + h_r[:, None] * z1[None, :]
        dq += c1 * dphi1 + c2 * _outer_grad(dphi2, q.to(tl.float32), BC, FP, OUTER, CHAIN_PREC)
        tl.store(dq_ptr + offs_t[:, None] * sdqt + offs_f[None, :], dq, mask=mask_t[:, None] & (offs_f < F)[None, :])
        writes = mask_t & (doc == doc_last)
        carry = (doc_last == doc_prev).to(tl.float32)
        kf = tl.where(writes[:, None], k.to(tl.float32), 0.0)
        s0, s1, s2, z0, z1, z2 = _accumulate(s0, s1, s2, z0, z1, z2, kf * c1, _outer(kf, BC, FP, OUTER, SEL_PREC) * c2,
                                             tl.where(writes[:, None], v, 0.0), writes.to(tl.float32), carry, PREC)


@triton.jit
def _fused_bwd_dkv_kernel(Q, K, V, DOC, DO, DEN, HH, DKV1, DKS1, DKV0, DKS0, DK, DVAL,
                          T, H, DV, NC, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
                          sdqv, sdqb, sdqt, sdqh, sdvb, sdvt, sdvh, inv_sqrt_f, c1, c2,
                          F: tl.constexpr, FP: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr,
                          HAS_DS_END: tl.constexpr, STORE_DS0: tl.constexpr, PREC: tl.constexpr,
                          SEL_PREC: tl.constexpr, CHAIN_PREC: tl.constexpr, OUTER: tl.constexpr):
    """dk (this value block's part) and dv of every chunk in reverse order, carrying dS (the gradient of the
    state after the chunk: phi(q)^T g of the later queries that read it) on chip."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_f = tl.arange(0, FP)
    offs_r = tl.arange(0, FP * FP)
    offs_v = i_v * BV + tl.arange(0, BV)
    mv = offs_v < DV
    d0, d1, d2, dz0, dz1, dz2 = _load_state(DKV1, DKS1, i_bh, offs_f, offs_r, offs_v, F, FP, DV, BV, HAS_DS_END)
    # the normalizer's gradient enters once, through value block 0
    first_block = (i_v == 0).to(tl.float32)
    dz0, dz1, dz2 = dz0 * first_block, dz1 * first_block, dz2 * first_block
    q_off, k_off, v_off = _head_offsets(i_b, i_h, sqb, sqh, skb, skh, svb, svh)
    do_off = i_b.to(tl.int64) * sdob + i_h * sdoh
    dk_ptr = DK + i_v.to(tl.int64) * sdqv + i_b.to(tl.int64) * sdqb + i_h * sdqh
    dv_ptr = DVAL + i_b.to(tl.int64) * sdvb + i_h * sdvh
    doc_ptr = DOC + i_b.to(tl.int64) * T
    dt = V.dtype.element_ty
    for i in range(NC):
        offs_t, mask_t, q, k, v, doc, doc_prev, doc_last = _chunk(Q, K, V, q_off, k_off, v_off, sqt, skt, svt,
                                                                  doc_ptr, (NC - 1 - i) * BC, offs_f, offs_v, T, F,
                                                                  DV, BC)
        g, hh = _load_g_hh(DO, DEN, HH, do_off, sdot, i_bh.to(tl.int64) * T, offs_t, offs_v, mask_t, DV, i_v)
        a, dx = _bwd_intra(q, k, v, g.to(dt), hh, offs_t, mask_t, doc, inv_sqrt_f, PREC)
        dval = _mm(tl.trans(a.to(dt)), g.to(dt), PREC)
        dk = _mm(tl.trans(dx.to(dt)), q, PREC) * inv_sqrt_f
        writes = mask_t & (doc == doc_last)
        kf = tl.where(writes[:, None], k.to(tl.float32), 0.0)
        k1 = kf * c1
        k2 = _outer(kf, BC, FP, OUTER, SEL_PREC) * c2
        dval += _mm(k2.to(dt), d2.to(dt), PREC) + _mm(k1.to(dt), d1.to(dt), PREC) + tl.where(writes[:, None], d0[None, :], 0.0)
        v_w = tl.where(writes[:, None], v, 0.0)
        dphi2 = tl.where(writes[:, None], _mm(v_w, tl.trans(d2.to(dt)), PREC) + dz2[None, :], 0.0)
        dphi1 = tl.where(writes[:, None], _mm(v_w, tl.trans(d1.to(dt)), PREC) + dz1[None, :], 0.0)
        dk += c1 * dphi1 + c2 * _outer_grad(dphi2, kf, BC, FP, OUTER, CHAIN_PREC)
        tl.store(dk_ptr + offs_t[:, None] * sdqt + offs_f[None, :], dk, mask=mask_t[:, None] & (offs_f < F)[None, :])
        tl.store(dv_ptr + offs_t[:, None] * sdvt + offs_v[None, :], dval.to(DVAL.dtype.element_ty),
                 mask=mask_t[:, None] & mv[None, :])
        reads = mask_t & (doc == doc_prev)
        carry = (doc_last == doc_prev).to(tl.float32)
        qf = tl.where(reads[:, None], q.to(tl.float32), 0.0)
        d0, d1, d2, dz0, dz1, dz2 = _accumulate(d0, d1, d2, dz0, dz1, dz2, qf * c1,
                                                _outer(qf, BC, FP, OUTER, SEL_PREC) * c2,
                                                tl.where(reads[:, None], g, 0.0).to(dt), tl.where(reads, hh, 0.0),
                                                carry, PREC)
    if STORE_DS0:
        _store_state(DKV0, DKS0, i_bh, i_v, d0, d1, d2, dz0, dz1, dz2, offs_f, offs_r, offs_v, F, FP, DV)


# ----------------------------------------------------------------------------------------------------------
# host side


class FusedPlan:
    """Block sizes of one call: chunks BC (forward) and BCB (backward), value blocks BV (forward) and BVB
    (backward), warps per kernel."""

    def __init__(self, seqlen: int, feature_dim: int, value_dim: int, chunk_size: int | None = None,
                 block_v: int | None = None, block_v_bwd: int | None = None, num_warps: int | None = None,
                 bwd_warps: int | None = None, num_stages: int | None = None,
                 chunk_size_bwd: int | None = None, outer: str = "split", row_blocks: int = 4,
                 outer_bwd: str | None = None) -> None:
        if outer not in ("select", "reshape", "split"):
            raise ValueError(f"taylor_linear_attention: outer={outer!r}; expected 'select', 'reshape' or 'split'")
        if row_blocks not in (2, 4):
            raise ValueError(f"taylor_linear_attention: row_blocks={row_blocks}; expected 2 or 4")
        outer_bwd = outer_bwd or (outer if outer != "split" else "select")
        if outer_bwd not in ("select", "reshape"):
            raise ValueError(f"taylor_linear_attention: outer_bwd={outer_bwd!r}; expected 'select' or 'reshape'")
        self.outer = outer
        self.outer_bwd = outer_bwd
        self.row_blocks = row_blocks
        self.F = feature_dim
        self.FP = max(16, next_pow2(feature_dim))
        self.NF = 1 + feature_dim + feature_dim * feature_dim
        self.BC = chunk_size or 64
        # split: 32-wide value blocks and 4 warps (the least spilling of its 64-token configurations, 512
        # programs at B*H 256, Dv 64); the whole-tile builds keep their earlier defaults
        split = outer == "split"
        self.BV = block_v or min(32 if split else 64, max(16, next_pow2(value_dim)))
        self.BVB = block_v_bwd or min(32, max(16, next_pow2(value_dim)))
        self.NV = triton.cdiv(value_dim, self.BV)
        self.NVB = triton.cdiv(value_dim, self.BVB)
        self.BCB = chunk_size_bwd or self.BC
        self.NC = max(1, triton.cdiv(seqlen, self.BC))
        self.NCB = max(1, triton.cdiv(seqlen, self.BCB))
        self.num_warps = num_warps or (4 if split else 8)
        self.bwd_warps = bwd_warps or 8
        self.inv_sqrt_f = 1.0 / math.sqrt(feature_dim)
        self.c1 = feature_dim**-0.25
        self.c2 = 1.0 / math.sqrt(2.0 * feature_dim)
        # split: no software pipelining by default (num_stages 3 spills 416 stack bytes where 1 spills 256)
        num_stages = num_stages or (1 if split else None)
        self.stages = {} if num_stages is None else {"num_stages": num_stages}


def fused_forward(q, k, v, docs, eps, kv0, ks0, output_final_state: bool, plan: FusedPlan):
    """Returns o [B, T, H, Dv], den [B, H, T] (fp32) and the final state (published layout, fp32) or None."""
    batch, seqlen, heads, _ = q.shape
    dv = v.shape[-1]
    bh = batch * heads
    o = new_output((batch, seqlen, heads, dv), v.dtype, v.device)
    den = new_output((batch, heads, seqlen), torch.float32, v.device)
    final = None
    if output_final_state:
        final = (new_output((batch, heads, plan.NF, dv), torch.float32, v.device),
                 new_output((batch, heads, plan.NF), torch.float32, v.device))
    s0 = (kv0.float().contiguous(), ks0.float().contiguous()) if kv0 is not None else (den, den)
    s1 = final if final is not None else (den, den)
    kernel, consts = forward_kernel(plan, _precision(v.dtype), kv0 is not None, final is not None)
    kernel[(plan.NV, bh)](
        q, k, v, docs, o, den, *s0, *s1, seqlen, heads, dv, plan.NC, *_strides3(q), *_strides3(k), *_strides3(v),
        *_strides3(o), eps, plan.inv_sqrt_f, plan.c1, plan.c2, **consts)
    return o, den, final


def forward_kernel(plan: FusedPlan, prec: dict, has_s0: bool, store_end: bool):
    """The forward kernel of a plan and its compile-time arguments (num_warps / num_stages included); also
    what bench/triton_resources.py compiles."""
    consts = dict(F=plan.F, FP=plan.FP, BC=plan.BC, BV=plan.BV, HAS_S0=has_s0, STORE_END=store_end,
                  PREC=prec["PREC"], SEL_PREC=prec["SEL_PREC"], num_warps=plan.num_warps, **plan.stages)
    if plan.outer == "split":
        return _fused_fwd_split_kernel, dict(consts, NB=plan.row_blocks)
    return _fused_fwd_kernel, dict(consts, OUTER=plan.outer)


def fused_backward(do, q, k, v, docs, o, den, kv0, ks0, d_final, need_d_initial: bool, plan: FusedPlan):
    """Returns dq, dk, dv and the gradient of the initial state (published layout, fp32) or None."""
    batch, seqlen, heads, f = q.shape
    dv_dim = v.shape[-1]
    bh = batch * heads
    do = last_dim_contiguous(do)
    hh = normalizer_grad(o, do, den)
    dq_part = new_output((plan.NVB, batch, seqlen, heads, f), torch.float32, v.device)
    dk_part = new_output((plan.NVB, batch, seqlen, heads, f), torch.float32, v.device)
    dval = new_output(v.shape, v.dtype, v.device)
    d_init = None
    if need_d_initial:
        d_init = (new_output((batch, heads, plan.NF, dv_dim), torch.float32, v.device),
                  new_output((batch, heads, plan.NF), torch.float32, v.device))
    prec = _precision(v.dtype)
    common = (seqlen, heads, dv_dim, plan.NCB, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do),
              *dq_part.stride()[:4])
    consts = dict(F=plan.F, FP=plan.FP, BC=plan.BCB, BV=plan.BVB, **prec, OUTER=plan.outer_bwd, num_warps=plan.bwd_warps,
                  **plan.stages)
    s0 = (kv0.float().contiguous(), ks0.float().contiguous()) if kv0 is not None else (den, den)
    _fused_bwd_dq_kernel[(plan.NVB, bh)](q, k, v, docs, do, den, hh, *s0, dq_part, *common, plan.inv_sqrt_f,
                                         plan.c1, plan.c2, HAS_S0=kv0 is not None, **consts)
    ds1 = (d_final[0].float().contiguous(), d_final[1].float().contiguous()) if d_final is not None else (den, den)
    ds0 = d_init if d_init is not None else (den, den)
    _fused_bwd_dkv_kernel[(plan.NVB, bh)](q, k, v, docs, do, den, hh, *ds1, *ds0, dk_part, dval, *common,
                                          *_strides3(dval), plan.inv_sqrt_f, plan.c1, plan.c2,
                                          HAS_DS_END=d_final is not None, STORE_DS0=d_init is not None, **consts)
    dq = dq_part.sum(0) if plan.NVB > 1 else dq_part[0]
    dk = dk_part.sum(0) if plan.NVB > 1 else dk_part[0]
    return dq.to(q.dtype), dk.to(k.dtype), dval, d_init


class FusedTaylorLinearAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, docs, kv0, ks0, eps, output_final_state, plan):
        o, den, final = fused_forward(q, k, v, docs, eps, kv0, ks0, output_final_state, plan)
        ctx.save_for_backward(q, k, v, docs, o, den, kv0, ks0)
        ctx.plan = plan
        if final is None:
            return o, None, None
        return o, final[0], final[1]

    @staticmethod
    def backward(ctx, do, d_kv, d_ks):
        q, k, v, docs, o, den, kv0, ks0 = ctx.saved_tensors
        plan = ctx.plan
        d_final = final_state_grads(d_kv, d_ks, q, v, plan.NF)
        need_d_init = kv0 is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
        dq, dk, dv, d_init = fused_backward(do, q, k, v, docs, o, den, kv0, ks0, d_final, need_d_init, plan)
        d_kv0, d_ks0 = d_init if d_init is not None else (None, None)
        return dq, dk, dv, None, d_kv0, d_ks0, None, None, None


def taylor_linear_attention_fused(q, k, v, *, eps=1e-12, doc_ids=None, initial_state=None,
                                  output_final_state=False, chunk_size=None, block_v=None, block_v_bwd=None,
                                  num_warps=None, bwd_warps=None, num_stages=None, chunk_size_bwd=None,
                                  outer="split", row_blocks=4, outer_bwd=None):
    """Fused Triton path of `taylor_linear_attention` (arguments already validated); block sizes tunable.
    outer: how the forward builds the second-order features ("select", "reshape": the whole [BC, FP*FP] tile;
    "split": the state in `row_blocks` row blocks, each with its own tiles); outer_bwd: the backward's
    ("select" or "reshape"; by default outer, or "select" after a split forward)."""
    batch, seqlen, heads, f = q.shape
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    if doc_ids is None:
        docs = torch.zeros(batch, seqlen, dtype=torch.int32, device=q.device)
    else:
        docs = doc_ids.contiguous()
    plan = FusedPlan(seqlen, f, v.shape[-1], chunk_size, block_v, block_v_bwd, num_warps, bwd_warps, num_stages,
                     chunk_size_bwd, outer, row_blocks, outer_bwd)
    kv0 = ks0 = None
    if initial_state is not None:
        kv0, ks0 = initial_state
    o, kv, ks = FusedTaylorLinearAttentionFn.apply(q, k, v, docs, kv0, ks0, eps, output_final_state, plan)
    if output_final_state:
        return o, (kv, ks)
    return o
