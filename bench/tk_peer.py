"""ThunderKittens' Based prefill forward (the seeds' kernel) as a peer of our linear-attention forward.

Used by `python bench/kernels.py --only tk --tk-dir TK_DIR` after `bash bench/tk_based.sh TK_DIR`. TK's
`based(q, k, v)` takes [B, H, T, D] bf16 with feature dim 16 and value dim 64 only, returns the numerator
sum_j phi(q_i).phi(k_j) v_j (no normalizer) and a bf16 state, and calls cudaDeviceSynchronize inside, so it
cannot be captured in a CUDA graph: both kernels are timed here by their own GPU time (torch.profiler's
kernel durations per call; the host-side sync and launches are left out for both), and eagerly with events
around each call (TK's time then includes its two device syncs).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

from bench.profile_step import kernel_times

SHAPE = (16, 16, 2048, 16, 64)  # B, H, T, F, Dv: TK's own benchmark shape


def load_tk(tk_dir: Path):
    """TK's `based` from TK_DIR/kernels/based/_C*.so; raises ImportError naming the build script."""
    sys.path.insert(0, str(tk_dir / "kernels" / "based"))
    try:
        from _C import based  # noqa: PLC0415
    except ImportError as err:
        raise ImportError(f"ThunderKittens' _C not importable from {tk_dir}/kernels/based ({err}); "
                          f"build it with `bash bench/tk_based.sh {tk_dir}`") from err
    finally:
        sys.path.pop(0)
    return based


def kernel_ms(fn, calls: int = 20) -> float:
    """GPU time per call: the summed durations of the CUDA kernels (and memsets/copies) fn launches."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(kernel_times(prof).values()) / calls / 1e3


def numerator_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, H, T, Dv] fp32: causal sum_j (1 + q.k/sqrt(F) + (q.k)^2 / (2F)) v_j, the quadratic form."""
    f = q.shape[-1]
    s = q.float() @ k.float().transpose(-1, -2)
    a = (1 + s / math.sqrt(f) + s * s / (2 * f)).tril()
    return a @ v.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_tk(tk_dir: Path, rows: list) -> None:
    """One row: TK's forward against ours (normalized output, fp32 state) at TK's shape, with a check that
    both compute the Taylor numerator / output of the same inputs (on the first batch row)."""
    from kernels.taylor_linear_attn.ops import taylor_linear_attention_triton

    based = load_tk(tk_dir)
    b, h, t, f, dv = SHAPE
    torch.manual_seed(0)
    q, k = (torch.randn(b, h, t, f, device="cuda", dtype=torch.bfloat16) / f for _ in range(2))
    v = torch.randn(b, h, t, dv, device="cuda", dtype=torch.bfloat16) / dv
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # our layout [B, T, H, D]
    tk = lambda: based(q, k, v)
    ours = lambda: taylor_linear_attention_triton(qt, kt, vt, eps=1e-12)
    with torch.no_grad():
        num = numerator_reference(q[:1], k[:1], v[:1])
        den = numerator_reference(q[:1], k[:1], torch.ones_like(v[:1, ..., :1]))
        err_tk = rel_err(tk()[0][:1], num)
        err_ours = rel_err(ours()[:1].transpose(1, 2), num / den)
        row = {"op": "tk_shape_fwd", "shape": f"B{b} H{h} T{t} F{f} Dv{dv}", "T": t, "B": b,
               "tk_kernel_ms": kernel_ms(tk), "ours_kernel_ms": kernel_ms(ours),
               "tk_eager_ms": do_bench(tk, return_mode="median"), "ours_eager_ms": do_bench(ours, return_mode="median"),
               "tk_rel_err_numerator": err_tk, "ours_rel_err_output": err_ours}
    rows.append(row)
    print(f"tk shape fwd (B{b} H{h} T{t} F{f} Dv{dv}): GPU time TK {row['tk_kernel_ms']:.3f} ms, ours "
          f"{row['ours_kernel_ms']:.3f} ms ({row['ours_kernel_ms'] / row['tk_kernel_ms']:.2f}x TK); eager "
          f"TK {row['tk_eager_ms']:.3f}, ours {row['ours_eager_ms']:.3f}; rel err vs fp32 quadratic form: "
          f"TK numerator {err_tk:.1e}, ours output {err_ours:.1e}", flush=True)
