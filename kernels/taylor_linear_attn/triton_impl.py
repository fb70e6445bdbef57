"""Triton Taylor linear attention: chunk states in HBM, parallel chunk kernels, and a decode step.

Algorithm (per batch row and head; chunks of BC tokens; the state rows are the symmetric form of the
published features (1 + F + F(F+1)/2 rows, see Layout), padded to NP rows and handled in blocks of BF rows;
value columns in blocks of BV):
- state pass (forward): for each chunk c in order, write S_c (the state before chunk c: S = sum
  phi(k_s) v_s^T and z = sum phi(k_s) over the keys before the chunk, in the current document) to HBM, then
  S += phi(K_c)^T V_c. One program per (feature block, value block, row x head): its slice of the state is
  [BF, BV] fp32 in registers (nothing spills), and the programs run in parallel.
- output (forward): one program per (chunk, value block, row x head), all in parallel: the intra-chunk
  part (1 + s + s^2/2 on the BC x BC scores of the raw q, k) plus phi(q) S_c read block by block.
- backward: the normalizer gradient h = -(dO . o) / den; a reverse state pass writes dS_c (the gradient
  of the state after chunk c: sum phi(q_t) g_t^T over later queries, g = dO / den); one parallel kernel per
  chunk then gives dq (intra + S_c, one kernel) and dk, dv (intra + dS_c, another).
- documents (doc_ids): the state resets where doc_ids changes. A query reads S_c only when it is in the
  document of the token before the chunk; keys enter the state only when they are in the chunk's last
  document; the state crosses a chunk only when that chunk has no document start.
- phi is built from small tables (for each feature row p: the indices i, j of the two factors of x_i x_j,
  -1 meaning the factor 1, and a coefficient): a feature block gathers the factor columns of the q or k tile
  by two small products with 0/1 selection matrices (exact, on the tensor cores), and the chain rule back to
  q, k is two small products with the same matrices transposed.
States are kept in bf16 for bf16 inputs (the tensor cores read them as they are), fp32 otherwise.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .._common import interpreting, last_dim_contiguous, new_output, next_pow2
from .._pdl import pdl_options, release
from .ops import taylor_linear_attention_triton  # noqa: F401  (re-exported: bench/, tests)
from .plan import Plan, state_dtype


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """tl.dot with fp32 accumulation; "emulate" multiplies bf16-rounded operands in fp32 (the interpreter's
    bf16 dot is broken in triton 3.9: it multiplies the raw uint16 bit patterns)."""
    if PREC == "emulate":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _feature_block(IDX_I, IDX_J, COEF, p0, BF: tl.constexpr, FP: tl.constexpr):
    """Feature rows p0 .. p0+BF-1: 0/1 selection matrices [FP, BF] of their factors x_i, x_j, whether each
    factor is present (else it is 1), and the coefficients."""
    offs_p = p0 + tl.arange(0, BF)
    ii = tl.load(IDX_I + offs_p)
    jj = tl.load(IDX_J + offs_p)
    coef = tl.load(COEF + offs_p)
    cols = tl.arange(0, FP)
    return cols[:, None] == ii[None, :], cols[:, None] == jj[None, :], ii >= 0, jj >= 0, coef


@triton.jit
def _features(x, sel_i, sel_j, has_i, has_j, coef, SEL_PREC: tl.constexpr):
    """phi of the rows of one feature block for the tokens of x [BT, FP]: [BT, BF] fp32, and its two factors.
    The factors are gathered by products with the 0/1 selection matrices (exact: one nonzero term each)."""
    if SEL_PREC == "emulate":
        xi = tl.dot(x.to(tl.float32), sel_i.to(tl.float32), input_precision="ieee")
        xj = tl.dot(x.to(tl.float32), sel_j.to(tl.float32), input_precision="ieee")
    else:
        xi = tl.dot(x, sel_i.to(x.dtype), input_precision=SEL_PREC)
        xj = tl.dot(x, sel_j.to(x.dtype), input_precision=SEL_PREC)
    xi = tl.where(has_i[None, :], xi, 1.0)
    xj = tl.where(has_j[None, :], xj, 1.0)
    return xi * xj * coef[None, :], xi, xj


@triton.jit
def _features_grad(dphi, xi, xj, sel_i, sel_j, coef, CHAIN_PREC: tl.constexpr):
    """Chain rule of _features: dphi [BT, BF] -> d x [BT, FP] (x_i gets dphi c x_j, x_j gets dphi c x_i)."""
    dphi = dphi * coef[None, :]
    return (tl.dot(dphi * xj, tl.trans(sel_i.to(tl.float32)), input_precision=CHAIN_PREC)
            + tl.dot(dphi * xi, tl.trans(sel_j.to(tl.float32)), input_precision=CHAIN_PREC))


@triton.jit
def _chunk_docs(doc_ptr, t0, offs_t, mask_t, T, BC: tl.constexpr):
    """doc ids of the chunk, of the token before it (its own first token for chunk 0), and of its last."""
    doc = tl.load(doc_ptr + offs_t, mask=mask_t, other=0)
    doc_prev = tl.load(doc_ptr + tl.maximum(t0 - 1, 0))
    doc_last = tl.load(doc_ptr + tl.minimum(t0 + BC, T) - 1)
    return doc, doc_prev, doc_last


@triton.jit
def _state_pass_kernel(X, Y, DOC, DEN, HH, S0, Z0, STATES, ZST, S_END, Z_END, IDX_I, IDX_J, COEF,
                       T, H, DV, NC, sxb, sxt, sxh, syb, syt, syh,
                       F: tl.constexpr, FP: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr, BF: tl.constexpr,
                       BV: tl.constexpr, REVERSE: tl.constexpr, HAS_S0: tl.constexpr, STORE_END: tl.constexpr,
                       PREC: tl.constexpr, SEL_PREC: tl.constexpr):
    """Forward (REVERSE=False; X=k, Y=v): STATES[c] = state before chunk c; S_END = state after the last.
    Reverse (X=q, Y=dO): STATES[c] = gradient of the state after chunk c, from the queries of later chunks
    (g = dO / den, and HH for the normalizer); S0 = gradient of the final state; S_END = of the initial."""
    i_g = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh % H
    p0 = i_g * BF
    offs_p = p0 + tl.arange(0, BF)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < DV
    x_ptr = X + i_b.to(tl.int64) * sxb + i_h * sxh
    y_ptr = Y + i_b.to(tl.int64) * syb + i_h * syh
    doc_ptr = DOC + i_b.to(tl.int64) * T
    st_ptr = STATES + i_bh.to(tl.int64) * NC * NP * DV + offs_p[:, None] * DV + offs_v[None, :]
    z_ptr = ZST + i_bh.to(tl.int64) * NC * NP + offs_p
    op_dt = STATES.dtype.element_ty
    offs_f = tl.arange(0, FP)
    sel_i, sel_j, has_i, has_j, coef = _feature_block(IDX_I, IDX_J, COEF, p0, BF, FP)
    if HAS_S0:
        s = tl.load(S0 + i_bh.to(tl.int64) * NP * DV + offs_p[:, None] * DV + offs_v[None, :], mask=mask_v[None, :],
                    other=0.0)
        z = tl.load(Z0 + i_bh.to(tl.int64) * NP + offs_p)
    else:
        s = tl.zeros([BF, BV], dtype=tl.float32)
        z = tl.zeros([BF], dtype=tl.float32)
    for i in range(NC):
        if REVERSE:
            c = NC - 1 - i
        else:
            c = i
        t0 = c * BC
        offs_t = t0 + tl.arange(0, BC)
        mask_t = offs_t < T
        tl.store(st_ptr + c * NP * DV, s.to(op_dt), mask=mask_v[None, :])
        if i_v == 0:
            tl.store(z_ptr + c * NP, z)
        doc, doc_prev, doc_last = _chunk_docs(doc_ptr, t0, offs_t, mask_t, T, BC)
        carry = (doc_last == doc_prev).to(tl.float32)
        x = tl.load(x_ptr + offs_t[:, None] * sxt + offs_f[None, :], mask=mask_t[:, None] & (offs_f < F)[None, :],
                    other=0.0)
        phi, xi, xj = _features(x, sel_i, sel_j, has_i, has_j, coef, SEL_PREC)
        y = tl.load(y_ptr + offs_t[:, None] * syt + offs_v[None, :], mask=mask_t[:, None] & mask_v[None, :],
                    other=0.0)
        if REVERSE:
            sel = mask_t & (doc == doc_prev)
            den = tl.load(DEN + i_bh.to(tl.int64) * T + offs_t, mask=mask_t, other=1.0)
            hh = tl.load(HH + i_bh.to(tl.int64) * T + offs_t, mask=mask_t, other=0.0)
            y = y.to(tl.float32) / den[:, None]
            zw = tl.where(sel, hh, 0.0)
        else:
            sel = mask_t & (doc == doc_last)
            zw = sel.to(tl.float32)
        phi_sel = tl.where(sel[:, None], phi, 0.0)
        s = s * carry + _mm(tl.trans(phi_sel).to(op_dt), y.to(op_dt), PREC)
        z = z * carry + tl.sum(phi * zw[:, None], axis=0)
    if STORE_END:
        tl.store(S_END + i_bh.to(tl.int64) * NP * DV + offs_p[:, None] * DV + offs_v[None, :], s,
                 mask=mask_v[None, :])
        if i_v == 0:
            tl.store(Z_END + i_bh.to(tl.int64) * NP + offs_p, z)


@triton.jit
def _intra_scores(q, k, offs_t, mask_t, doc, inv_sqrt_f, PREC: tl.constexpr):
    """x = q k^T / sqrt(F) [BC, BC] and the causal same-document mask of one chunk."""
    x = _mm(q, tl.trans(k), PREC) * inv_sqrt_f
    keep = (offs_t[:, None] >= offs_t[None, :]) & (doc[:, None] == doc[None, :]) & mask_t[None, :]
    return x, keep


@triton.jit
def _fwd_kernel(Q, K, V, DOC, OUT, DEN, STATES, ZST, IDX_I, IDX_J, COEF,
                T, H, DV, NC, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                eps, inv_sqrt_f,
                F: tl.constexpr, FP: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr, BF: tl.constexpr,
                BV: tl.constexpr, PREC: tl.constexpr, SEL_PREC: tl.constexpr):
    """Output of one chunk and value block: intra-chunk part plus phi(q) S_c, normalized."""
    i_c = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh % H
    t0 = i_c * BC
    offs_t = t0 + tl.arange(0, BC)
    mask_t = offs_t < T
    offs_f = tl.arange(0, FP)
    mask_qk = mask_t[:, None] & (offs_f < F)[None, :]
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < DV
    q_ptr = Q + i_b.to(tl.int64) * sqb + i_h * sqh
    k_ptr = K + i_b.to(tl.int64) * skb + i_h * skh
    v_ptr = V + i_b.to(tl.int64) * svb + i_h * svh
    doc_ptr = DOC + i_b.to(tl.int64) * T
    op_dt = STATES.dtype.element_ty
    dt = V.dtype.element_ty
    q = tl.load(q_ptr + offs_t[:, None] * sqt + offs_f[None, :], mask=mask_qk, other=0.0)
    k = tl.load(k_ptr + offs_t[:, None] * skt + offs_f[None, :], mask=mask_qk, other=0.0)
    v = tl.load(v_ptr + offs_t[:, None] * svt + offs_v[None, :], mask=mask_t[:, None] & mask_v[None, :], other=0.0)
    doc, doc_prev, doc_last = _chunk_docs(doc_ptr, t0, offs_t, mask_t, T, BC)
    x, keep = _intra_scores(q, k, offs_t, mask_t, doc, inv_sqrt_f, PREC)
    sim = tl.where(keep, 1.0 + x + 0.5 * x * x, 0.0)
    num = _mm(sim.to(dt), v, PREC)
    den = tl.sum(sim, axis=1)

    st_ptr = STATES + (i_bh.to(tl.int64) * NC + i_c) * NP * DV
    z_ptr = ZST + (i_bh.to(tl.int64) * NC + i_c) * NP
    num_s = tl.zeros([BC, BV], dtype=tl.float32)
    den_s = tl.zeros([BC], dtype=tl.float32)
    for p0 in range(0, NP, BF):
        offs_p = p0 + tl.arange(0, BF)
        sel_i, sel_j, has_i, has_j, coef = _feature_block(IDX_I, IDX_J, COEF, p0, BF, FP)
        phi, xi, xj = _features(q, sel_i, sel_j, has_i, has_j, coef, SEL_PREC)
        s = tl.load(st_ptr + offs_p[:, None] * DV + offs_v[None, :], mask=mask_v[None, :], other=0.0)
        num_s += _mm(phi.to(op_dt), s, PREC)
        den_s += tl.sum(phi * tl.load(z_ptr + offs_p)[None, :], axis=1)
    reads = doc == doc_prev
    num += tl.where(reads[:, None], num_s, 0.0)
    den += tl.where(reads, den_s, 0.0) + eps
    o = num / den[:, None]
    o_ptr = OUT + i_b.to(tl.int64) * sob + i_h * soh
    tl.store(o_ptr + offs_t[:, None] * sot + offs_v[None, :], o.to(OUT.dtype.element_ty),
             mask=mask_t[:, None] & mask_v[None, :])
    if i_v == 0:
        tl.store(DEN + i_bh.to(tl.int64) * T + offs_t, den, mask=mask_t)


@triton.jit
def _bwd_chunk(Q, K, V, DOC, DO, DEN, HH, i_c, i_v, i_bh, T, H, DV,
               sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, inv_sqrt_f,
               F: tl.constexpr, FP: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """What both backward kernels load and recompute for one chunk and value block: q, k, v, g = dO / den,
    the normalizer gradient h (value block 0 only), the document masks, and the intra-chunk
    a = 1 + x + x^2/2 and dL/dx (this value block's part)."""
    i_b = i_bh // H
    i_h = i_bh % H
    t0 = i_c * BC
    offs_t = t0 + tl.arange(0, BC)
    mask_t = offs_t < T
    offs_f = tl.arange(0, FP)
    mask_qk = mask_t[:, None] & (offs_f < F)[None, :]
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_tv = mask_t[:, None] & (offs_v < DV)[None, :]
    dt = V.dtype.element_ty
    q = tl.load(Q + i_b.to(tl.int64) * sqb + i_h * sqh + offs_t[:, None] * sqt + offs_f[None, :], mask=mask_qk,
                other=0.0)
    k = tl.load(K + i_b.to(tl.int64) * skb + i_h * skh + offs_t[:, None] * skt + offs_f[None, :], mask=mask_qk,
                other=0.0)
    v = tl.load(V + i_b.to(tl.int64) * svb + i_h * svh + offs_t[:, None] * svt + offs_v[None, :], mask=mask_tv,
                other=0.0)
    do = tl.load(DO + i_b.to(tl.int64) * sdob + i_h * sdoh + offs_t[:, None] * sdot + offs_v[None, :],
                 mask=mask_tv, other=0.0)
    den = tl.load(DEN + i_bh.to(tl.int64) * T + offs_t, mask=mask_t, other=1.0)
    # the normalizer's gradient enters once, through value block 0
    hh = tl.load(HH + i_bh.to(tl.int64) * T + offs_t, mask=mask_t, other=0.0) * (i_v == 0).to(tl.float32)
    g = (do.to(tl.float32) / den[:, None]).to(dt)
    doc, doc_prev, doc_last = _chunk_docs(DOC + i_b.to(tl.int64) * T, t0, offs_t, mask_t, T, BC)
    x, keep = _intra_scores(q, k, offs_t, mask_t, doc, inv_sqrt_f, PREC)
    da = _mm(g, tl.trans(v), PREC) + hh[:, None]
    dx = tl.where(keep, da * (1.0 + x), 0.0).to(dt)
    a = tl.where(keep, 1.0 + x + 0.5 * x * x, 0.0).to(dt)
    return q, k, v, g, hh, doc == doc_prev, mask_t & (doc == doc_last), a, dx, offs_t, mask_t, offs_v, mask_tv


@triton.jit
def _store_qk_grad(DX, dx, i_v, i_bh, H, offs_t, mask_t, sv, sb, st, sh, F: tl.constexpr, FP: tl.constexpr):
    """Store this value block's part of dq or dk [BC, FP] into DX [NV, B, T, H, F] (fp32)."""
    offs_f = tl.arange(0, FP)
    ptr = DX + i_v.to(tl.int64) * sv + (i_bh // H).to(tl.int64) * sb + (i_bh % H) * sh
    tl.store(ptr + offs_t[:, None] * st + offs_f[None, :], dx, mask=mask_t[:, None] & (offs_f < F)[None, :])


@triton.jit
def _bwd_dq_kernel(Q, K, V, DOC, DO, DEN, HH, STATES, ZST, DQ, IDX_I, IDX_J, COEF,
                   T, H, DV, NC, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
                   sdqv, sdqb, sdqt, sdqh, inv_sqrt_f,
                   F: tl.constexpr, FP: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr, BF: tl.constexpr,
                   BV: tl.constexpr, PREC: tl.constexpr, SEL_PREC: tl.constexpr, CHAIN_PREC: tl.constexpr):
    """dq of one chunk, this value block's part (summed over value blocks on the host): intra-chunk plus
    the readout of S_c by the queries of the document before the chunk."""
    i_c = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2)
    q, k, v, g, hh, reads, writes, a, dx, offs_t, mask_t, offs_v, mask_tv = _bwd_chunk(
        Q, K, V, DOC, DO, DEN, HH, i_c, i_v, i_bh, T, H, DV, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
        sdob, sdot, sdoh, inv_sqrt_f, F, FP, BC, BV, PREC)
    dq = _mm(dx, k, PREC) * inv_sqrt_f
    op_dt = STATES.dtype.element_ty
    g_r = tl.where(reads[:, None], g, 0.0).to(op_dt)
    h_r = tl.where(reads, hh, 0.0)
    mask_v = offs_v < DV
    st_ptr = STATES + (i_bh.to(tl.int64) * NC + i_c) * NP * DV
    z_ptr = ZST + (i_bh.to(tl.int64) * NC + i_c) * NP
    for p0 in range(0, NP, BF):
        offs_p = p0 + tl.arange(0, BF)
        s = tl.load(st_ptr + offs_p[:, None] * DV + offs_v[None, :], mask=mask_v[None, :], other=0.0)
        z = tl.load(z_ptr + offs_p)
        sel_i, sel_j, has_i, has_j, coef = _feature_block(IDX_I, IDX_J, COEF, p0, BF, FP)
        phi_q, qi, qj = _features(q, sel_i, sel_j, has_i, has_j, coef, SEL_PREC)
        dphi_q = _mm(g_r, tl.trans(s), PREC) + h_r[:, None] * z[None, :]
        dq += _features_grad(dphi_q, qi, qj, sel_i, sel_j, coef, CHAIN_PREC)
    _store_qk_grad(DQ, dq, i_v, i_bh, H, offs_t, mask_t, sdqv, sdqb, sdqt, sdqh, F, FP)


@triton.jit
def _bwd_dkv_kernel(Q, K, V, DOC, DO, DEN, HH, DSTATES, DZST, DK, DVAL, IDX_I, IDX_J, COEF,
                    T, H, DV, NC, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
                    sdqv, sdqb, sdqt, sdqh, sdvb, sdvt, sdvh, inv_sqrt_f,
                    F: tl.constexpr, FP: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr, BF: tl.constexpr,
                    BV: tl.constexpr, PREC: tl.constexpr, SEL_PREC: tl.constexpr, CHAIN_PREC: tl.constexpr):
    """dk (this value block's part) and dv of one chunk: intra-chunk plus, for the keys of the chunk's last
    document, the gradient dS_c of the state after the chunk."""
    i_c = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2)
    q, k, v, g, hh, reads, writes, a, dx, offs_t, mask_t, offs_v, mask_tv = _bwd_chunk(
        Q, K, V, DOC, DO, DEN, HH, i_c, i_v, i_bh, T, H, DV, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
        sdob, sdot, sdoh, inv_sqrt_f, F, FP, BC, BV, PREC)
    dval = _mm(tl.trans(a), g, PREC)
    dk = _mm(tl.trans(dx), q, PREC) * inv_sqrt_f
    op_dt = DSTATES.dtype.element_ty
    v_w = tl.where(writes[:, None], v, 0.0).to(op_dt)
    first_block = (i_v == 0).to(tl.float32)
    mask_v = offs_v < DV
    dst_ptr = DSTATES + (i_bh.to(tl.int64) * NC + i_c) * NP * DV
    dz_ptr = DZST + (i_bh.to(tl.int64) * NC + i_c) * NP
    for p0 in range(0, NP, BF):
        offs_p = p0 + tl.arange(0, BF)
        ds = tl.load(dst_ptr + offs_p[:, None] * DV + offs_v[None, :], mask=mask_v[None, :], other=0.0)
        dz = tl.load(dz_ptr + offs_p) * first_block
        sel_i, sel_j, has_i, has_j, coef = _feature_block(IDX_I, IDX_J, COEF, p0, BF, FP)
        phi_k, ki, kj = _features(k, sel_i, sel_j, has_i, has_j, coef, SEL_PREC)
        phi_k = tl.where(writes[:, None], phi_k, 0.0)
        dval += _mm(phi_k.to(op_dt), ds, PREC)
        dphi_k = tl.where(writes[:, None], _mm(v_w, tl.trans(ds), PREC) + dz[None, :], 0.0)
        dk += _features_grad(dphi_k, ki, kj, sel_i, sel_j, coef, CHAIN_PREC)
    _store_qk_grad(DK, dk, i_v, i_bh, H, offs_t, mask_t, sdqv, sdqb, sdqt, sdqh, F, FP)
    i_b = i_bh // H
    tl.store(DVAL + i_b.to(tl.int64) * sdvb + (i_bh % H) * sdvh + offs_t[:, None] * sdvt + offs_v[None, :],
             dval.to(DVAL.dtype.element_ty), mask=mask_tv)


@triton.jit
def _normalizer_grad_kernel(OUT, DO, DEN, HH, T, H, DV, sob, sot, soh, sdob, sdot, sdoh,
                            BT: tl.constexpr, BD: tl.constexpr):
    """HH[b, h, t] = -(dO . o) / den: the gradient that reaches the normalizer, per query."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_t = i_t * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    mask = (offs_t[:, None] < T) & (offs_d[None, :] < DV)
    o = tl.load(OUT + i_b.to(tl.int64) * sob + i_h * soh + offs_t[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + i_b.to(tl.int64) * sdob + i_h * sdoh + offs_t[:, None] * sdot + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    den = tl.load(DEN + i_bh.to(tl.int64) * T + offs_t, mask=offs_t < T, other=1.0)
    tl.store(HH + i_bh.to(tl.int64) * T + offs_t, -delta / den, mask=offs_t < T)


@triton.jit
def _state_rows(F: tl.constexpr, FP: tl.constexpr):
    """Row indices of the first- and second-order features in the 1+F+F*F state, and their masks."""
    r1 = tl.arange(0, FP)
    r2 = tl.arange(0, FP * FP)
    a = r2 // FP
    b = r2 % FP
    return 1 + r1, r1 < F, 1 + F + a * F + b, (a < F) & (b < F)


@triton.jit
def _step_kernel(Q, K, V, S, Z, OUT, H, DV, eps, c1, c2,
                 sqb, sqh, skb, skh, svb, svh, sob, soh,
                 F: tl.constexpr, FP: tl.constexpr, BV: tl.constexpr, PDL: tl.constexpr):
    """One decode token for one (batch, head): S += phi(k) v^T, z += phi(k), o = phi(q) S / (phi(q) z + eps)."""
    release(PDL)  # kernels/_pdl.py: everything below may depend on the kernel before
    i_bh = tl.program_id(0)
    i_b = i_bh // H
    i_h = i_bh % H
    NF = 1 + F + F * F
    offs_f = tl.arange(0, FP)
    mask_f = offs_f < F
    q = tl.load(Q + i_b * sqb + i_h * sqh + offs_f, mask=mask_f, other=0.0).to(tl.float32)
    k = tl.load(K + i_b * skb + i_h * skh + offs_f, mask=mask_f, other=0.0).to(tl.float32)
    q1 = q * c1
    k1 = k * c1
    q2 = tl.reshape(q[:, None] * q[None, :], (FP * FP,)) * c2
    k2 = tl.reshape(k[:, None] * k[None, :], (FP * FP,)) * c2
    row1, m1, row2, m2 = _state_rows(F, FP)
    z_ptr = Z + i_bh.to(tl.int64) * NF
    z0 = tl.load(z_ptr + tl.arange(0, 1)) + 1.0
    z1 = tl.load(z_ptr + row1, mask=m1, other=0.0) + k1
    z2 = tl.load(z_ptr + row2, mask=m2, other=0.0) + k2
    tl.store(z_ptr + tl.arange(0, 1), z0)
    tl.store(z_ptr + row1, z1, mask=m1)
    tl.store(z_ptr + row2, z2, mask=m2)
    den = tl.sum(z0, axis=0) + tl.sum(q1 * z1, axis=0) + tl.sum(q2 * z2, axis=0) + eps
    s_ptr = S + i_bh.to(tl.int64) * NF * DV
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        mask_v = offs_v < DV
        v = tl.load(V + i_b * svb + i_h * svh + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        s0 = tl.load(s_ptr + offs_v, mask=mask_v, other=0.0) + v
        s1 = tl.load(s_ptr + row1[:, None] * DV + offs_v[None, :], mask=m1[:, None] & mask_v[None, :], other=0.0)
        s2 = tl.load(s_ptr + row2[:, None] * DV + offs_v[None, :], mask=m2[:, None] & mask_v[None, :], other=0.0)
        s1 += k1[:, None] * v[None, :]
        s2 += k2[:, None] * v[None, :]
        tl.store(s_ptr + offs_v, s0, mask=mask_v)
        tl.store(s_ptr + row1[:, None] * DV + offs_v[None, :], s1, mask=m1[:, None] & mask_v[None, :])
        tl.store(s_ptr + row2[:, None] * DV + offs_v[None, :], s2, mask=m2[:, None] & mask_v[None, :])
        num = s0 + tl.sum(q1[:, None] * s1, axis=0) + tl.sum(q2[:, None] * s2, axis=0)
        tl.store(OUT + i_b * sob + i_h * soh + offs_v, (num / den).to(OUT.dtype.element_ty), mask=mask_v)


# ----------------------------------------------------------------------------------------------------------
# host side


class Layout:
    """The kernels' state rows: the symmetric form of the published features.

    Published rows (1 + F + F*F): [1, x / F^(1/4), x_i x_j / sqrt(2F) for all i, j]. The pair (i, j) and
    (j, i) carry the same feature, so the kernels keep one row per pair i <= j (coefficient 1/sqrt(2F) on
    the diagonal, sqrt(2) / sqrt(2F) off it): 1 + F + F(F+1)/2 rows (153 for F = 16, 44% fewer than 273),
    padded with zero rows to a multiple of the feature block. phi_sym(q) . phi_sym(k) = phi(q) . phi(k).

    Tables per row: the indices i, j of the two factors of x_i x_j (-1 stands for the factor 1) and the
    coefficient. Maps between the layouts (fp32): `to_sym` [NP, NF] reads a published state as the kernels'
    (S_sym = to_sym S, exact for any S, symmetric or not, since the readout only sees S_ij + S_ji);
    `to_pub` [NF, NP] writes a kernel state in the published layout (S_ij = S_ji; exact for states built
    from keys). `to_sym` applied after `to_pub` is the identity.
    """

    def __init__(self, feature_dim: int, block_f: int, device: torch.device | str) -> None:
        f = feature_dim
        pairs = [(i, j) for i in range(f) for j in range(i, f)]
        self.NF = 1 + f + f * f
        self.NS = 1 + f + len(pairs)
        self.NP = triton.cdiv(self.NS, block_f) * block_f
        idx_i = torch.full((self.NP,), -1, dtype=torch.int32)
        idx_j = torch.full((self.NP,), -1, dtype=torch.int32)
        coef = torch.zeros(self.NP, dtype=torch.float64)
        to_sym = torch.zeros(self.NP, self.NF, dtype=torch.float64)
        coef[0] = 1.0
        to_sym[0, 0] = 1.0
        for j in range(f):
            idx_j[1 + j] = j
            coef[1 + j] = f**-0.25
            to_sym[1 + j, 1 + j] = 1.0
        c2 = 1.0 / math.sqrt(2.0 * f)
        for row, (i, j) in enumerate(pairs, start=1 + f):
            idx_i[row], idx_j[row] = i, j
            if i == j:
                coef[row] = c2
                to_sym[row, 1 + f + i * f + i] = 1.0
            else:
                coef[row] = math.sqrt(2.0) * c2
                to_sym[row, 1 + f + i * f + j] = to_sym[row, 1 + f + j * f + i] = 2.0**-0.5
        to_pub = to_sym.t().clone()
        self.tables = (idx_i.to(device), idx_j.to(device), coef.float().to(device))
        self.to_sym = to_sym.float().to(device)
        self.to_pub = to_pub.float().to(device)

    def sym(self, state: torch.Tensor) -> torch.Tensor:
        """[BH, NF(, Dv)] published -> [BH, NP(, Dv)] fp32 contiguous."""
        return torch.einsum("pn,bn...->bp...", self.to_sym, state.float()).contiguous()

    def pub(self, state: torch.Tensor) -> torch.Tensor:
        """[BH, NP(, Dv)] -> [BH, NF(, Dv)] published, symmetric in (i, j)."""
        return torch.einsum("np,bp...->bn...", self.to_pub, state)

    def antisym(self, state: torch.Tensor) -> torch.Tensor:
        """The part of a published state that the symmetric rows drop: state - pub(sym(state))."""
        return state.float() - self.pub(self.sym(state))


@functools.cache
def layout(feature_dim: int, block_f: int, device: str) -> Layout:
    return Layout(feature_dim, block_f, device)


def _precision(dtype: torch.dtype) -> dict:
    """Products' precision. PREC: bf16/fp16 operands go to the tensor cores as they are; fp32 operands use
    tf32 on the GPU (about 1e-3 relative) and exact fp32 products in the interpreter, where the CPU tests
    hold them to 2e-5. SEL_PREC (gathering q, k columns) and CHAIN_PREC (the chain rule of phi): 3xtf32 on
    the GPU for fp32 inputs (fp32 accuracy)."""
    if interpreting():
        prec = "ieee" if dtype == torch.float32 else "emulate"
        return {"PREC": prec, "SEL_PREC": prec, "CHAIN_PREC": "ieee"}
    if dtype == torch.float32:
        return {"PREC": "tf32", "SEL_PREC": "tf32x3", "CHAIN_PREC": "tf32x3"}
    # 16-bit inputs: the gathers are exact for any precision; the chain rule's tf32 (2^-11) stays far below
    # the rounding of the 16-bit gradient it feeds
    return {"PREC": "tf32", "SEL_PREC": "tf32", "CHAIN_PREC": "tf32"}


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _whole_row_carry(docs: torch.Tensor, heads: int) -> torch.Tensor:
    """[B*H, 1, 1] fp32: 1 where the row is one document (the initial state reaches the final state)."""
    carry = (docs[:, 0] == docs[:, -1]).float()
    return carry.repeat_interleave(heads)[:, None, None]


def _state_pass(x, y, docs, den, hh, start, plan: Plan, reverse: bool, want_end: bool):
    """Run the forward (x=k, y=v) or reverse (x=q, y=dO) state pass; returns (states, z states, end), all in
    the kernels' symmetric layout ([B*H, NC, NP, Dv], [B*H, NC, NP]; end [B*H, NP, Dv], [B*H, NP])."""
    batch, seqlen, heads, _ = x.shape
    lay = layout(plan.F, plan.BF, str(x.device))
    dv = y.shape[-1]
    bh = batch * heads
    states = new_output((bh, plan.NC, lay.NP, dv), state_dtype(y.dtype), y.device)
    zst = new_output((bh, plan.NC, lay.NP), torch.float32, y.device)
    end = None
    if want_end:
        end = (new_output((bh, lay.NP, dv), torch.float32, y.device),
               new_output((bh, lay.NP), torch.float32, y.device))
    prec = _precision(y.dtype)
    s0, z0 = start if start is not None else (zst, zst)
    s_end, z_end = end if end is not None else (zst, zst)
    den = den if den is not None else zst
    hh = hh if hh is not None else zst
    _state_pass_kernel[(lay.NP // plan.BF, plan.NVS, bh)](
        x, y, docs, den, hh, s0, z0, states, zst, s_end, z_end, *lay.tables, seqlen, heads, dv, plan.NC,
        *_strides3(x), *_strides3(y), F=plan.F, FP=plan.FP, NP=lay.NP, BC=plan.BC, BF=plan.BF, BV=plan.BVS,
        REVERSE=reverse, HAS_S0=start is not None, STORE_END=want_end, PREC=prec["PREC"], SEL_PREC=prec["SEL_PREC"],
        num_warps=4, **plan.stages)
    return states, zst, end


def forward(q, k, v, docs, eps, kv0, ks0, output_final_state, plan: Plan):
    """Returns o, den [B, H, T], the chunk states (S_c, z_c) and the final state (published layout) or None."""
    batch, seqlen, heads, _ = q.shape
    dv = v.shape[-1]
    bh = batch * heads
    lay = layout(plan.F, plan.BF, str(q.device))
    start = initial_state_sym(kv0, ks0, lay, plan, bh, dv)
    states, zst, end = _state_pass(k, v, docs, None, None, start, plan, reverse=False, want_end=output_final_state)
    o = new_output((batch, seqlen, heads, dv), v.dtype, v.device)
    den = new_output((batch, heads, seqlen), torch.float32, v.device)
    prec = _precision(v.dtype)
    _fwd_kernel[(plan.NC, plan.NV, bh)](
        q, k, v, docs, o, den, states, zst, *lay.tables,
        seqlen, heads, dv, plan.NC, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), eps, plan.inv_sqrt_f,
        F=plan.F, FP=plan.FP, NP=lay.NP, BC=plan.BC, BF=plan.BF, BV=plan.BV, PREC=prec["PREC"],
        SEL_PREC=prec["SEL_PREC"], num_warps=plan.num_warps, **plan.stages)
    final = None if end is None else publish_final(end, kv0, ks0, docs, lay, plan, (batch, heads, dv))
    return o, den, (states, zst), final


def initial_state_sym(kv0, ks0, lay: Layout, plan: Plan, bh: int, dv: int):
    """The published initial state (kv0 [B, H, NF, Dv], ks0 [B, H, NF]) in the kernels' symmetric rows
    ([B*H, NP, Dv], [B*H, NP] fp32), or None without one."""
    if kv0 is None:
        return None
    return lay.sym(kv0.reshape(bh, plan.NF, dv)), lay.sym(ks0.reshape(bh, plan.NF))


def publish_final(end, kv0, ks0, docs, lay: Layout, plan: Plan, shape):
    """The final state (kv [B, H, NF, Dv], k_sum [B, H, NF]) in the published layout from the kernels' end state
    (symmetric rows), plus the part of an asymmetric initial state that the symmetric rows drop, where the row
    is one document (so the initial state reaches the final state whole)."""
    batch, heads, dv = shape
    bh = batch * heads
    kv, ks = lay.pub(end[0]), lay.pub(end[1])
    if kv0 is not None:
        carry = _whole_row_carry(docs, heads)
        kv = kv + carry * lay.antisym(kv0.reshape(bh, plan.NF, dv))
        ks = ks + carry[:, :, 0] * lay.antisym(ks0.reshape(bh, plan.NF))
    return kv.reshape(batch, heads, plan.NF, dv), ks.reshape(batch, heads, plan.NF)


def final_state_grads(d_kv, d_ks, q: torch.Tensor, v: torch.Tensor, n_feat: int):
    """(d_kv, d_ks) of the final state for a backward, zeros standing in for the one autograd left as None,
    or None when neither reached it (q [B, T, H, F], v [B, T, H, Dv]; fp32 [B, H, NF, Dv] and [B, H, NF])."""
    if d_kv is None and d_ks is None:
        return None
    shape = (q.shape[0], q.shape[2], n_feat)
    d_kv = d_kv if d_kv is not None else q.new_zeros((*shape, v.shape[-1]), dtype=torch.float32)
    d_ks = d_ks if d_ks is not None else q.new_zeros(shape, dtype=torch.float32)
    return d_kv, d_ks


def normalizer_grad(o: torch.Tensor, do: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """-(dO . o) / den per query [B, H, T] (fp32): the gradient that reaches the normalizer (o, dO [B, T, H, Dv],
    den [B, H, T])."""
    batch, seqlen, heads, dv_dim = o.shape
    hh = new_output((batch, heads, seqlen), torch.float32, o.device)
    block_d = next_pow2(dv_dim)
    bt_hh = max(1, min(64, 4096 // block_d))
    _normalizer_grad_kernel[(triton.cdiv(seqlen, bt_hh), batch * heads)](
        o, do, den, hh, seqlen, heads, dv_dim, *_strides3(o), *_strides3(do), BT=bt_hh, BD=block_d)
    return hh


def backward(do, q, k, v, docs, o, den, states, d_final, need_d_initial: bool, plan: Plan):
    """Returns dq, dk, dv and the gradient of the initial state (or None)."""
    batch, seqlen, heads, f = q.shape
    dv_dim = v.shape[-1]
    bh = batch * heads
    do = last_dim_contiguous(do)
    hh = normalizer_grad(o, do, den)
    lay = layout(plan.F, plan.BF, str(q.device))
    start = None
    if d_final is not None:
        d_final = (d_final[0].reshape(bh, plan.NF, dv_dim).float(), d_final[1].reshape(bh, plan.NF).float())
        # the adjoint of lay.pub
        start = (torch.einsum("np,bn...->bp...", lay.to_pub, d_final[0]).contiguous(),
                 torch.einsum("np,bn...->bp...", lay.to_pub, d_final[1]).contiguous())
    dstates, dzst, d_start = _state_pass(q, do, docs, den, hh, start, plan, reverse=True, want_end=need_d_initial)
    nvb = triton.cdiv(dv_dim, plan.BVB)
    dq_part = new_output((nvb, batch, seqlen, heads, f), torch.float32, v.device)
    dk_part = new_output((nvb, batch, seqlen, heads, f), torch.float32, v.device)
    dval = new_output(v.shape, v.dtype, v.device)
    inputs = (q, k, v, docs, do, den, hh)
    strides = (seqlen, heads, dv_dim, plan.NC, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do),
               *dq_part.stride()[:4])
    consts = dict(F=plan.F, FP=plan.FP, NP=lay.NP, BC=plan.BC, BF=plan.BF, BV=plan.BVB, **_precision(v.dtype),
                  num_warps=plan.bwd_warps, **plan.stages)
    grid = (plan.NC, nvb, bh)
    _bwd_dq_kernel[grid](*inputs, *states, dq_part, *lay.tables, *strides, plan.inv_sqrt_f, **consts)
    _bwd_dkv_kernel[grid](*inputs, dstates, dzst, dk_part, dval, *lay.tables, *strides, *_strides3(dval),
                          plan.inv_sqrt_f, **consts)
    dq = dq_part.sum(0) if nvb > 1 else dq_part[0]
    dk = dk_part.sum(0) if nvb > 1 else dk_part[0]
    d_init = None
    if d_start is not None:
        # the adjoint of lay.sym, plus the carried asymmetric part of the initial state (antisym is
        # self-adjoint: an orthogonal projection)
        d_kv = torch.einsum("pn,bp...->bn...", lay.to_sym, d_start[0])
        d_ks = torch.einsum("pn,bp...->bn...", lay.to_sym, d_start[1])
        if d_final is not None:
            carry = _whole_row_carry(docs, heads)
            d_kv = d_kv + carry * lay.antisym(d_final[0])
            d_ks = d_ks + carry[:, :, 0] * lay.antisym(d_final[1])
        d_init = (d_kv.reshape(batch, heads, plan.NF, dv_dim), d_ks.reshape(batch, heads, plan.NF))
    return dq.to(q.dtype), dk.to(k.dtype), dval, d_init


def taylor_linear_attention_step_triton(q, k, v, kv, k_sum, eps=1e-12):
    """One decode token (arguments already validated): updates kv, k_sum in place; returns (o, kv, k_sum)."""
    batch, heads, f = q.shape
    dv = v.shape[-1]
    fp = max(16, next_pow2(f))
    o = new_output((batch, heads, dv), v.dtype, v.device)
    block_v = 32 if dv > 16 else 16
    _step_kernel[(batch * heads,)](q, k, v, kv, k_sum, o, heads, dv, eps, f**-0.25, 1.0 / math.sqrt(2.0 * f),
                                   q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                   o.stride(0), o.stride(1), F=f, FP=fp, BV=block_v, num_warps=4,
                                   **pdl_options(q.device, "mixer"))
    return o, kv, k_sum
