"""Triton Taylor linear attention: chunked forward and backward with on-chip fp32 state, and a decode step.

Algorithm (per batch row and head, chunks of BT tokens, value columns split in blocks of BV):
- the state S = sum phi(k_s) v_s^T [273, Dv] and the normalizer z = sum phi(k_s) [273] live in registers
  in fp32 and are never written to HBM between chunks;
- per chunk: intra-chunk (1 + s + s^2/2) on the BT x BT scores of the raw 16-dim q, k; inter-chunk readout
  phi(q) S and phi(q) z; then the update S += phi(k)^T v, z += sum phi(k), with phi built in registers;
- documents: the state resets where doc_ids changes (a query reads the carried state only when it is in
  the document of the token before the chunk; keys update it only when in the chunk's last document);
- parallelism: programs = value blocks x segments x (batch x heads). When batch x heads is small the
  sequence is cut into segments: a state-only pass computes each segment's local state, a scan carries
  states across segments, and every segment then runs from its true initial state (chunk-parallel).
- backward: a forward sweep for dq (the same recurrence) and a reverse sweep for dk, dv that carries
  dS = sum phi(q) g^T in registers, with g = dO / den and the normalizer term h = -(dO . o) / den.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._common import interpreting, last_dim_contiguous, new_output, next_pow2, num_sms


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """tl.dot with fp32 accumulation; "emulate" multiplies bf16-rounded operands in fp32 (the interpreter's
    bf16 dot is broken in triton 3.9: it multiplies the raw uint16 bit patterns)."""
    if PREC == "emulate":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _expand2(x, BT: tl.constexpr, FP: tl.constexpr):
    """x [BT, FP] -> [BT, FP*FP] with column a*FP + b holding x_a * x_b."""
    return tl.reshape(x[:, :, None] * x[:, None, :], (BT, FP * FP))


@triton.jit
def _contract2(d2, x, BT: tl.constexpr, FP: tl.constexpr):
    """Chain rule of _expand2: d2 [BT, FP*FP], x [BT, FP] -> [BT, FP], out_a = sum_b (d2_ab + d2_ba) x_b."""
    d3 = tl.reshape(d2, (BT, FP, FP))
    return tl.sum(d3 * x[:, None, :], axis=2) + tl.sum(d3 * x[:, :, None], axis=1)


@triton.jit
def _state_rows(F: tl.constexpr, FP: tl.constexpr):
    """Row indices of the first- and second-order features in the 1+F+F*F state, and their masks."""
    r1 = tl.arange(0, FP)
    r2 = tl.arange(0, FP * FP)
    a = r2 // FP
    b = r2 % FP
    return 1 + r1, r1 < F, 1 + F + a * F + b, (a < F) & (b < F)


@triton.jit
def _load_state(S, Z, s_base, z_base, offs_v, mask_v, DV, F: tl.constexpr, FP: tl.constexpr):
    row1, m1, row2, m2 = _state_rows(F, FP)
    s0 = tl.load(S + s_base + offs_v, mask=mask_v, other=0.0)
    s1 = tl.load(S + s_base + row1[:, None] * DV + offs_v[None, :], mask=m1[:, None] & mask_v[None, :], other=0.0)
    s2 = tl.load(S + s_base + row2[:, None] * DV + offs_v[None, :], mask=m2[:, None] & mask_v[None, :], other=0.0)
    z0 = tl.load(Z + z_base + tl.arange(0, 1))
    z1 = tl.load(Z + z_base + row1, mask=m1, other=0.0)
    z2 = tl.load(Z + z_base + row2, mask=m2, other=0.0)
    return s0, s1, s2, z0, z1, z2


@triton.jit
def _store_state(S, Z, s_base, z_base, offs_v, mask_v, DV, s0, s1, s2, z0, z1, z2, store_z,
                 F: tl.constexpr, FP: tl.constexpr):
    row1, m1, row2, m2 = _state_rows(F, FP)
    tl.store(S + s_base + offs_v, s0, mask=mask_v)
    tl.store(S + s_base + row1[:, None] * DV + offs_v[None, :], s1, mask=m1[:, None] & mask_v[None, :])
    tl.store(S + s_base + row2[:, None] * DV + offs_v[None, :], s2, mask=m2[:, None] & mask_v[None, :])
    if store_z:
        tl.store(Z + z_base + tl.arange(0, 1), z0)
        tl.store(Z + z_base + row1, z1, mask=m1)
        tl.store(Z + z_base + row2, z2, mask=m2)


@triton.jit
def _fwd_kernel(Q, K, V, DOC, OUT, DEN, S_IN, Z_IN, S_OUT, Z_OUT,
                T, H, DV, SEG_LEN, NSEG, SEG_OFFSET,
                sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                eps, c1, c2, inv_sqrt_f,
                F: tl.constexpr, FP: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                HAS_STATE_IN: tl.constexpr, STORE_STATE: tl.constexpr, STATE_ONLY: tl.constexpr,
                PREC: tl.constexpr):
    i_v = tl.program_id(0)
    i_s = tl.program_id(1) + SEG_OFFSET
    i_bh = tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh % H
    NF = 1 + F + F * F
    offs_c = tl.arange(0, BT)
    offs_f = tl.arange(0, FP)
    mask_f = offs_f < F
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < DV
    q_ptr = Q + i_b.to(tl.int64) * sqb + i_h * sqh
    k_ptr = K + i_b.to(tl.int64) * skb + i_h * skh
    v_ptr = V + i_b.to(tl.int64) * svb + i_h * svh
    o_ptr = OUT + i_b.to(tl.int64) * sob + i_h * soh
    doc_ptr = DOC + i_b.to(tl.int64) * T
    den_ptr = DEN + i_bh.to(tl.int64) * T
    dt = V.dtype.element_ty

    if HAS_STATE_IN:
        s_base = (i_bh.to(tl.int64) * NSEG + i_s) * NF * DV
        z_base = (i_bh.to(tl.int64) * NSEG + i_s) * NF
        s0, s1, s2, z0, z1, z2 = _load_state(S_IN, Z_IN, s_base, z_base, offs_v, mask_v, DV, F, FP)
    else:
        s0 = tl.zeros([BV], dtype=tl.float32)
        s1 = tl.zeros([FP, BV], dtype=tl.float32)
        s2 = tl.zeros([FP * FP, BV], dtype=tl.float32)
        z0 = tl.zeros([1], dtype=tl.float32)
        z1 = tl.zeros([FP], dtype=tl.float32)
        z2 = tl.zeros([FP * FP], dtype=tl.float32)

    t_start = i_s * SEG_LEN
    t_end = tl.minimum(T, t_start + SEG_LEN)
    doc_prev = tl.load(doc_ptr + tl.maximum(t_start - 1, 0))
    for t0 in range(t_start, t_end, BT):
        offs_t = t0 + offs_c
        mask_t = offs_t < t_end
        q = tl.load(q_ptr + offs_t[:, None] * sqt + offs_f[None, :], mask=mask_t[:, None] & mask_f[None, :], other=0.0)
        k = tl.load(k_ptr + offs_t[:, None] * skt + offs_f[None, :], mask=mask_t[:, None] & mask_f[None, :], other=0.0)
        v = tl.load(v_ptr + offs_t[:, None] * svt + offs_v[None, :], mask=mask_t[:, None] & mask_v[None, :], other=0.0)
        doc = tl.load(doc_ptr + offs_t, mask=mask_t, other=0)
        doc_last = tl.load(doc_ptr + tl.minimum(t0 + BT, t_end) - 1)
        carry = (doc_last == doc_prev).to(tl.float32)
        if not STATE_ONLY:
            scores = _mm(q, tl.trans(k), PREC) * inv_sqrt_f
            sim = 1.0 + scores + 0.5 * scores * scores
            keep = (offs_t[:, None] >= offs_t[None, :]) & (doc[:, None] == doc[None, :]) & mask_t[None, :]
            sim = tl.where(keep, sim, 0.0)
            num = _mm(sim.to(dt), v, PREC)
            den = tl.sum(sim, axis=1)
            qf = q.to(tl.float32)
            q1 = qf * c1
            q2 = _expand2(qf, BT, FP) * c2
            num_state = (s0[None, :] + _mm(q1.to(dt), s1.to(dt), PREC)
                         + _mm(q2.to(dt), s2.to(dt), PREC))
            den_state = z0 + tl.sum(q1 * z1[None, :], axis=1) + tl.sum(q2 * z2[None, :], axis=1)
            reads_state = doc == doc_prev
            num += tl.where(reads_state[:, None], num_state, 0.0)
            den += tl.where(reads_state, den_state, 0.0) + eps
            o = num / den[:, None]
            tl.store(o_ptr + offs_t[:, None] * sot + offs_v[None, :], o.to(OUT.dtype.element_ty),
                     mask=mask_t[:, None] & mask_v[None, :])
            if i_v == 0:
                tl.store(den_ptr + offs_t, den, mask=mask_t)
        writes = mask_t & (doc == doc_last)
        wf = writes.to(tl.float32)
        kf = k.to(tl.float32)
        k1 = kf * c1
        k2 = _expand2(kf, BT, FP) * c2
        vw = tl.where(writes[:, None], v, 0.0).to(dt)
        s0 = s0 * carry + tl.sum(vw.to(tl.float32), axis=0)
        s1 = s1 * carry + _mm(tl.trans(k1.to(dt)), vw, PREC)
        s2 = s2 * carry + _mm(tl.trans(k2.to(dt)), vw, PREC)
        z0 = z0 * carry + tl.sum(wf, axis=0)
        z1 = z1 * carry + tl.sum(k1 * wf[:, None], axis=0)
        z2 = z2 * carry + tl.sum(k2 * wf[:, None], axis=0)
        doc_prev = doc_last

    if STORE_STATE:
        if STATE_ONLY:
            out_base = i_bh.to(tl.int64) * NSEG + i_s
            _store_state(S_OUT, Z_OUT, out_base * NF * DV, out_base * NF, offs_v, mask_v, DV,
                         s0, s1, s2, z0, z1, z2, i_v == 0, F, FP)
        elif i_s == NSEG - 1:
            _store_state(S_OUT, Z_OUT, i_bh.to(tl.int64) * NF * DV, i_bh.to(tl.int64) * NF, offs_v, mask_v, DV,
                         s0, s1, s2, z0, z1, z2, i_v == 0, F, FP)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DOC, DO, DEN, HH, S_IN, Z_IN, DQ,
                   T, H, DV, SEG_LEN, NSEG,
                   sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
                   sdqv, sdqb, sdqt, sdqh,
                   c1, c2, inv_sqrt_f,
                   F: tl.constexpr, FP: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                   HAS_STATE_IN: tl.constexpr, PREC: tl.constexpr):
    i_v = tl.program_id(0)
    i_s = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh % H
    NF = 1 + F + F * F
    offs_c = tl.arange(0, BT)
    offs_f = tl.arange(0, FP)
    mask_f = offs_f < F
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < DV
    q_ptr = Q + i_b.to(tl.int64) * sqb + i_h * sqh
    k_ptr = K + i_b.to(tl.int64) * skb + i_h * skh
    v_ptr = V + i_b.to(tl.int64) * svb + i_h * svh
    do_ptr = DO + i_b.to(tl.int64) * sdob + i_h * sdoh
    dq_ptr = DQ + i_v.to(tl.int64) * sdqv + i_b.to(tl.int64) * sdqb + i_h * sdqh
    doc_ptr = DOC + i_b.to(tl.int64) * T
    den_ptr = DEN + i_bh.to(tl.int64) * T
    hh_ptr = HH + i_bh.to(tl.int64) * T
    dt = V.dtype.element_ty
    # the normalizer's gradient enters once, through value block 0
    first_block = (i_v == 0).to(tl.float32)

    if HAS_STATE_IN:
        s_base = (i_bh.to(tl.int64) * NSEG + i_s) * NF * DV
        z_base = (i_bh.to(tl.int64) * NSEG + i_s) * NF
        s0, s1, s2, z0, z1, z2 = _load_state(S_IN, Z_IN, s_base, z_base, offs_v, mask_v, DV, F, FP)
    else:
        s0 = tl.zeros([BV], dtype=tl.float32)
        s1 = tl.zeros([FP, BV], dtype=tl.float32)
        s2 = tl.zeros([FP * FP, BV], dtype=tl.float32)
        z0 = tl.zeros([1], dtype=tl.float32)
        z1 = tl.zeros([FP], dtype=tl.float32)
        z2 = tl.zeros([FP * FP], dtype=tl.float32)

    t_start = i_s * SEG_LEN
    t_end = tl.minimum(T, t_start + SEG_LEN)
    doc_prev = tl.load(doc_ptr + tl.maximum(t_start - 1, 0))
    for t0 in range(t_start, t_end, BT):
        offs_t = t0 + offs_c
        mask_t = offs_t < t_end
        q = tl.load(q_ptr + offs_t[:, None] * sqt + offs_f[None, :], mask=mask_t[:, None] & mask_f[None, :], other=0.0)
        k = tl.load(k_ptr + offs_t[:, None] * skt + offs_f[None, :], mask=mask_t[:, None] & mask_f[None, :], other=0.0)
        v = tl.load(v_ptr + offs_t[:, None] * svt + offs_v[None, :], mask=mask_t[:, None] & mask_v[None, :], other=0.0)
        do = tl.load(do_ptr + offs_t[:, None] * sdot + offs_v[None, :], mask=mask_t[:, None] & mask_v[None, :], other=0.0)
        den = tl.load(den_ptr + offs_t, mask=mask_t, other=1.0)
        hh = tl.load(hh_ptr + offs_t, mask=mask_t, other=0.0) * first_block
        doc = tl.load(doc_ptr + offs_t, mask=mask_t, other=0)
        doc_last = tl.load(doc_ptr + tl.minimum(t0 + BT, t_end) - 1)
        carry = (doc_last == doc_prev).to(tl.float32)
        g = (do.to(tl.float32) / den[:, None]).to(dt)

        scores = _mm(q, tl.trans(k), PREC) * inv_sqrt_f
        keep = (offs_t[:, None] >= offs_t[None, :]) & (doc[:, None] == doc[None, :]) & mask_t[None, :]
        dsim = _mm(g, tl.trans(v), PREC) + hh[:, None]
        dscores = tl.where(keep, dsim * (1.0 + scores), 0.0)
        dq = _mm(dscores.to(dt), k, PREC) * inv_sqrt_f

        reads_state = doc == doc_prev
        g_state = tl.where(reads_state[:, None], g, 0.0).to(dt)
        h_state = tl.where(reads_state, hh, 0.0)
        dphi1 = _mm(g_state, tl.trans(s1.to(dt)), PREC) + h_state[:, None] * z1[None, :]
        dphi2 = _mm(g_state, tl.trans(s2.to(dt)), PREC) + h_state[:, None] * z2[None, :]
        qf = q.to(tl.float32)
        dq += c1 * dphi1 + c2 * _contract2(dphi2, qf, BT, FP)
        tl.store(dq_ptr + offs_t[:, None] * sdqt + offs_f[None, :], dq, mask=mask_t[:, None] & mask_f[None, :])

        writes = mask_t & (doc == doc_last)
        wf = writes.to(tl.float32)
        kf = k.to(tl.float32)
        k1 = kf * c1
        k2 = _expand2(kf, BT, FP) * c2
        vw = tl.where(writes[:, None], v, 0.0).to(dt)
        s0 = s0 * carry + tl.sum(vw.to(tl.float32), axis=0)
        s1 = s1 * carry + _mm(tl.trans(k1.to(dt)), vw, PREC)
        s2 = s2 * carry + _mm(tl.trans(k2.to(dt)), vw, PREC)
        z0 = z0 * carry + tl.sum(wf, axis=0)
        z1 = z1 * carry + tl.sum(k1 * wf[:, None], axis=0)
        z2 = z2 * carry + tl.sum(k2 * wf[:, None], axis=0)
        doc_prev = doc_last


@triton.jit
def _bwd_dkv_kernel(Q, K, V, DOC, DO, DEN, HH, DS_IN, DZ_IN, DK, DVAL, DS_OUT, DZ_OUT,
                    T, H, DV, SEG_LEN, NSEG, SEG_OFFSET,
                    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
                    sdkv, sdkb, sdkt, sdkh, sdvb, sdvt, sdvh,
                    c1, c2, inv_sqrt_f,
                    F: tl.constexpr, FP: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                    HAS_STATE_IN: tl.constexpr, STORE_STATE: tl.constexpr, STATE_ONLY: tl.constexpr,
                    PREC: tl.constexpr):
    i_v = tl.program_id(0)
    i_s = tl.program_id(1) + SEG_OFFSET
    i_bh = tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh % H
    NF = 1 + F + F * F
    offs_c = tl.arange(0, BT)
    offs_f = tl.arange(0, FP)
    mask_f = offs_f < F
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < DV
    q_ptr = Q + i_b.to(tl.int64) * sqb + i_h * sqh
    k_ptr = K + i_b.to(tl.int64) * skb + i_h * skh
    v_ptr = V + i_b.to(tl.int64) * svb + i_h * svh
    do_ptr = DO + i_b.to(tl.int64) * sdob + i_h * sdoh
    dk_ptr = DK + i_v.to(tl.int64) * sdkv + i_b.to(tl.int64) * sdkb + i_h * sdkh
    dv_ptr = DVAL + i_b.to(tl.int64) * sdvb + i_h * sdvh
    doc_ptr = DOC + i_b.to(tl.int64) * T
    den_ptr = DEN + i_bh.to(tl.int64) * T
    hh_ptr = HH + i_bh.to(tl.int64) * T
    dt = V.dtype.element_ty
    first_block = (i_v == 0).to(tl.float32)

    # dS: the gradient of the state after the current chunk (for the last chunk: after the segment)
    if HAS_STATE_IN:
        s_base = (i_bh.to(tl.int64) * NSEG + i_s) * NF * DV
        z_base = (i_bh.to(tl.int64) * NSEG + i_s) * NF
        ds0, ds1, ds2, dz0, dz1, dz2 = _load_state(DS_IN, DZ_IN, s_base, z_base, offs_v, mask_v, DV, F, FP)
        dz0 = dz0 * first_block
        dz1 = dz1 * first_block
        dz2 = dz2 * first_block
    else:
        ds0 = tl.zeros([BV], dtype=tl.float32)
        ds1 = tl.zeros([FP, BV], dtype=tl.float32)
        ds2 = tl.zeros([FP * FP, BV], dtype=tl.float32)
        dz0 = tl.zeros([1], dtype=tl.float32)
        dz1 = tl.zeros([FP], dtype=tl.float32)
        dz2 = tl.zeros([FP * FP], dtype=tl.float32)

    t_start = i_s * SEG_LEN
    t_end = tl.minimum(T, t_start + SEG_LEN)
    n_chunks = tl.cdiv(t_end - t_start, BT)
    for i_c in range(n_chunks):
        t0 = t_start + (n_chunks - 1 - i_c) * BT
        offs_t = t0 + offs_c
        mask_t = offs_t < t_end
        q = tl.load(q_ptr + offs_t[:, None] * sqt + offs_f[None, :], mask=mask_t[:, None] & mask_f[None, :], other=0.0)
        v = tl.load(v_ptr + offs_t[:, None] * svt + offs_v[None, :], mask=mask_t[:, None] & mask_v[None, :], other=0.0)
        do = tl.load(do_ptr + offs_t[:, None] * sdot + offs_v[None, :], mask=mask_t[:, None] & mask_v[None, :], other=0.0)
        den = tl.load(den_ptr + offs_t, mask=mask_t, other=1.0)
        hh = tl.load(hh_ptr + offs_t, mask=mask_t, other=0.0) * first_block
        doc = tl.load(doc_ptr + offs_t, mask=mask_t, other=0)
        doc_prev = tl.load(doc_ptr + tl.maximum(t0 - 1, 0))
        doc_last = tl.load(doc_ptr + tl.minimum(t0 + BT, t_end) - 1)
        carry = (doc_last == doc_prev).to(tl.float32)
        g = (do.to(tl.float32) / den[:, None]).to(dt)
        qf = q.to(tl.float32)
        if not STATE_ONLY:
            k = tl.load(k_ptr + offs_t[:, None] * skt + offs_f[None, :], mask=mask_t[:, None] & mask_f[None, :],
                        other=0.0)
            # transposed intra-chunk blocks: rows are keys j, columns are queries i
            scores_t = _mm(k, tl.trans(q), PREC) * inv_sqrt_f
            keep_t = (offs_t[None, :] >= offs_t[:, None]) & (doc[:, None] == doc[None, :]) & mask_t[None, :]
            sim_t = tl.where(keep_t, 1.0 + scores_t + 0.5 * scores_t * scores_t, 0.0)
            dv = _mm(sim_t.to(dt), g, PREC)
            dsim_t = _mm(v, tl.trans(g), PREC) + hh[None, :]
            dscores_t = tl.where(keep_t, dsim_t * (1.0 + scores_t), 0.0)
            dk = _mm(dscores_t.to(dt), q, PREC) * inv_sqrt_f

            writes = mask_t & (doc == doc_last)
            kf = k.to(tl.float32)
            k1 = kf * c1
            k2 = _expand2(kf, BT, FP) * c2
            dv_state = (ds0[None, :] + _mm(k1.to(dt), ds1.to(dt), PREC)
                        + _mm(k2.to(dt), ds2.to(dt), PREC))
            dv += tl.where(writes[:, None], dv_state, 0.0)
            dphi1 = _mm(v, tl.trans(ds1.to(dt)), PREC) + dz1[None, :]
            dphi2 = _mm(v, tl.trans(ds2.to(dt)), PREC) + dz2[None, :]
            dk_state = c1 * dphi1 + c2 * _contract2(dphi2, kf, BT, FP)
            dk += tl.where(writes[:, None], dk_state, 0.0)
            tl.store(dv_ptr + offs_t[:, None] * sdvt + offs_v[None, :], dv.to(DVAL.dtype.element_ty),
                     mask=mask_t[:, None] & mask_v[None, :])
            tl.store(dk_ptr + offs_t[:, None] * sdkt + offs_f[None, :], dk, mask=mask_t[:, None] & mask_f[None, :])

        reads_state = mask_t & (doc == doc_prev)
        g_state = tl.where(reads_state[:, None], g, 0.0).to(dt)
        h_state = tl.where(reads_state, hh, 0.0)
        q1 = qf * c1
        q2 = _expand2(qf, BT, FP) * c2
        ds0 = ds0 * carry + tl.sum(g_state.to(tl.float32), axis=0)
        ds1 = ds1 * carry + _mm(tl.trans(q1.to(dt)), g_state, PREC)
        ds2 = ds2 * carry + _mm(tl.trans(q2.to(dt)), g_state, PREC)
        dz0 = dz0 * carry + tl.sum(h_state, axis=0)
        dz1 = dz1 * carry + tl.sum(q1 * h_state[:, None], axis=0)
        dz2 = dz2 * carry + tl.sum(q2 * h_state[:, None], axis=0)

    if STORE_STATE:
        if STATE_ONLY:
            out_base = i_bh.to(tl.int64) * NSEG + i_s
            _store_state(DS_OUT, DZ_OUT, out_base * NF * DV, out_base * NF, offs_v, mask_v, DV,
                         ds0, ds1, ds2, dz0, dz1, dz2, i_v == 0, F, FP)
        elif i_s == 0:
            _store_state(DS_OUT, DZ_OUT, i_bh.to(tl.int64) * NF * DV, i_bh.to(tl.int64) * NF, offs_v, mask_v, DV,
                         ds0, ds1, ds2, dz0, dz1, dz2, i_v == 0, F, FP)


@triton.jit
def _scan_kernel(LOCAL, INIT, H0, CARRY, NSEG, N, H,
                 HAS_H0: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """INIT[s] = state entering segment s: a carried running sum over LOCAL with resets (CARRY 0)."""
    i_bh = tl.program_id(0)
    i_n = tl.program_id(1)
    i_b = i_bh // H
    offs = i_n * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = i_bh.to(tl.int64) * NSEG * N
    if HAS_H0:
        acc = tl.load(H0 + i_bh.to(tl.int64) * N + offs, mask=mask, other=0.0)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(NSEG - 1):
        if REVERSE:
            s = NSEG - 1 - j
        else:
            s = j
        tl.store(INIT + base + s * N + offs, acc, mask=mask)
        c = tl.load(CARRY + i_b * NSEG + s)
        acc = acc * c + tl.load(LOCAL + base + s * N + offs, mask=mask, other=0.0)
    if REVERSE:
        last = 0
    else:
        last = NSEG - 1
    tl.store(INIT + base + last * N + offs, acc, mask=mask)


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
def _step_kernel(Q, K, V, S, Z, OUT, H, DV, eps, c1, c2,
                 sqb, sqh, skb, skh, svb, svh, sob, soh,
                 F: tl.constexpr, FP: tl.constexpr, BV: tl.constexpr):
    """One decode token for one (batch, head): S += phi(k) v^T, z += phi(k), o = phi(q) S / (phi(q) z + eps)."""
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


class Plan:
    """Block sizes and the segment split of one call (chunk BT, value block BV, segment length)."""

    def __init__(self, batch: int, seqlen: int, heads: int, feature_dim: int, value_dim: int, device,
                 chunk_size: int | None = None, block_v: int | None = None, segment_len: int | None = None,
                 num_warps: int | None = None) -> None:
        self.F = feature_dim
        self.FP = max(16, next_pow2(feature_dim))
        self.BT = chunk_size or 64
        # fastest of the configurations timed on an H100 (docs/PERFORMANCE.md): one value block up to 128
        # wide, 8 warps (every configuration spills the fp32 state; this one re-expands phi(q), phi(k) least)
        self.BV = block_v or min(128, max(16, next_pow2(value_dim)))
        self.NV = triton.cdiv(value_dim, self.BV)
        self.num_warps = num_warps or 8
        n_chunks = max(1, triton.cdiv(seqlen, self.BT))
        if segment_len is None:
            programs = batch * heads * self.NV
            want = triton.cdiv(2 * num_sms(device), programs)
            nseg = max(1, min(want, n_chunks // 4))
            segment_len = triton.cdiv(n_chunks, nseg) * self.BT
        if segment_len % self.BT:
            raise ValueError(f"segment_len {segment_len} must be a multiple of the chunk size {self.BT}")
        self.seg_len = max(segment_len, self.BT)
        self.NSEG = max(1, triton.cdiv(seqlen, self.seg_len))
        self.c1 = feature_dim**-0.25
        self.c2 = 1.0 / math.sqrt(2.0 * feature_dim)
        self.inv_sqrt_f = 1.0 / math.sqrt(feature_dim)


def _precision(dtype: torch.dtype) -> str:
    # bf16/fp16 operands go to the tensor cores as they are; fp32 operands use tf32 on the GPU (about 1e-3
    # relative) and exact fp32 products in the interpreter, where the CPU tests hold them to 2e-5
    if interpreting():
        return "ieee" if dtype == torch.float32 else "emulate"
    return "tf32"


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _segment_carry(docs: torch.Tensor, seqlen: int, seg_len: int, nseg: int) -> torch.Tensor:
    """[B, NSEG] fp32: 1 where the state entering a segment survives to its end (no document starts in it)."""
    starts = torch.arange(nseg, device=docs.device) * seg_len
    ends = torch.clamp(starts + seg_len, max=seqlen) - 1
    before = torch.clamp(starts - 1, min=0)
    return (docs[:, ends] == docs[:, before]).to(torch.float32).contiguous()


def _scan(local: torch.Tensor, h0: torch.Tensor | None, carry: torch.Tensor, heads: int, reverse: bool):
    """local [BH, NSEG, N] -> init [BH, NSEG, N]: the state (or its gradient) at each segment boundary."""
    bh, nseg, n = local.shape
    init = new_output(local.shape, torch.float32, local.device)
    block = 1024
    _scan_kernel[(bh, triton.cdiv(n, block))](local, init, h0 if h0 is not None else local, carry, nseg, n, heads,
                                              HAS_H0=h0 is not None, REVERSE=reverse, BLOCK=block)
    return init


def forward(q, k, v, docs, eps, kv0, ks0, output_final_state, plan: Plan):
    """Returns o, den [B,H,T], the per-segment initial states (or None), and the final state (or None)."""
    batch, seqlen, heads, _ = q.shape
    dv = v.shape[-1]
    nf = 1 + plan.F + plan.F * plan.F
    bh = batch * heads
    o = new_output((batch, seqlen, heads, dv), v.dtype, v.device)
    den = new_output((batch, heads, seqlen), torch.float32, v.device)
    common = dict(F=plan.F, FP=plan.FP, BT=plan.BT, BV=plan.BV, PREC=_precision(v.dtype), num_warps=plan.num_warps)
    strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o))
    consts = (eps, plan.c1, plan.c2, plan.inv_sqrt_f)
    h0 = None if kv0 is None else (kv0.reshape(bh, 1, nf, dv), ks0.reshape(bh, 1, nf))
    init = h0
    if plan.NSEG > 1:
        local_s = new_output((bh, plan.NSEG, nf, dv), torch.float32, v.device)
        local_z = new_output((bh, plan.NSEG, nf), torch.float32, v.device)
        grid = (plan.NV, plan.NSEG - 1, bh)
        _fwd_kernel[grid](q, k, v, docs, o, den, local_s, local_z, local_s, local_z,
                          seqlen, heads, dv, plan.seg_len, plan.NSEG, 0, *strides, *consts,
                          HAS_STATE_IN=False, STORE_STATE=True, STATE_ONLY=True, **common)
        carry = _segment_carry(docs, seqlen, plan.seg_len, plan.NSEG)
        init = (_scan(local_s.view(bh, plan.NSEG, -1), None if h0 is None else h0[0].reshape(bh, -1), carry,
                      heads, reverse=False).view(bh, plan.NSEG, nf, dv),
                _scan(local_z, None if h0 is None else h0[1].reshape(bh, -1), carry, heads, reverse=False))
    final = None
    if output_final_state:
        final = (new_output((batch, heads, nf, dv), torch.float32, v.device),
                 new_output((batch, heads, nf), torch.float32, v.device))
    s_in, z_in = init if init is not None else (o, o)
    s_out, z_out = final if final is not None else (o, o)
    _fwd_kernel[(plan.NV, plan.NSEG, bh)](q, k, v, docs, o, den, s_in, z_in, s_out, z_out,
                                          seqlen, heads, dv, plan.seg_len, plan.NSEG, 0, *strides, *consts,
                                          HAS_STATE_IN=init is not None, STORE_STATE=final is not None,
                                          STATE_ONLY=False, **common)
    return o, den, init, final


def backward(do, q, k, v, docs, o, den, init, d_final, need_d_initial: bool, plan: Plan):
    """Returns dq, dk, dv and the gradient of the initial state (or None)."""
    batch, seqlen, heads, f = q.shape
    dv_dim = v.shape[-1]
    nf = 1 + f * (f + 1)
    bh = batch * heads
    do = last_dim_contiguous(do)
    hh = new_output((batch, heads, seqlen), torch.float32, v.device)
    block_d = next_pow2(dv_dim)
    bt_hh = max(1, min(64, 4096 // block_d))
    _normalizer_grad_kernel[(triton.cdiv(seqlen, bt_hh), bh)](o, do, den, hh, seqlen, heads, dv_dim,
                                                               *_strides3(o), *_strides3(do), BT=bt_hh, BD=block_d)
    common = dict(F=plan.F, FP=plan.FP, BT=plan.BT, BV=plan.BV, PREC=_precision(v.dtype), num_warps=plan.num_warps)
    strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do))
    consts = (plan.c1, plan.c2, plan.inv_sqrt_f)
    dq_part = new_output((plan.NV, batch, seqlen, heads, f), torch.float32, v.device)
    dk_part = new_output((plan.NV, batch, seqlen, heads, f), torch.float32, v.device)
    dval = new_output(v.shape, v.dtype, v.device)
    s_in, z_in = init if init is not None else (o, o)
    _bwd_dq_kernel[(plan.NV, plan.NSEG, bh)](q, k, v, docs, do, den, hh, s_in, z_in, dq_part,
                                             seqlen, heads, dv_dim, plan.seg_len, plan.NSEG, *strides,
                                             *dq_part.stride()[:4], *consts,
                                             HAS_STATE_IN=init is not None, **common)
    ds_in = None if d_final is None else (d_final[0].reshape(bh, 1, nf, dv_dim), d_final[1].reshape(bh, 1, nf))
    dkv_strides = (*dk_part.stride()[:4], *_strides3(dval))
    if plan.NSEG > 1:
        local_s = new_output((bh, plan.NSEG, nf, dv_dim), torch.float32, v.device)
        local_z = new_output((bh, plan.NSEG, nf), torch.float32, v.device)
        _bwd_dkv_kernel[(plan.NV, plan.NSEG - 1, bh)](q, k, v, docs, do, den, hh, local_s, local_z, dk_part, dval,
                                                      local_s, local_z, seqlen, heads, dv_dim, plan.seg_len,
                                                      plan.NSEG, 1, *strides, *dkv_strides, *consts,
                                                      HAS_STATE_IN=False, STORE_STATE=True, STATE_ONLY=True,
                                                      **common)
        carry = _segment_carry(docs, seqlen, plan.seg_len, plan.NSEG)
        ds_in = (_scan(local_s.view(bh, plan.NSEG, -1), None if ds_in is None else ds_in[0].reshape(bh, -1), carry,
                       heads, reverse=True).view(bh, plan.NSEG, nf, dv_dim),
                 _scan(local_z, None if ds_in is None else ds_in[1].reshape(bh, -1), carry, heads, reverse=True))
    d_init = None
    if need_d_initial:
        d_init = (new_output((batch, heads, nf, dv_dim), torch.float32, v.device),
                  new_output((batch, heads, nf), torch.float32, v.device))
    ds_buf, dz_buf = ds_in if ds_in is not None else (o, o)
    dso, dzo = d_init if d_init is not None else (o, o)
    _bwd_dkv_kernel[(plan.NV, plan.NSEG, bh)](q, k, v, docs, do, den, hh, ds_buf, dz_buf, dk_part, dval, dso, dzo,
                                              seqlen, heads, dv_dim, plan.seg_len, plan.NSEG, 0, *strides,
                                              *dkv_strides, *consts,
                                              HAS_STATE_IN=ds_in is not None, STORE_STATE=d_init is not None,
                                              STATE_ONLY=False, **common)
    dq = dq_part.sum(0) if plan.NV > 1 else dq_part[0]
    dk = dk_part.sum(0) if plan.NV > 1 else dk_part[0]
    return dq.to(q.dtype), dk.to(k.dtype), dval, d_init


class TaylorLinearAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, docs, kv0, ks0, eps, output_final_state, plan):
        o, den, init, final = forward(q, k, v, docs, eps, kv0, ks0, output_final_state, plan)
        init_s, init_z = init if init is not None else (None, None)
        ctx.save_for_backward(q, k, v, docs, o, den, init_s, init_z)
        ctx.plan = plan
        if final is None:
            return o, None, None
        return o, final[0], final[1]

    @staticmethod
    def backward(ctx, do, d_kv, d_ks):
        q, k, v, docs, o, den, init_s, init_z = ctx.saved_tensors
        init = None if init_s is None else (init_s, init_z)
        d_final = None
        if d_kv is not None or d_ks is not None:
            ref = init_s if init_s is not None else q
            nf = 1 + q.shape[-1] * (q.shape[-1] + 1)
            shape = (q.shape[0], q.shape[2], nf)
            d_kv = d_kv if d_kv is not None else ref.new_zeros((*shape, v.shape[-1]), dtype=torch.float32)
            d_ks = d_ks if d_ks is not None else ref.new_zeros(shape, dtype=torch.float32)
            d_final = (d_kv.float().contiguous(), d_ks.float().contiguous())
        need_d_init = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
        dq, dk, dv, d_init = backward(do, q, k, v, docs, o, den, init, d_final, need_d_init, ctx.plan)
        d_kv0, d_ks0 = d_init if d_init is not None else (None, None)
        return dq, dk, dv, None, d_kv0, d_ks0, None, None, None


def taylor_linear_attention_triton(q, k, v, *, eps=1e-12, doc_ids=None, initial_state=None,
                                   output_final_state=False, chunk_size=None, block_v=None, segment_len=None,
                                   num_warps=None):
    """Triton path of `taylor_linear_attention` (arguments already validated); block sizes are tunable."""
    batch, seqlen, heads, f = q.shape
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    if doc_ids is None:
        docs = torch.zeros(batch, seqlen, dtype=torch.int32, device=q.device)
    else:
        docs = doc_ids.contiguous()
    plan = Plan(batch, seqlen, heads, f, v.shape[-1], q.device, chunk_size, block_v, segment_len, num_warps)
    kv0 = ks0 = None
    if initial_state is not None:
        # .float() and .contiguous() return the tensor itself when nothing changes, and stay differentiable
        kv0, ks0 = (s.float().contiguous() for s in initial_state)
    o, kv, ks = TaylorLinearAttentionFn.apply(q, k, v, docs, kv0, ks0, eps, output_final_state, plan)
    if output_final_state:
        return o, (kv, ks)
    return o


def taylor_linear_attention_step_triton(q, k, v, kv, k_sum, eps=1e-12):
    """One decode token (arguments already validated): updates kv, k_sum in place; returns (o, kv, k_sum)."""
    batch, heads, f = q.shape
    dv = v.shape[-1]
    fp = max(16, next_pow2(f))
    o = new_output((batch, heads, dv), v.dtype, v.device)
    block_v = 32 if dv > 16 else 16
    _step_kernel[(batch * heads,)](q, k, v, kv, k_sum, o, heads, dv, eps, f**-0.25, 1.0 / math.sqrt(2.0 * f),
                                   q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                   o.stride(0), o.stride(1), F=f, FP=fp, BV=block_v, num_warps=4)
    return o, kv, k_sum
