"""Triton gated short convolution: y = silu(conv(u1)) * u2 in one pass, backward in one pass.

Forward reads u1 (K shifted views of one tile, served from L1/L2), u2 and writes y: three tensors of
traffic instead of the unfused conv -> silu -> mul chain. Backward recomputes the conv at the K rows that
each input feeds (K^2 tile loads, again from cache), writes du1 and du2, and per-program partial weight
gradients that are summed on the host. At kernel size 3 without an initial state (the published configs) the
default backward is `_bwd_k3_rows_kernel`, which walks its rows in order and loads every row once
(`_bwd_k3_kernel`, the tile form that shares the shifted loads, is the other choice: K3_MODE).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import new_output, next_pow2
from .._pdl import pdl_options, release


@triton.jit
def _tap(U1, INIT, DOC, i_b, rows, doc_rows, doc0, mask_rows, offs_c, mask_c, shift, T,
         s1b, s1t, sib, sic, sik, KS: tl.constexpr, HAS_INIT: tl.constexpr):
    """u1 at rows - shift where it is in the same document (else 0; the initial state before position 0)."""
    src = rows - shift
    in_seq = (src >= 0) & mask_rows
    doc_src = tl.load(DOC + i_b.to(tl.int64) * T + src, mask=in_seq, other=0)
    ok = in_seq & (doc_src == doc_rows)
    x = tl.load(U1 + i_b.to(tl.int64) * s1b + src[:, None] * s1t + offs_c[None, :], mask=ok[:, None] & mask_c[None, :],
                other=0.0).to(tl.float32)
    if HAS_INIT:
        from_init = (src < 0) & mask_rows & (doc_rows == doc0)
        xi = tl.load(INIT + i_b.to(tl.int64) * sib + offs_c[None, :] * sic + (KS - 1 + src)[:, None] * sik,
                     mask=from_init[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        x += xi
    return x


@triton.jit
def _conv_at(U1, W, INIT, DOC, i_b, rows, doc_rows, doc0, mask_rows, offs_c, mask_c, T,
             s1b, s1t, swc, swk, sib, sic, sik, BT: tl.constexpr, BC: tl.constexpr, KS: tl.constexpr,
             HAS_INIT: tl.constexpr):
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(KS):
        w = tl.load(W + offs_c * swc + j * swk, mask=mask_c, other=0.0).to(tl.float32)
        x = _tap(U1, INIT, DOC, i_b, rows, doc_rows, doc0, mask_rows, offs_c, mask_c, KS - 1 - j, T,
                 s1b, s1t, sib, sic, sik, KS, HAS_INIT)
        acc += x * w[None, :]
    return acc


@triton.jit
def _fwd_kernel(U1, U2, W, DOC, INIT, Y, T, C,
                s1b, s1t, s2b, s2t, syb, syt, swc, swk, sib, sic, sik,
                KS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_INIT: tl.constexpr):
    i_t = tl.program_id(0)
    i_c = tl.program_id(1)
    i_b = tl.program_id(2)
    rows = i_t * BT + tl.arange(0, BT)
    mask_t = rows < T
    offs_c = i_c * BC + tl.arange(0, BC)
    mask_c = offs_c < C
    doc_rows = tl.load(DOC + i_b.to(tl.int64) * T + rows, mask=mask_t, other=0)
    doc0 = tl.load(DOC + i_b.to(tl.int64) * T)
    conv = _conv_at(U1, W, INIT, DOC, i_b, rows, doc_rows, doc0, mask_t, offs_c, mask_c, T,
                    s1b, s1t, swc, swk, sib, sic, sik, BT, BC, KS, HAS_INIT)
    mask = mask_t[:, None] & mask_c[None, :]
    u2 = tl.load(U2 + i_b.to(tl.int64) * s2b + rows[:, None] * s2t + offs_c[None, :], mask=mask, other=0.0)
    y = conv * tl.sigmoid(conv) * u2.to(tl.float32)
    tl.store(Y + i_b.to(tl.int64) * syb + rows[:, None] * syt + offs_c[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(U1, U2, W, DOC, INIT, DY, DU1, DU2, DW_PART, T, C,
                s1b, s1t, s2b, s2t, sdyb, sdyt, sd1b, sd1t, sd2b, sd2t, swc, swk, sib, sic, sik,
                KS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_INIT: tl.constexpr):
    i_t = tl.program_id(0)
    i_c = tl.program_id(1)
    i_b = tl.program_id(2)
    rows = i_t * BT + tl.arange(0, BT)
    mask_t = rows < T
    offs_c = i_c * BC + tl.arange(0, BC)
    mask_c = offs_c < C
    doc_ptr = DOC + i_b.to(tl.int64) * T
    doc_rows = tl.load(doc_ptr + rows, mask=mask_t, other=0)
    doc0 = tl.load(doc_ptr)
    du1 = tl.zeros([BT, BC], dtype=tl.float32)
    # input row t feeds the outputs t + s (s = 0 .. K-1) through tap K-1-s
    for s in tl.static_range(KS):
        out_rows = rows + s
        mask_o = out_rows < T
        doc_o = tl.load(doc_ptr + out_rows, mask=mask_o, other=0)
        conv = _conv_at(U1, W, INIT, DOC, i_b, out_rows, doc_o, doc0, mask_o, offs_c, mask_c, T,
                        s1b, s1t, swc, swk, sib, sic, sik, BT, BC, KS, HAS_INIT)
        mask = mask_o[:, None] & mask_c[None, :]
        dy = tl.load(DY + i_b.to(tl.int64) * sdyb + out_rows[:, None] * sdyt + offs_c[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        u2 = tl.load(U2 + i_b.to(tl.int64) * s2b + out_rows[:, None] * s2t + offs_c[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        sig = tl.sigmoid(conv)
        dconv = dy * u2 * sig * (1.0 + conv * (1.0 - sig))
        w = tl.load(W + offs_c * swc + (KS - 1 - s) * swk, mask=mask_c, other=0.0).to(tl.float32)
        feeds = mask_o & (doc_o == doc_rows)
        du1 += tl.where(feeds[:, None], dconv * w[None, :], 0.0)
        if s == 0:
            own_mask = mask
            tl.store(DU2 + i_b.to(tl.int64) * sd2b + rows[:, None] * sd2t + offs_c[None, :],
                     (dy * conv * sig).to(DU2.dtype.element_ty), mask=own_mask)
            # weight gradient of this tile: sum over rows of dconv * (input of each tap)
            part = DW_PART + ((i_b * tl.num_programs(0) + i_t) * KS).to(tl.int64) * C
            for j in tl.static_range(KS):
                x = _tap(U1, INIT, DOC, i_b, rows, doc_rows, doc0, mask_t, offs_c, mask_c, KS - 1 - j, T,
                         s1b, s1t, sib, sic, sik, KS, HAS_INIT)
                tl.store(part + j * C + offs_c, tl.sum(dconv * x, axis=0), mask=mask_c)
    tl.store(DU1 + i_b.to(tl.int64) * sd1b + rows[:, None] * sd1t + offs_c[None, :], du1.to(DU1.dtype.element_ty),
             mask=mask_t[:, None] & mask_c[None, :])


@triton.jit
def _step_kernel(U1, U2, W, STATE, Y, C, s1b, s2b, syb, swc, swk, ssb, ssc, ssk,
                 KS: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, PDL: tl.constexpr):
    """One decode token: shift the [C, K] input history left, append u1, y = silu(history . w) * u2."""
    release(PDL)  # kernels/_pdl.py: everything below may depend on the kernel before
    i_c = tl.program_id(0)
    i_b = tl.program_id(1)
    offs_c = i_c * BC + tl.arange(0, BC)
    mask_c = offs_c < C
    offs_k = tl.arange(0, BK)
    state_ptr = STATE + i_b.to(tl.int64) * ssb + offs_c[:, None] * ssc
    older = tl.load(state_ptr + (offs_k[None, :] + 1) * ssk, mask=mask_c[:, None] & (offs_k[None, :] + 1 < KS),
                    other=0.0)
    u1 = tl.load(U1 + i_b * s1b + offs_c, mask=mask_c, other=0.0)
    hist = tl.where(offs_k[None, :] == KS - 1, u1[:, None].to(older.dtype), older)
    w = tl.load(W + offs_c[:, None] * swc + offs_k[None, :] * swk, mask=mask_c[:, None] & (offs_k[None, :] < KS),
                other=0.0)
    conv = tl.sum(hist.to(tl.float32) * w.to(tl.float32), axis=1)
    u2 = tl.load(U2 + i_b * s2b + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(Y + i_b * syb + offs_c, (conv * tl.sigmoid(conv) * u2).to(Y.dtype.element_ty), mask=mask_c)
    # all reads of the old history happen before any slot is overwritten
    tl.debug_barrier()
    tl.store(state_ptr + offs_k[None, :] * ssk, hist, mask=mask_c[:, None] & (offs_k[None, :] < KS))


@triton.jit
def _row(P, i_b, rows, mask_rows, s_b, s_t, offs_c, mask_c):
    """Tile [BT, BC] of P at `rows` (zero outside `mask_rows` and the channels), in fp32."""
    return tl.load(P + i_b.to(tl.int64) * s_b + rows[:, None] * s_t + offs_c[None, :],
                   mask=mask_rows[:, None] & mask_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def _same(DOC, i_b, rows, doc_rows, T, shift, HAS_DOC: tl.constexpr):
    """[BT, 1] fp32: 1 where row + shift exists and is in the document of row (always 1 without documents)."""
    other = rows + shift
    ok = (other >= 0) & (other < T)
    if HAS_DOC:
        ok = ok & (tl.load(DOC + i_b.to(tl.int64) * T + other, mask=ok, other=-1) == doc_rows)
    return ok.to(tl.float32)[:, None]


@triton.jit
def _docs_of(DOC, i_b, rows, mask_rows, T, HAS_DOC: tl.constexpr):
    """The document ids of `rows` (the row indices themselves without documents: `_same` then ignores them)."""
    if HAS_DOC:
        return tl.load(DOC + i_b.to(tl.int64) * T + rows, mask=mask_rows, other=0)
    return rows


@triton.jit
def _dconv(conv, dy, u2):
    """d(silu(conv) * u2)/dconv * dy, and silu's sigmoid."""
    sig = tl.sigmoid(conv)
    return dy * u2 * sig * (1.0 + conv * (1.0 - sig)), sig


@triton.jit
def _bwd_k3_kernel(U1, U2, W, DOC, DY, DU1, DU2, DW_PART, T, C,
                   s1b, s1t, s2b, s2t, sdyb, sdyt, sd1b, sd1t, sd2b, sd2t, swc, swk, N_T,
                   BT: tl.constexpr, BC: tl.constexpr, HAS_DOC: tl.constexpr, CHANNELS_FIRST: tl.constexpr):
    """The backward of kernel size 3 without an initial state (the published configs).

    `_bwd_kernel` recomputes the conv of every output row that an input row feeds: K^2 + K shifted u1 tile
    loads, K of dy and of u2 per element (18 at K = 3), each with its own document masks. Here the five shifted
    u1 tiles t-2 .. t+2 are loaded once and the three convs t, t+1, t+2 formed from them in registers (11 tile
    loads per element), and each document test is one [BT] vector per shift. The shifted loads are served by
    L1/L2 but still bound the kernel (f+b 1.15 ms against a 0.44 ms floor on the H200, docs/PERFORMANCE.md).
    Tap j multiplies u1[t - (2 - j)]: w2 the current token, w0 the token two back. CHANNELS_FIRST: the grid's
    first axis walks the channel blocks (programs that run together read whole rows), else the row tiles.
    """
    if CHANNELS_FIRST:
        i_c = tl.program_id(0)
        i_t = tl.program_id(1)
    else:
        i_t = tl.program_id(0)
        i_c = tl.program_id(1)
    i_b = tl.program_id(2)
    rows = i_t * BT + tl.arange(0, BT)
    offs_c = i_c * BC + tl.arange(0, BC)
    mask_c = offs_c < C
    mask_t = rows < T
    doc_rows = _docs_of(DOC, i_b, rows, mask_t, T, HAS_DOC)
    w0 = tl.load(W + offs_c * swc, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(W + offs_c * swc + swk, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(W + offs_c * swc + 2 * swk, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    # output row t: its taps u1[t-2], u1[t-1] (masked to its document) and u1[t]
    back2 = _row(U1, i_b, rows - 2, (rows >= 2) & mask_t, s1b, s1t, offs_c, mask_c) \
        * _same(DOC, i_b, rows, doc_rows, T, -2, HAS_DOC)
    e_m1 = _same(DOC, i_b, rows, doc_rows, T, -1, HAS_DOC)
    x_m1 = _row(U1, i_b, rows - 1, (rows >= 1) & mask_t, s1b, s1t, offs_c, mask_c)
    x_0 = _row(U1, i_b, rows, mask_t, s1b, s1t, offs_c, mask_c)
    back1 = x_m1 * e_m1
    conv = back2 * w0 + back1 * w1 + x_0 * w2
    dy = _row(DY, i_b, rows, mask_t, sdyb, sdyt, offs_c, mask_c)
    d0, sig = _dconv(conv, dy, _row(U2, i_b, rows, mask_t, s2b, s2t, offs_c, mask_c))
    mask = mask_t[:, None] & mask_c[None, :]
    tl.store(DU2 + i_b.to(tl.int64) * sd2b + rows[:, None] * sd2t + offs_c[None, :],
             (dy * conv * sig).to(DU2.dtype.element_ty), mask=mask)
    part = DW_PART + ((i_b * N_T + i_t) * 3).to(tl.int64) * C
    tl.store(part + offs_c, tl.sum(d0 * back2, axis=0), mask=mask_c)
    tl.store(part + C + offs_c, tl.sum(d0 * back1, axis=0), mask=mask_c)
    tl.store(part + 2 * C + offs_c, tl.sum(d0 * x_0, axis=0), mask=mask_c)
    du1 = d0 * w2
    # output row t+1 (reads u1[t-1], u1[t], u1[t+1] within the document of row t+1)
    rows1 = rows + 1
    mask1 = rows1 < T
    doc1 = _docs_of(DOC, i_b, rows1, mask1, T, HAS_DOC)
    e10 = _same(DOC, i_b, rows1, doc1, T, -1, HAS_DOC)  # row t in the document of row t+1
    x_p1 = _row(U1, i_b, rows1, mask1, s1b, s1t, offs_c, mask_c)
    conv = x_m1 * _same(DOC, i_b, rows1, doc1, T, -2, HAS_DOC) * w0 + x_0 * e10 * w1 + x_p1 * w2
    d1, _ = _dconv(conv, _row(DY, i_b, rows1, mask1, sdyb, sdyt, offs_c, mask_c),
                   _row(U2, i_b, rows1, mask1, s2b, s2t, offs_c, mask_c))
    du1 += d1 * e10 * w1
    # output row t+2 (reads u1[t], u1[t+1], u1[t+2])
    rows2 = rows + 2
    mask2 = rows2 < T
    doc2 = _docs_of(DOC, i_b, rows2, mask2, T, HAS_DOC)
    e20 = _same(DOC, i_b, rows2, doc2, T, -2, HAS_DOC)  # row t in the document of row t+2
    x_p2 = _row(U1, i_b, rows2, mask2, s1b, s1t, offs_c, mask_c)
    conv = x_0 * e20 * w0 + x_p1 * _same(DOC, i_b, rows2, doc2, T, -1, HAS_DOC) * w1 + x_p2 * w2
    d2, _ = _dconv(conv, _row(DY, i_b, rows2, mask2, sdyb, sdyt, offs_c, mask_c),
                   _row(U2, i_b, rows2, mask2, s2b, s2t, offs_c, mask_c))
    du1 += d2 * e20 * w0
    tl.store(DU1 + i_b.to(tl.int64) * sd1b + rows[:, None] * sd1t + offs_c[None, :], du1.to(DU1.dtype.element_ty),
             mask=mask)


@triton.jit
def _vec(P, i_b, t, s_b, s_t, offs_c, mask_c, T):
    """Row t of P over the channel block, fp32 (zero outside 0 <= t < T)."""
    return tl.load(P + i_b.to(tl.int64) * s_b + t * s_t + offs_c, mask=_row_ok(t, mask_c, offs_c, T),
                   other=0.0).to(tl.float32)


@triton.jit
def _row_ok(t, mask_c, offs_c, T):
    """mask_c where 0 <= t < T (t broadcast over the channels first: Triton's interpreter cannot mix a scalar
    condition into a block mask)."""
    rows = t + offs_c * 0
    return mask_c & (rows >= 0) & (rows < T)


@triton.jit
def _doc_at(DOC, i_b, t, T, HAS_DOC: tl.constexpr):
    """The document id of row t (-1 outside the sequence; 0 without documents)."""
    if HAS_DOC:
        return tl.load(DOC + i_b.to(tl.int64) * T + t, mask=(t >= 0) & (t < T), other=-1)
    return tl.where((t >= 0) & (t < T), 0, -1)


@triton.jit
def _bwd_k3_rows_kernel(U1, U2, W, DOC, DY, DU1, DU2, DW_PART, T, C,
                        s1b, s1t, s2b, s2t, sdyb, sdyt, sd1b, sd1t, sd2b, sd2t, swc, swk,
                        ROWS: tl.constexpr, BC: tl.constexpr, HAS_DOC: tl.constexpr):
    """The kernel-size-3 backward walking its rows in order: every u1, dy, u2 row loaded once.

    One program: a channel block and ROWS rows r0 .. r0+ROWS-1. At row t it forms conv[t] from u1[t] and the two
    rows before it (carried in registers), then dconv[t] and du2[t]; du1[t-2] needs dconv[t-2 .. t], so it is
    written two rows late (the walk runs two rows past the block; those rows only feed du1). No shifted reloads,
    no recomputed conv: a streaming kernel whose parallelism comes from many programs in flight.
    """
    i_c = tl.program_id(0)
    i_r = tl.program_id(1)
    i_b = tl.program_id(2)
    r0 = i_r * ROWS
    offs_c = i_c * BC + tl.arange(0, BC)
    mask_c = offs_c < C
    w0 = tl.load(W + offs_c * swc, mask=mask_c, other=0.0).to(tl.float32)
    w1 = tl.load(W + offs_c * swc + swk, mask=mask_c, other=0.0).to(tl.float32)
    w2 = tl.load(W + offs_c * swc + 2 * swk, mask=mask_c, other=0.0).to(tl.float32)
    x2 = _vec(U1, i_b, r0 - 2, s1b, s1t, offs_c, mask_c, T)  # u1[t-2]
    x1 = _vec(U1, i_b, r0 - 1, s1b, s1t, offs_c, mask_c, T)  # u1[t-1]
    doc2 = _doc_at(DOC, i_b, r0 - 2, T, HAS_DOC)
    doc1 = _doc_at(DOC, i_b, r0 - 1, T, HAS_DOC)
    g2 = tl.zeros([BC], dtype=tl.float32)  # dconv[t-2]
    g1 = tl.zeros([BC], dtype=tl.float32)  # dconv[t-1]
    dw0 = tl.zeros([BC], dtype=tl.float32)
    dw1 = tl.zeros([BC], dtype=tl.float32)
    dw2 = tl.zeros([BC], dtype=tl.float32)
    for i in range(ROWS + 2):
        t = r0 + i
        doc0 = _doc_at(DOC, i_b, t, T, HAS_DOC)
        x0 = _vec(U1, i_b, t, s1b, s1t, offs_c, mask_c, T)
        back1 = x1 * (doc1 == doc0).to(tl.float32)
        back2 = x2 * (doc2 == doc0).to(tl.float32)
        conv = back2 * w0 + back1 * w1 + x0 * w2
        dy = _vec(DY, i_b, t, sdyb, sdyt, offs_c, mask_c, T)
        g0, sig = _dconv(conv, dy, _vec(U2, i_b, t, s2b, s2t, offs_c, mask_c, T))
        if i < ROWS:  # rows past the block only feed du1 of the block's last two rows
            tl.store(DU2 + i_b.to(tl.int64) * sd2b + t * sd2t + offs_c, (dy * conv * sig).to(DU2.dtype.element_ty),
                     mask=_row_ok(t, mask_c, offs_c, T))
            dw0 += g0 * back2
            dw1 += g0 * back1
            dw2 += g0 * x0
        if i >= 2:  # du1[t-2] from dconv[t-2], dconv[t-1], dconv[t] (each in the document of row t-2)
            du1 = g2 * w2 + g1 * (doc1 == doc2).to(tl.float32) * w1 + g0 * (doc0 == doc2).to(tl.float32) * w0
            tl.store(DU1 + i_b.to(tl.int64) * sd1b + (t - 2) * sd1t + offs_c, du1.to(DU1.dtype.element_ty),
                     mask=_row_ok(t - 2, mask_c, offs_c, T))
        x2, x1, doc2, doc1, g2, g1 = x1, x0, doc1, doc0, g1, g0
    part = DW_PART + ((i_b * tl.num_programs(1) + i_r) * 3).to(tl.int64) * C
    tl.store(part + offs_c, dw0, mask=mask_c)
    tl.store(part + C + offs_c, dw1, mask=mask_c)
    tl.store(part + 2 * C + offs_c, dw2, mask=mask_c)


# ----------------------------------------------------------------------------------------------------------
# host side

BLOCK_T = 32
BLOCK_C = 128


def _init_strides(init: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if init is None else (init.stride(0), init.stride(1), init.stride(2))


def _docs(docs: torch.Tensor | None, u1: torch.Tensor) -> torch.Tensor:
    """The document ids the general kernels read (one document per row when None)."""
    return docs if docs is not None else torch.zeros(u1.shape[:2], dtype=torch.int32, device=u1.device)


def forward(u1, u2, weight, docs, init):
    """y [B, T, C] = silu(conv(u1)) * u2 (inputs' last dims contiguous; docs [B, T] or None; init [B, C, K-1]
    or None)."""
    batch, seqlen, channels = u1.shape
    ks = weight.shape[1]
    docs = _docs(docs, u1)
    y = new_output(u1.shape, u1.dtype, u1.device)
    grid = (triton.cdiv(seqlen, BLOCK_T), triton.cdiv(channels, BLOCK_C), batch)
    _fwd_kernel[grid](u1, u2, weight, docs, init if init is not None else u1, y, seqlen, channels,
                      u1.stride(0), u1.stride(1), u2.stride(0), u2.stride(1), y.stride(0), y.stride(1),
                      weight.stride(0), weight.stride(1), *_init_strides(init),
                      KS=ks, BT=BLOCK_T, BC=BLOCK_C, HAS_INIT=init is not None, num_warps=4)
    return y


# tiles of the kernel-size-3 backward: the best of two bench/kernels.py --sweep --only conv runs on the H200
# (1.3B shape, C 3584, B 16 x T 2048: f+b 1.151 ms against 1.676 at 32 x 128 / 8 warps; docs/PERFORMANCE.md)
K3_BLOCK_T = 64
K3_BLOCK_C = 32
K3_WARPS = 4
K3_CHANNELS_FIRST = False
# False: every backward runs the general kernel (bench/kernels.py times both)
USE_K3 = True
# "rows" (the default): _bwd_k3_rows_kernel, K3_ROWS rows per program over K3_ROWS_BLOCK_C channels; "tile":
# _bwd_k3_kernel. bench/kernels.py --sweep --only conv on the H200 (2026-12-01, 1.3B shape C 3584, B 16 x T 2048,
# f+b ms, two runs): rows 32 x 512 / 4 warps 0.846 and 0.849, rows 64 x 512 1.047, 128 x 512 0.974, 16 x 512 0.976,
# 64 x 256 0.998; the best tile (64 x 32, 4 warps) 1.151 and 1.150 (docs/PERFORMANCE.md). At the 360M shape (C 2048)
# repeated runs of one configuration differed by up to 40%, so neither form was shown faster there.
K3_MODE = "rows"
K3_ROWS = 32
K3_ROWS_BLOCK_C = 512
K3_ROWS_WARPS = 4


def backward(dy, u1, u2, weight, docs, init):
    """du1, du2 [B, T, C] and dweight [C, K] (contiguous) of `forward`."""
    batch, seqlen, channels = u1.shape
    ks = weight.shape[1]
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    du1 = new_output(u1.shape, u1.dtype, u1.device)
    du2 = new_output(u2.shape, u2.dtype, u2.device)
    k3 = USE_K3 and ks == 3 and init is None
    rows = k3 and K3_MODE == "rows"
    block_t = (K3_ROWS if rows else K3_BLOCK_T) if k3 else BLOCK_T
    block_c = (K3_ROWS_BLOCK_C if rows else K3_BLOCK_C) if k3 else BLOCK_C
    n_t = triton.cdiv(seqlen, block_t)
    dw_part = new_output((batch * n_t, ks, channels), torch.float32, u1.device)
    n_c = triton.cdiv(channels, block_c)
    channels_first = k3 and (rows or K3_CHANNELS_FIRST)
    grid = (n_c, n_t, batch) if channels_first else (n_t, n_c, batch)
    strides = (u1.stride(0), u1.stride(1), u2.stride(0), u2.stride(1), dy.stride(0), dy.stride(1),
               du1.stride(0), du1.stride(1), du2.stride(0), du2.stride(1), weight.stride(0), weight.stride(1))
    if rows:
        _bwd_k3_rows_kernel[grid](u1, u2, weight, docs if docs is not None else u1, dy, du1, du2, dw_part,
                                  seqlen, channels, *strides, ROWS=block_t, BC=block_c, HAS_DOC=docs is not None,
                                  num_warps=K3_ROWS_WARPS)
    elif k3:
        _bwd_k3_kernel[grid](u1, u2, weight, docs if docs is not None else u1, dy, du1, du2, dw_part,
                             seqlen, channels, *strides, n_t, BT=block_t, BC=block_c, HAS_DOC=docs is not None,
                             CHANNELS_FIRST=channels_first, num_warps=K3_WARPS)
    else:
        _bwd_kernel[grid](u1, u2, weight, _docs(docs, u1), init if init is not None else u1, dy, du1, du2,
                          dw_part, seqlen, channels, *strides, *_init_strides(init),
                          KS=ks, BT=block_t, BC=block_c, HAS_INIT=init is not None, num_warps=4)
    dw = dw_part.sum(0).t().to(weight.dtype).contiguous()
    return du1, du2, dw


def short_conv_gated_step_triton(u1, u2, weight, conv_state):
    """One decode token (arguments already validated); conv_state [B, C, K] updated in place."""
    batch, channels = u1.shape
    ks = weight.shape[1]
    y = new_output(u1.shape, u1.dtype, u1.device)
    block_c = 128
    _step_kernel[(triton.cdiv(channels, block_c), batch)](
        u1, u2, weight, conv_state, y, channels, u1.stride(0), u2.stride(0), y.stride(0),
        weight.stride(0), weight.stride(1), *conv_state.stride(), KS=ks, BK=next_pow2(ks), BC=block_c, num_warps=4,
        **pdl_options(u1.device, "mixer"))
    return y
