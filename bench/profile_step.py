"""Where one training step's GPU time goes, by category of kernel (issue 13's breakdown).

    python bench/profile_step.py [--arch based] [--batch 4] [--steps 3] [--warmup 3] [--compile]
                                 [--override model.loss_impl=plain ...] [--out runs/bench/profile_step.json]

Builds the bench loop's step (bench/train_throughput.py: random tokens, seq 2048, bf16 autocast, fused AdamW,
the model's loss), runs --warmup steps, then profiles --steps steps with torch.profiler and sums the CUDA
kernel time per step by category (`categorize`): matrix products, copies/casts, other elementwise, optimizer,
mixer kernels (the Based Triton kernels; SDPA / mamba-ssm for the baselines), norms/reductions, loss, other.
Prints the table and the largest kernels of each category (--top), and writes both as JSON. Categories
go by kernel name only: a kernel of the chunked loss that is a plain elementwise op counts as elementwise.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the repository root first: bench/kernels.py would otherwise shadow the `kernels` package
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

CATEGORIES = (
    "matrix products",
    "copies/casts",
    "other elementwise",
    "optimizer",
    "mixer kernels",
    "norms/reductions",
    "loss",
    "other",
)

# (category, pattern searched in the kernel name), first match wins: the order matters (an optimizer's
# multi-tensor norm is the optimizer's; cuBLAS's split-K reduce is a matrix product; an inductor kernel that
# fuses a reduction is a reduction)
_RULES = [
    ("optimizer", r"multi_tensor_apply|fused_adam|FusedAdam|adamw|_foreach|LpNormFunctor"),
    ("loss", r"cross_entropy|nll_loss|log_softmax|logsoftmax|liger_cross_entropy|_ce_"),
    ("norms/reductions", r"rms_norm|layer_norm|RMSNorm|LayerNorm"),
    (
        "mixer kernels",
        r"^_(fwd|bwd|bwd_k3|bwd_k3_rows|bwd_dq|bwd_dkv|bwd_dkdv|state_pass|normalizer_grad|delta|step)_kernel\b|"
        r"flash|fmha|attention|sdpa|selective_scan|causal_conv1d|chunk_scan|ssd_",
    ),
    ("matrix products", r"decode_linear|gemm|nvjet|cutlass|xmma|cublas|matmul|splitKreduce|_mm_|wgmma|sm90_|sm80_"),
    ("norms/reductions", r"^triton_(red|per)_|reduce_kernel|Reduce|reduction|softmax|welford|norm_kernel"),
    (
        "copies/casts",
        r"copy|(?<!no)(?<!broad)cast|convert|memcpy|Memcpy|memset|Memset|transpose|CatArray|fill|contiguous|"
        r"^triton_poi_fused__to_copy_\d+$|^triton_poi_fused_clone_\d+$",
    ),
    (
        "other elementwise",
        r"elementwise|^triton_poi_|pointwise|swiglu|silu|sigmoid|mul|add|exp|index|gather|scatter|"
        r"embedding|where|clamp|masked|unary|binary",
    ),
]
_COMPILED = [(cat, re.compile(pattern, re.IGNORECASE)) for cat, pattern in _RULES]


def categorize(kernel: str) -> str:
    """The category of a CUDA kernel name (one of CATEGORIES)."""
    for category, pattern in _COMPILED:
        if pattern.search(kernel):
            return category
    return "other"


def breakdown(kernel_times_us: dict[str, float], steps: int) -> dict:
    """{category: ms per step}, {category: [(kernel, ms per step)] largest first}, total ms per step."""
    per_cat: dict[str, float] = defaultdict(float)
    kernels: dict[str, list] = defaultdict(list)
    for name, us in kernel_times_us.items():
        cat = categorize(name)
        per_cat[cat] += us / 1e3 / steps
        kernels[cat].append((name, us / 1e3 / steps))
    total = sum(per_cat.values())
    return {
        "total_ms": total,
        "ms": {c: per_cat.get(c, 0.0) for c in CATEGORIES},
        "kernels": {c: sorted(v, key=lambda kv: -kv[1]) for c, v in kernels.items()},
    }


def print_breakdown(result: dict, top: int) -> None:
    total = result["total_ms"]
    print(f"CUDA kernel time per step: {total:.1f} ms")
    print(f"{'category':20s} {'ms/step':>9s} {'share':>7s}")
    for cat in sorted(CATEGORIES, key=lambda c: -result["ms"][c]):
        ms = result["ms"][cat]
        print(f"{cat:20s} {ms:9.2f} {ms / total if total else 0:7.1%}")
    for cat in CATEGORIES:
        for name, ms in result["kernels"].get(cat, [])[:top]:
            print(f"  [{cat}] {ms:8.3f} ms  {name[:110]}")


def kernel_times(prof) -> dict[str, float]:
    """{kernel name: total CUDA time in us} of a finished torch.profiler run (kernels only, not CPU ops)."""
    out: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            out[evt.name] += (
                evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
            )
    return out


def main() -> None:
    from bench.train_throughput import build_step

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="based")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block")
    parser.add_argument("--override", action="append", default=[], help="config key=value (repeatable)")
    parser.add_argument("--top", type=int, default=5, help="largest kernels printed per category")
    parser.add_argument("--out", default="runs/bench/profile_step.json")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    step, cfg, _ = build_step(args.arch, args.batch, args.backend, args.compile, args.override)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    result = breakdown(kernel_times(prof), args.steps)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    print(
        f"device {torch.cuda.get_device_name()}, git {rev.stdout.strip()}, {args.arch} batch {args.batch} x "
        f"{cfg.data.seq_len}, compile {args.compile}, overrides {args.override}"
    )
    print_breakdown(result, args.top)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "git": rev.stdout.strip(),
                "arch": args.arch,
                "batch": args.batch,
                "compile": args.compile,
                "overrides": args.override,
                **result,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
