"""Kernel benchmark on one CUDA GPU: our Triton kernels against peers and the computed floor.

    python bench/kernels.py [--out results.json] [--sweep [--sweep-only]] [--skip-peers] [--only la,swa,conv,decode]
                            [--only tk --tk-dir TK_DIR]   # ThunderKittens' Based forward (bench/tk_based.sh)

--sweep times candidate tiles per shape (linear attention: Dv 64/112/128 x T; window: (W, D) of the
published models) against the built-in defaults and prints the winners as kernels/tiles.py entries for
this device kind (H100 / H200 / default); the timings after it use them.

bf16, B*T = 32,768 tokens, 16 heads. Linear attention (feature dim 16) at value head dims 64 (360M),
112 (1.3B) and 128 (the shape measured in docs/../measured_h100); sliding window at head dims 64, 112, 128;
T = 2048, 4096, 8192. Times (ms) are medians over replays of a CUDA graph of many calls (bench_ms;
--eager-timing: triton.testing.do_bench around each eager call); "f+b" is forward plus backward
(torch.autograd.grad of the output with a random cotangent). The floor is max(FLOPs / measured bf16
matmul rate, bytes / measured copy bandwidth) per pass, with the FLOPs of the algorithm our kernels run
(273 features, 64-token chunks) and each tensor read or written once.
FLA peers need fla-core (pip install fla-core==0.6.0); flex_attention needs torch >= 2.5.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKENS = 32768
HEADS = 16
FEATURE_DIM = 16
SEQLENS = (2048, 4096, 8192)
LA_SHAPES = (("360M", 64), ("1.3B", 112), ("dv128", 128))
# (name, head dim, window, sequence lengths): the measured d128 window-64 shape at every T, the models at 2048
SWA_SHAPES = (("d128", 128, 64, SEQLENS), ("360M", 64, 128, (2048,)), ("1.3B", 112, 128, (2048,)))
CONV_SHAPES = (("360M", 2048), ("1.3B", 3584))
CHUNK = 64


# Time replays of a CUDA graph of many calls (--eager-timing: events around each eager call instead)
GRAPH_TIMING = True
FELL_BACK: list = []  # the failed capture that turned graph timing off mid-run (the JSON says so)
_STREAM: list = []  # the side stream that graph timing warms up, captures and replays on (made at first use)


def timing_stream():
    """The stream bench_ms captures on; inputs that need autograd are made on it too (fwd_and_fwdbwd), since
    a leaf whose AccumulateGrad node belongs to the default stream breaks the capture of a backward."""
    if not _STREAM:
        _STREAM.append(torch.cuda.Stream())
    return _STREAM[0]


def _graph_ms(fn, rep_ms: float = 50.0) -> float:
    stream = timing_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        end.synchronize()
        calls = max(1, min(500, int(rep_ms / max(start.elapsed_time(end) / 3, 1e-3))))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
        graph.replay()
        times = []
        for _ in range(10):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
    del graph
    torch.cuda.current_stream().wait_stream(stream)
    return sorted(times)[len(times) // 2]


def bench_ms(fn) -> float:
    """Median ms per call of fn. By default from replays of one CUDA graph that holds enough calls for ~50 ms:
    the kernels' own time, without the host's dispatch gaps between them, which are as long as a 0.2-1 ms
    kernel on the H200 machine and made the eager timings of one configuration vary by up to 2x
    (docs/PERFORMANCE.md); the trainer queues its kernels ahead of the GPU, so the gaps are not on its
    critical path. With GRAPH_TIMING off, or after a capture fails (it is then turned off for the rest of the
    run: a failed capture can leave the CUDA RNG unusable for the next), the eager median of triton's do_bench."""
    from triton.testing import do_bench

    global GRAPH_TIMING
    if GRAPH_TIMING:
        try:
            return _graph_ms(fn)
        except Exception as err:
            GRAPH_TIMING = False
            FELL_BACK.append(f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
            print(f"  (graph capture failed; eager timing from here on: {FELL_BACK[0]})", flush=True)
            torch.cuda.synchronize()
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measure_ceilings() -> dict:
    """Device-to-device copy bandwidth (read + write bytes) and the bf16 8192^3 matmul rate, each call timed
    eagerly (triton's do_bench), as peak rates: replayed from a CUDA graph the copy read 2.77 TB/s against 4.22
    eagerly on the H200 and the matmul 679 against 737 TFLOP/s (not investigated), which raised every floor."""
    from triton.testing import do_bench

    src = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
    return {"bandwidth_Bps": 2 * 2**30 / (copy_ms * 1e-3), "matmul_flops": 2 * 8192**3 / (mm_ms * 1e-3)}


def floor_ms(flops: float, nbytes: float, ceil: dict) -> float:
    return 1e3 * max(flops / ceil["matmul_flops"], nbytes / ceil["bandwidth_Bps"])


def la_floor(n: int, dv: int, ceil: dict) -> tuple[float, float]:
    """n token-heads. Forward: readout + update (4 NF Dv) and the intra-chunk block; backward: state
    recompute, dq readout, dv, dk and dS update (10 NF Dv) and the intra-chunk grads."""
    nf = 1 + FEATURE_DIM + FEATURE_DIM**2
    f = FEATURE_DIM
    fwd = floor_ms(n * (4 * nf * dv + 2 * CHUNK * (f + dv)), n * 2 * (2 * f + 2 * dv), ceil)
    bwd = floor_ms(n * (10 * nf * dv + 2 * CHUNK * (4 * f + 3 * dv)), n * 2 * (4 * f + 4 * dv), ceil)
    return fwd, fwd + bwd


def swa_floor(n: int, d: int, window: int, ceil: dict) -> tuple[float, float]:
    """Forward: q, k, v, o once; forward+backward: q, k, v, o, dO, dQ, dK, dV once (the issue's floor)."""
    keys = window + 1
    fwd = floor_ms(n * 4 * keys * d, n * 2 * 4 * d, ceil)
    total = floor_ms(n * 14 * keys * d, n * 2 * 8 * d, ceil)
    return fwd, total


def conv_floor(tokens: int, channels: int, ceil: dict) -> tuple[float, float]:
    """Forward: u1, u2, y; forward+backward adds dy, du1, du2 and re-reads u1, u2."""
    per = tokens * channels * 2
    return floor_ms(0, 3 * per, ceil), floor_ms(0, 8 * per, ceil)


def fwd_and_fwdbwd(fn, inputs, out_grad=None):
    """Times of fn(*inputs) and of forward + torch.autograd.grad w.r.t. the float inputs that require grad.
    With graph timing everything runs on bench_ms's stream, on copies of those inputs made there: a leaf
    whose AccumulateGrad node belongs to another stream breaks the capture of the backward."""
    if not GRAPH_TIMING:
        return _fwd_and_fwdbwd(fn, inputs, out_grad)
    stream = timing_stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            inputs = [x.detach().clone().requires_grad_() if isinstance(x, torch.Tensor) and x.requires_grad else x
                      for x in inputs]
            return _fwd_and_fwdbwd(fn, inputs, out_grad)
    finally:
        torch.cuda.current_stream().wait_stream(stream)


def _fwd_and_fwdbwd(fn, inputs, out_grad):
    with torch.no_grad():
        fwd = bench_ms(lambda: fn(*inputs))
    diff = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    out = fn(*inputs)
    cot = torch.randn_like(out) if out_grad is None else out_grad

    def step():
        torch.autograd.grad(fn(*inputs), diff, cot)

    return fwd, bench_ms(step)


def try_time(label: str, fn, *args, **kwargs):
    try:
        return fwd_and_fwdbwd(fn, *args, **kwargs)
    except Exception as err:  # a peer that fails at a shape is reported, not fatal
        print(f"  [{label}] failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
        return None


def la_inputs(batch, seqlen, dv):
    q = torch.randn(batch, seqlen, HEADS, FEATURE_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, seqlen, HEADS, FEATURE_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, seqlen, HEADS, dv, device="cuda", dtype=torch.bfloat16)
    return [t.requires_grad_() for t in (q, k, v)]


def sdpa_inputs(batch, seqlen, d):
    return [
        torch.randn(batch, HEADS, seqlen, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
        for _ in range(3)
    ]


def sdpa_causal(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def bench_linear_attention(ceil, peers: bool, rows: list) -> None:
    from kernels.taylor_linear_attn.triton_impl import taylor_linear_attention_triton

    fla = _import_fla() if peers else None
    for name, dv in LA_SHAPES:
        for seqlen in _seqlens():
            batch = TOKENS // seqlen
            row = {"op": "linear_attn", "shape": f"{name} H16 F16 Dv{dv}", "T": seqlen, "B": batch}
            row["floor"] = la_floor(TOKENS * HEADS, dv, ceil)
            inputs = la_inputs(batch, seqlen, dv)
            # block sizes: kernels/tiles.py for this device and shape (the built-in defaults where it has none)
            row["ours"] = try_time("ours", taylor_linear_attention_triton, inputs)
            if fla is not None:
                row["fla_fused_chunk"] = try_time("fla fused_chunk", fla.fused_chunk_based, inputs)
                row["fla_parallel"] = try_time("fla parallel", fla.parallel_based, inputs)
            if peers:
                row["sdpa_causal"] = try_time("sdpa", sdpa_causal, sdpa_inputs(batch, seqlen, dv))
            _report(row, rows)


def bench_la_parts(rows: list) -> None:
    """Time of each linear-attention kernel at B 16, T 2048, Dv 128 (where the f+b time goes)."""
    from kernels.taylor_linear_attn import triton_impl as la
    from kernels.taylor_linear_attn.plan import tiles_arg

    q, k, v = la_inputs(16, 2048, 128)
    docs = torch.zeros(16, 2048, dtype=torch.int32, device="cuda")
    plan = la.Plan.for_call(q, v, tiles_arg())
    o, den, states, _ = la.forward(q, k, v, docs, 1e-12, None, None, False, plan)
    do = torch.randn_like(o)
    hh = torch.zeros_like(den)
    parts = {
        "state pass (forward)": lambda: la._state_pass(k, v, docs, None, None, None, plan, False, False),
        "forward (state pass + output)": lambda: la.forward(q, k, v, docs, 1e-12, None, None, False, plan),
        "state pass (reverse)": lambda: la._state_pass(q, do, docs, den, hh, None, plan, True, False),
        "backward (all)": lambda: la.backward(do, q, k, v, docs, o, den, states, None, False, plan),
    }
    state_bytes = states[0].numel() * states[0].element_size()
    print(f"  la parts: chunk states {state_bytes / 1e6:.0f} MB per pass", flush=True)
    for name, fn in parts.items():
        ms = bench_ms(fn)
        print(f"  la part {name}: {ms:.3f} ms", flush=True)
        rows.append({"op": "la_part", "shape": name, "T": 2048, "B": 16, "ms": ms, "state_MB": state_bytes / 1e6})


def _seqlens() -> tuple[int, ...]:
    return SEQLENS


def bench_sliding_window(ceil, peers: bool, rows: list) -> None:
    from kernels.sliding_window.triton_impl import sliding_window_attention_triton

    fla = _import_fla() if peers else None
    for name, d, window, seqlens in SWA_SHAPES:
        for seqlen in seqlens:
            batch = TOKENS // seqlen
            row = {"op": f"swa w{window}", "shape": f"{name} H16 D{d}", "T": seqlen, "B": batch}
            row["floor"] = swa_floor(TOKENS * HEADS, d, window, ceil)
            q, k, v = (
                torch.randn(batch, seqlen, HEADS, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
                for _ in range(3)
            )
            row["ours"] = try_time(
                "ours",
                lambda q, k, v, w=window: sliding_window_attention_triton(q, k, v, window=w),
                [q, k, v],
            )
            if peers:
                row["flex"] = try_time(
                    "flex", _flex_window(batch, seqlen, window), sdpa_inputs(batch, seqlen, d)
                )
                if fla is not None:
                    # FLA's window counts the query itself: window_size = previous tokens + 1
                    row["fla_parallel_attn"] = try_time(
                        "fla parallel_attn",
                        lambda q, k, v, w=window: fla.parallel_attn(q, k, v, window_size=w + 1),
                        [q, k, v],
                    )
            _report(row, rows)


def bench_short_conv(ceil, rows: list) -> None:
    from kernels.short_conv import short_conv_gated, short_conv_gated_reference

    seqlen = 2048
    batch = TOKENS // seqlen
    for name, channels in CONV_SHAPES:
        row = {"op": "short_conv", "shape": f"{name} C{channels} K3", "T": seqlen, "B": batch}
        row["floor"] = conv_floor(TOKENS, channels, ceil)
        u = torch.randn(batch, seqlen, 2 * channels, device="cuda", dtype=torch.bfloat16).requires_grad_()
        w = torch.randn(channels, 3, device="cuda").requires_grad_()
        row["ours"] = try_time("ours", lambda u, w: short_conv_gated(*u.chunk(2, -1), w), [u, w])
        with _conv_backward(use_k3=False):  # the general (any K, initial state) backward, for comparison
            row["ours_general_bwd"] = try_time("ours general", lambda u, w: short_conv_gated(*u.chunk(2, -1), w),
                                               [u, w])
        row["torch_eager"] = try_time(
            "torch", lambda u, w: short_conv_gated_reference(*u.chunk(2, -1), w), [u, w]
        )
        _report(row, rows)
        if CONV_TILE_SWEEP[0]:
            for block_t, block_c, warps, channels_first in CONV_K3_TILES:
                with _conv_backward(block_t=block_t, block_c=block_c, warps=warps, channels_first=channels_first,
                                    mode="tile"):
                    t = try_time("k3 tile", lambda u, w: short_conv_gated(*u.chunk(2, -1), w), [u, w])
                print(f"  sweep conv {name} K3 backward BT{block_t} BC{block_c} warps {warps} "
                      f"channels_first {channels_first}: {_fmt(t)}", flush=True)
            for rows_, block_c, warps in CONV_K3_ROWS:
                with _conv_backward(mode="rows", rows=rows_, rows_block_c=block_c, rows_warps=warps):
                    t = try_time("k3 rows", lambda u, w: short_conv_gated(*u.chunk(2, -1), w), [u, w])
                print(f"  sweep conv {name} K3 backward rows {rows_} BC{block_c} warps {warps}: {_fmt(t)}", flush=True)


# (block_t, block_c, warps, channels_first) of the kernel-size-3 backward timed by --sweep ("conv" in --only)
CONV_K3_TILES = ((64, 32, 4, False), (64, 32, 4, True), (32, 32, 2, False))
# (rows, block_c, warps) of the row-walking kernel-size-3 backward (K3_MODE "rows", the default) timed by the same
# sweep (H200, 2026-12-01, f+b ms: 32 x 512 / 4 warps 0.846, 64 x 512 1.047, 32 x 1024 / 8 warps 1.122)
CONV_K3_ROWS = ((32, 512, 4), (64, 512, 4), (32, 256, 4), (16, 512, 4), (128, 512, 4))
CONV_TILE_SWEEP = [False]


@contextlib.contextmanager
def _conv_backward(use_k3: bool = True, block_t: int | None = None, block_c: int | None = None,
                   warps: int | None = None, channels_first: bool | None = None, mode: str | None = None,
                   rows: int | None = None, rows_block_c: int | None = None, rows_warps: int | None = None):
    """Run the short-conv backward with another kernel or tile for the duration of the block."""
    from kernels.short_conv import triton_impl

    names = ("USE_K3", "K3_BLOCK_T", "K3_BLOCK_C", "K3_WARPS", "K3_CHANNELS_FIRST", "K3_MODE", "K3_ROWS",
             "K3_ROWS_BLOCK_C", "K3_ROWS_WARPS")
    values = (use_k3, block_t, block_c, warps, channels_first, mode, rows, rows_block_c, rows_warps)
    saved = [getattr(triton_impl, n) for n in names]
    for name, value in zip(names, values, strict=True):
        if value is not None:
            setattr(triton_impl, name, value)
    try:
        yield
    finally:
        for name, value in zip(names, saved, strict=True):
            setattr(triton_impl, name, value)


def bench_decode(ceil, rows: list) -> None:
    """One decode step at batch 64 (state-bandwidth-bound): fused Triton step vs the PyTorch reference."""
    from kernels.taylor_linear_attn import taylor_linear_attention_step

    batch, dv = 64, 112
    nf = 1 + FEATURE_DIM + FEATURE_DIM**2
    q = torch.randn(batch, HEADS, FEATURE_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn(batch, HEADS, dv, device="cuda", dtype=torch.bfloat16)
    kv = torch.zeros(batch, HEADS, nf, dv, device="cuda")
    ks = torch.zeros(batch, HEADS, nf, device="cuda")
    state_bytes = 2 * 4 * batch * HEADS * nf * (dv + 1)
    row = {
        "op": "la decode step",
        "shape": f"B{batch} H16 Dv{dv}",
        "T": 1,
        "B": batch,
        "floor": (floor_ms(0, state_bytes, ceil), float("nan")),
    }
    for label, backend in (("ours", "triton"), ("torch_eager", "reference")):
        with torch.no_grad():
            ms = bench_ms(lambda b=backend: taylor_linear_attention_step(q, k, v, kv, ks, backend=b))
        row[label] = (ms, float("nan"))
    _report(row, rows)


def _flex_window(batch, seqlen, window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    # each shape compiles twice (grad mode on and off); the default limit of 8 recompiles made flex fall
    # back to its unfused path (37 ms) for the last shape of the first run
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    mask = create_block_mask(sliding, B=None, H=None, Q_LEN=seqlen, KV_LEN=seqlen, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=mask)


def _import_fla():
    try:
        from fla.ops.attn import parallel_attn
        from fla.ops.based import fused_chunk_based, parallel_based
    except Exception as err:
        print(f"fla-core not importable ({err}); FLA columns stay empty", flush=True)
        return None

    class Fla:
        pass

    fla = Fla()
    fla.fused_chunk_based, fla.parallel_based, fla.parallel_attn = (
        fused_chunk_based,
        parallel_based,
        parallel_attn,
    )
    return fla


PEER_COLUMNS = ("fla_fused_chunk", "fla_parallel", "fla_parallel_attn", "flex", "sdpa_causal", "torch_eager",
                "ours_general_bwd")


def _fmt(pair) -> str:
    if pair is None:
        return "-"
    return " / ".join("-" if math.isnan(x) else f"{x:.3f}" for x in pair)


def _report(row: dict, rows: list) -> None:
    rows.append(row)
    ours = row.get("ours")
    parts = [
        f"{row['op']:<15} {row['shape']:<22} T={row['T']:<5} ours {_fmt(ours)}  floor {_fmt(row['floor'])}"
    ]
    for col in PEER_COLUMNS:
        if col in row:
            parts.append(f"{col} {_fmt(row[col])}")
    print("  ".join(parts), flush=True)


def markdown_table(rows: list) -> str:
    """One table: times as fwd / f+b in ms; ratios are peer f+b over ours f+b and ours f+b over the floor."""
    head = ["op", "shape", "B x T", "ours fwd / f+b", "floor fwd / f+b", "ours/floor (f+b)"]
    head += [f"{c} fwd / f+b (x ours)" for c in PEER_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if "floor" not in row:
            continue
        ours = row.get("ours")
        key = 1 if ours is not None and not math.isnan(ours[1]) else 0
        cells = [row["op"], row["shape"], f"{row['B']}x{row['T']}", _fmt(ours), _fmt(row["floor"])]
        cells.append(
            f"{ours[key] / row['floor'][key]:.2f}" if ours and not math.isnan(row["floor"][key]) else "-"
        )
        for col in PEER_COLUMNS:
            peer = row.get(col)
            if peer is None or ours is None:
                cells.append(_fmt(peer) if peer else "")
            else:
                cells.append(f"{_fmt(peer)} ({peer[key] / ours[key]:.1f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Candidate tiles of the per-shape sweep, each relative to the kernels' built-in defaults ({} = the default).
# Lost on the H100 before (docs/PERFORMANCE.md) and not timed again: feature block 16, backward value block
# 64, backward 2 warps (spills), the fused window backward (atomics; not bitwise deterministic either).
LA_SWEEP = ({}, {"num_stages": 2}, {"num_stages": 3}, {"num_stages": 4}, {"num_warps": 4, "bwd_warps": 4},
            {"num_warps": 8, "bwd_warps": 8}, {"num_warps": 4}, {"bwd_warps": 4}, {"block_v": 64},
            {"chunk_size": 64, "num_warps": 4, "bwd_warps": 4})
# Window candidates. The backward's tiles default to the forward's, so the forward-only candidate pins the
# backward at the default 64 x 64; the backward ones pair the dK/dV kernel (bwd_*: keys outer, queries inner)
# with a dQ kernel (dq_*). Timed on the H200 and dropped (1.2-2.4x the default at every shape, CUDA-graph
# timing, docs/PERFORMANCE.md): 3 stages, the forward at 128 x 64, the backward at 32 x 128 / 128 x 32 and
# at 128 x 64 / 64 x 128 with 8 warps.
SWA_SWEEP = ({}, {"block_m": 64, "block_n": 32, "bwd_block_m": 64, "bwd_block_n": 64},
             {"bwd_block_m": 32, "bwd_block_n": 64, "dq_block_m": 64, "dq_block_n": 32},
             {"bwd_block_m": 32, "bwd_block_n": 64}, {"bwd_block_m": 32, "bwd_block_n": 32},
             {"bwd_block_m": 16, "bwd_block_n": 64, "dq_block_m": 64, "dq_block_n": 16},
             {"bwd_block_m": 32, "bwd_block_n": 64, "dq_block_m": 64, "dq_block_n": 32, "bwd_warps": 8},
             {"bwd_block_m": 64, "bwd_block_n": 32, "dq_block_m": 32, "dq_block_n": 64},
             {"bwd_block_m": 64, "bwd_block_n": 128, "bwd_warps": 8, "dq_block_m": 64, "dq_block_n": 64,
              "dq_warps": 4},
             {"dq_block_m": 128, "dq_block_n": 64, "dq_warps": 8})
# (window, head dim) of the published models: 360M W128 D64; 1.3B D112 (W128) and the D128 / W64 variants
SWA_SWEEP_SHAPES = ((128, 64), (128, 112), (64, 112), (128, 128), (64, 128))
# an entry is kept only when it beats the built-in default by more than run-to-run noise
SWEEP_MIN_GAIN = 0.02


def _distinct_la_configs(seqlen: int, dv: int) -> list[dict]:
    """LA_SWEEP without the entries that resolve to the same block sizes as an earlier one at this shape
    (the default warps depend on Dv, so some warp entries repeat the default)."""
    from kernels.taylor_linear_attn.triton_impl import Plan

    seen, configs = set(), []
    for cfg in LA_SWEEP:
        key = repr(sorted(vars(Plan(seqlen, FEATURE_DIM, dv, **cfg)).items()))
        if key not in seen:
            seen.add(key)
            configs.append(cfg)
    return configs


def _best(label: str, fn, inputs, configs: list[dict], timings: list) -> dict | None:
    """Time fn(*inputs, cfg) f+b for each config; the fastest as a table entry, or None when the default
    (configs[0] == {}) is within SWEEP_MIN_GAIN of it."""
    results = []
    for cfg in configs:
        t = try_time(f"{label} {cfg}", lambda *x, c=cfg: fn(*x, c), inputs)
        print(f"  sweep {label} {cfg}: {_fmt(t)}", flush=True)
        timings.append({"shape": label, "config": cfg, "ms": t})
        if t is not None:
            results.append((t[1], cfg))
    if not results:
        return None
    best_ms, best = min(results, key=lambda r: r[0])
    default_ms = next((ms for ms, cfg in results if not cfg), None)
    if not best or (default_ms is not None and best_ms > default_ms * (1 - SWEEP_MIN_GAIN)):
        return None
    return best


def sweep(sections: set) -> dict:
    """Per-shape tiles for this device: for each linear-attention (Dv, T) and window (W, D) shape, the
    fastest candidate that beats the built-in default. Installs them in kernels.tiles for the rest of this
    run and returns {"kind", "la", "swa", "timings"} (print_tiles writes them as kernels/tiles.py code)."""
    from kernels import tiles
    from kernels.sliding_window.triton_impl import sliding_window_attention_triton
    from kernels.taylor_linear_attn.triton_impl import taylor_linear_attention_triton

    kind = tiles.device_kind("cuda")
    # time the candidates against the built-in defaults, not against entries already in the table
    tables = (tiles.LINEAR_ATTN_TILES, tiles.SLIDING_WINDOW_TILES)
    saved = [(dict(t.get(kind, {})), dict(t["default"])) for t in tables]
    for table in tables:
        table[kind], table["default"] = {}, {}
    found: dict = {"kind": kind, "la": {}, "swa": {}, "timings": []}
    if "la" in sections:
        for _, dv in LA_SHAPES:
            for seqlen in _seqlens():
                inputs = la_inputs(TOKENS // seqlen, seqlen, dv)
                entry = _best(f"la Dv{dv} T{seqlen}",
                              lambda q, k, v, c: taylor_linear_attention_triton(q, k, v, **c), inputs,
                              _distinct_la_configs(seqlen, dv), found["timings"])
                if entry:
                    found["la"][(dv, seqlen)] = entry
    if "swa" in sections:
        seqlen = 2048
        for window, d in SWA_SWEEP_SHAPES:
            inputs = [torch.randn(TOKENS // seqlen, seqlen, HEADS, d, device="cuda", dtype=torch.bfloat16)
                      .requires_grad_() for _ in range(3)]
            entry = _best(f"swa W{window} D{d}",
                          lambda q, k, v, c, w=window: sliding_window_attention_triton(q, k, v, window=w, **c),
                          inputs, list(SWA_SWEEP), found["timings"])
            if entry:
                found["swa"][(window, d)] = entry
    for table, (mine, default), key in zip(tables, saved, ("la", "swa"), strict=True):
        table["default"] = default
        table[kind] = {**(default if kind == "default" else mine), **found[key]}
    return found


def print_tiles(found: dict, device: str) -> str:
    """The sweep's entries as kernels/tiles.py code (paste over the entries of that device kind)."""
    lines = [f"# bench/kernels.py --sweep on {device}, torch {torch.__version__}: tiles for {found['kind']!r}"]
    for table, key in (("LINEAR_ATTN_TILES", "la"), ("SLIDING_WINDOW_TILES", "swa")):
        lines.append(f"{table}[{found['kind']!r}] = {{")
        lines += [f"    {shape!r}: {entry!r}," for shape, entry in sorted(found[key].items())]
        lines.append("}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _timing_note(eager: bool) -> str:
    if eager:
        return "eager"
    return f"cuda_graph, then eager after a failed capture ({FELL_BACK[0]})" if FELL_BACK else "cuda_graph"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write rows and ceilings as JSON here")
    parser.add_argument("--sweep", action="store_true",
                        help="sweep tiles per shape first (the --only sections la / swa), print them as "
                             "kernels/tiles.py entries and use them for the timings")
    parser.add_argument("--sweep-only", action="store_true", help="with --sweep: stop after the sweep")
    parser.add_argument("--skip-peers", action="store_true", help="time only our kernels")
    parser.add_argument("--eager-timing", action="store_true",
                        help="time each eager call with events (default: replays of a CUDA graph of many calls)")
    parser.add_argument("--only", default="la,swa,conv,decode", help="comma list of sections")
    parser.add_argument("--seqlens", default=None, help="comma list of T (default 2048,4096,8192)")
    parser.add_argument("--tk-dir", type=Path, default=None,
                        help="section tk: a ThunderKittens checkout built by bench/tk_based.sh (its Based "
                             "forward against ours at its shape)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    global GRAPH_TIMING
    GRAPH_TIMING = not args.eager_timing
    start = time.time()
    ceil = measure_ceilings()
    device = torch.cuda.get_device_name()
    print(
        f"{device}: copy {ceil['bandwidth_Bps'] / 1e12:.2f} TB/s, bf16 matmul {ceil['matmul_flops'] / 1e12:.0f} "
        f"TFLOP/s; torch {torch.__version__}",
        flush=True,
    )
    if args.seqlens:
        global SEQLENS
        SEQLENS = tuple(int(t) for t in args.seqlens.split(","))
    sections = set(args.only.split(","))
    CONV_TILE_SWEEP[0] = args.sweep
    found = sweep(sections) if args.sweep else None
    if found is not None:
        found["code"] = print_tiles(found, device)
        if args.out:
            args.out.with_suffix(".tiles.json").write_text(json.dumps(_jsonable(found), indent=1))
        if args.sweep_only:
            return
    # the tiles come from kernels/tiles.py (with the sweep's entries installed when --sweep ran)
    rows: list = []
    peers = not args.skip_peers
    try:
        if "la_parts" in sections:
            bench_la_parts(rows)
        if "la" in sections:
            bench_linear_attention(ceil, peers, rows)
        if "swa" in sections:
            bench_sliding_window(ceil, peers, rows)
        if "conv" in sections:
            bench_short_conv(ceil, rows)
        if "decode" in sections:
            bench_decode(ceil, rows)
        if "tk" in sections:
            _bench_tk(args.tk_dir, rows)
    except Exception:
        traceback.print_exc()
    finally:
        print(markdown_table(rows))
        print(f"elapsed {time.time() - start:.0f} s")
        if args.out:
            args.out.write_text(
                json.dumps(
                    {
                        "device": device,
                        "torch": torch.__version__,
                        "ceilings": ceil,
                        "timing": _timing_note(args.eager_timing),
                        "tiles": None if found is None else _jsonable(found),
                        "rows": rows,
                    },
                    indent=1,
                )
            )


def _bench_tk(tk_dir: Path | None, rows: list) -> None:
    from bench.tk_peer import bench_tk

    if tk_dir is None:
        print("  [tk] skipped: pass --tk-dir (a ThunderKittens checkout built by bench/tk_based.sh)", flush=True)
        return
    try:
        bench_tk(tk_dir, rows)
    except ImportError as err:
        print(f"  [tk] skipped: {err}", flush=True)


def _jsonable(found: dict) -> dict:
    """The sweep result with its tuple keys as "Dv,T" / "W,D" strings."""
    out = dict(found)
    for key in ("la", "swa"):
        out[key] = {",".join(map(str, shape)): entry for shape, entry in found[key].items()}
    return out


if __name__ == "__main__":
    main()
