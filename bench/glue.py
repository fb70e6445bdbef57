"""The training step's glue at the 1.3B shapes: residual add + RMSNorm, and head + cross-entropy (issue 13).

    python bench/glue.py [--tokens 8192,16384] [--dim 1792] [--vocab 50264] [--hidden 3584] [--only norm,loss,swiglu]
                         [--out runs/bench/glue.json]

Forward + backward time (CUDA events, median of --iters after --warmup) and peak memory above the inputs:
- add + RMSNorm, fp32 residual stream x [N, D], bf16 update, fp32 weight, output bf16 (what a block does):
  ours (kernels/fused_norm, Triton custom op) / torch.compile of the plain form / liger-kernel's
  LigerFusedAddRMSNorm (its own casting rules; bf16 in and out) / eager plain PyTorch; and the norm alone
  (no update), ours vs eager vs compiled vs LigerRMSNorm.
- head + cross-entropy, hidden [N, D] bf16, weight [V, D] fp32 under bf16 autocast (as the trainer):
  ours chunked at several chunk sizes / liger-kernel's LigerFusedLinearCrossEntropyLoss / plain fp32 logits.
- SwiGLU of the MLP, y [N, 2H] bf16 -> h [N, H]: ours (kernels/swiglu) / torch.compile / liger-kernel's
  SiLU-mul on the halves / eager.
liger-kernel is optional: its rows say "skipped" with the reason when it cannot be imported.
The floor column is the bytes each op must move at the device copy bandwidth (--bandwidth, TB/s).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# the repository root first: bench/kernels.py would otherwise shadow the `kernels` package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels.fused_norm import add_rms_norm  # noqa: E402
from kernels.fused_norm.reference import add_rms_norm_reference, rms_norm_reference  # noqa: E402
from kernels.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from kernels.swiglu import swiglu  # noqa: E402

BF16, F32 = torch.bfloat16, torch.float32


def time_fwd_bwd(
    fn: Callable[[], list[torch.Tensor]], grads_of: list[torch.Tensor], warmup: int, iters: int
) -> tuple[float, float]:
    """(median ms of forward + backward, peak GiB allocated above what was allocated before)."""

    def run() -> None:
        outs = fn()
        cots = [torch.ones_like(o) for o in outs]
        torch.autograd.backward(outs, cots)
        for t in grads_of:
            t.grad = None

    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return sorted(times)[len(times) // 2], peak


def _liger(name: str):
    try:
        import liger_kernel.transformers as lt

        return getattr(lt, name), ""
    except Exception as err:  # ImportError, or liger failing to import its Triton kernels
        return None, f"skipped: liger-kernel not importable ({type(err).__name__}: {str(err)[:80]})"


def norm_rows(n: int, d: int, warmup: int, iters: int, bandwidth: float) -> list[dict]:
    """add + RMSNorm and RMSNorm alone, every implementation, at N x D."""
    x = torch.randn(n, d, device="cuda", requires_grad=True)
    u = torch.randn(n, d, device="cuda", dtype=BF16, requires_grad=True)
    w = (torch.rand(d, device="cuda") + 0.5).requires_grad_()
    eps = 1e-5
    plain = lambda: list(add_rms_norm_reference(x, u, w, eps=eps, out_dtype=BF16, residual_dtype=F32))  # noqa: E731
    compiled_fn = torch.compile(add_rms_norm_reference)
    impls = {
        "ours (triton)": lambda: list(add_rms_norm(x, u, w, eps=eps, out_dtype=BF16, residual_dtype=F32)),
        "torch.compile": lambda: list(compiled_fn(x, u, w, eps=eps, out_dtype=BF16, residual_dtype=F32)),
        "eager": plain,
    }
    liger_cls, why = _liger("LigerFusedAddRMSNorm")
    # add + norm: read x (4 B) + u (2), write y (2) + residual (4); backward: read residual, dy, d residual,
    # write dx, du
    floor_add = n * d * (12 + 4 + 2 + 4 + 4 + 2) / (bandwidth * 1e12) * 1e3
    rows = [
        _time_row("add+rmsnorm", n, d, name, fn, [x, u, w], warmup, iters, floor_add)
        for name, fn in impls.items()
    ]
    if liger_cls is None:
        rows.append({"op": "add+rmsnorm", "tokens": n, "dim": d, "impl": "liger", "note": why})
    else:
        liger_norm = liger_cls(d, eps=eps, in_place=False).cuda()
        xb = x.detach().to(BF16).requires_grad_()
        rows.append(
            _time_row(
                "add+rmsnorm",
                n,
                d,
                "liger (bf16 stream)",
                lambda: list(liger_norm(u, xb)),
                [xb, u, *liger_norm.parameters()],
                warmup,
                iters,
                floor_add,
            )
        )
    compiled_norm = torch.compile(rms_norm_reference)
    floor_norm = n * d * (4 + 2 + 4 + 2 + 4) / (bandwidth * 1e12) * 1e3
    alone = {
        "ours (triton)": lambda: [add_rms_norm(x, None, w, eps=eps, out_dtype=BF16)],
        "torch.compile": lambda: [compiled_norm(x, w, eps, BF16)],
        "eager": lambda: [rms_norm_reference(x, w, eps, BF16)],
    }
    rows += [
        _time_row("rmsnorm", n, d, name, fn, [x, w], warmup, iters, floor_norm) for name, fn in alone.items()
    ]
    liger_rms, why = _liger("LigerRMSNorm")
    if liger_rms is None:
        rows.append({"op": "rmsnorm", "tokens": n, "dim": d, "impl": "liger", "note": why})
    else:
        norm = liger_rms(d, eps=eps, in_place=False).cuda()
        rows.append(
            _time_row(
                "rmsnorm",
                n,
                d,
                "liger (fp32 in/out)",
                lambda: [norm(x)],
                [x, *norm.parameters()],
                warmup,
                iters,
                floor_norm,
            )
        )
    return rows


def _plain_swiglu(y: torch.Tensor) -> torch.Tensor:
    value, gate = y.chunk(2, dim=-1)
    return value * torch.nn.functional.silu(gate)


def swiglu_rows(n: int, hidden: int, warmup: int, iters: int, bandwidth: float) -> list[dict]:
    """The MLP's SwiGLU on fc1's bf16 output y [N, 2H]: ours (kernels/swiglu) / torch.compile of the plain
    chunk + silu + mul (what the compiled blocks ran before) / liger-kernel's SiLU-mul on the two halves / eager."""
    y = torch.randn(n, 2 * hidden, device="cuda", dtype=BF16, requires_grad=True)
    compiled = torch.compile(_plain_swiglu)
    impls = {"ours (triton)": lambda: [swiglu(y)], "torch.compile": lambda: [compiled(y)],
             "eager": lambda: [_plain_swiglu(y)]}
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        impls["liger (halves)"] = lambda: [LigerSiLUMulFunction.apply(*reversed(y.chunk(2, dim=-1)))]
    except Exception as err:
        print(f"  liger swiglu skipped: {type(err).__name__}: {str(err)[:80]}")
    # forward: read y (2H x 2 B), write h (H x 2 B); backward: read y and dh, write dy
    floor = n * hidden * 2 * (2 + 1 + 2 + 1 + 2) / (bandwidth * 1e12) * 1e3
    return [_time_row("swiglu", n, hidden, name, fn, [y], warmup, iters, floor) for name, fn in impls.items()]


def _time_row(
    op: str, n: int, d: int, impl: str, fn, leaves, warmup: int, iters: int, floor_ms: float
) -> dict:
    try:
        ms, peak = time_fwd_bwd(fn, leaves, warmup, iters)
    except Exception as err:  # one failing implementation must not lose the others' rows
        return {
            "op": op,
            "tokens": n,
            "dim": d,
            "impl": impl,
            "note": f"error: {type(err).__name__}: {err}"[:200],
        }
    return {"op": op, "tokens": n, "dim": d, "impl": impl, "ms": ms, "peak_gib": peak, "floor_ms": floor_ms}


def loss_rows(
    n: int, d: int, vocab: int, chunks: list[int], warmup: int, iters: int, bandwidth: float
) -> list[dict]:
    """Head + cross-entropy: ours at each chunk size, liger, plain fp32 logits; under bf16 autocast."""
    h = torch.randn(n, d, device="cuda", dtype=BF16, requires_grad=True)
    w = (torch.randn(vocab, d, device="cuda") * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (n,), device="cuda")
    # the weight read in bf16 twice (logits, d hidden) + its fp32 gradient written; the logits are not a floor
    floor = (2 * vocab * d * 2 + vocab * d * 4) / (bandwidth * 1e12) * 1e3

    def under_autocast(backend: str, chunk: int = 4096):
        def fn():
            with torch.autocast("cuda", dtype=BF16):
                return [linear_cross_entropy(h, w, labels, backend=backend, chunk_size=chunk)]

        return fn

    impls = {f"ours chunked {c}": under_autocast("chunked", c) for c in chunks}
    impls["plain fp32 logits"] = under_autocast("reference")
    liger_cls, why = _liger("LigerFusedLinearCrossEntropyLoss")
    if liger_cls is None:
        rows = [{"op": "linear+CE", "tokens": n, "dim": d, "impl": "liger", "note": why}]
    else:
        impls["liger"] = under_autocast("liger")
        rows = []
    rows += [
        _time_row("linear+CE", n, d, name, fn, [h, w], warmup, iters, floor) for name, fn in impls.items()
    ]
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'op':12s} {'tokens':>7s} {'dim':>5s} {'impl':24s} {'f+b ms':>8s} {'floor':>7s} {'peak GiB':>9s}")
    for r in rows:
        if "ms" not in r:
            print(f"{r['op']:12s} {r['tokens']:7d} {r['dim']:5d} {r['impl']:24s} {r['note']}")
            continue
        print(
            f"{r['op']:12s} {r['tokens']:7d} {r['dim']:5d} {r['impl']:24s} {r['ms']:8.3f} {r['floor_ms']:7.3f} "
            f"{r['peak_gib']:9.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", default="8192,16384", help="tokens per step (batch x 2048)")
    parser.add_argument("--dim", type=int, default=1792, help="d_model (based_1b_50b: 1792)")
    parser.add_argument("--vocab", type=int, default=50264, help="padded vocabulary (50257 -> 50264)")
    parser.add_argument(
        "--chunks", default="1024,2048,4096,8192", help="chunk sizes (tokens) of the fused loss"
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--bandwidth", type=float, default=4.25, help="device copy bandwidth, TB/s")
    parser.add_argument("--hidden", type=int, default=3584, help="MLP hidden width H (based_1b_50b: 3584)")
    parser.add_argument("--only", default="norm,loss,swiglu")
    parser.add_argument("--out", default="runs/bench/glue.json")
    args = parser.parse_args()
    rows: list[dict] = []
    for n in map(int, args.tokens.split(",")):
        if "norm" in args.only:
            rows += norm_rows(n, args.dim, args.warmup, args.iters, args.bandwidth)
        if "swiglu" in args.only:
            rows += swiglu_rows(n, args.hidden, args.warmup, args.iters, args.bandwidth)
        if "loss" in args.only:
            chunks = [int(c) for c in args.chunks.split(",") if int(c) <= n]
            rows += loss_rows(n, args.dim, args.vocab, chunks, args.warmup, args.iters, args.bandwidth)
        torch.cuda.empty_cache()
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, git {rev}")
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "git": rev, "rows": rows},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
