"""Tokens/s per GPU of the 1.3B Based model under several parallel layouts (weak scaling over dp).

    python bench/scaling.py --gpus 4                       # dp1, dp2, dp4, tp2, pp2 on one node
    python bench/scaling.py --gpus 2 --layouts dp1,dp2,tp2,pp2
    python bench/scaling.py --layouts dp1 --steps 5        # one GPU, quick check

Every layout runs under torchrun (NCCL, one process per GPU) for `--warmup` untimed and `--steps` timed
optimizer steps on synthetic tokens (the data loader is not measured), bf16 autocast, FSDP2 (`--fsdp`) or
replication for dp, and prints one JSON line per layout plus a markdown table for docs/PERFORMANCE.md.
Weak scaling: each data-parallel replica keeps `micro x accum` sequences per step, so the global batch grows
with dp; the efficiency of dpN is its tokens/s/GPU over dp1's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# first, ahead of bench/ itself (bench/kernels.py would shadow the kernels package)
sys.path.insert(0, str(ROOT))

# name -> (processes, overrides of parallel.*)
LAYOUTS = {
    "dp1": (1, {}),
    "dp2": (2, {"dp": 2}),
    "dp4": (4, {"dp": 4}),
    "dp8": (8, {"dp": 8}),
    "tp2": (2, {"tp": 2}),
    "pp2": (2, {"pp": 2}),
    "tp2dp2": (4, {"tp": 2, "dp": 2}),
}


def worker(args: argparse.Namespace) -> None:
    import torch

    from based_layers import build_model
    from pretrain.config import derive, load_config
    from pretrain.distributed import init_distributed, seed_everything, shutdown
    from pretrain.optim import build_optimizer
    from pretrain.parallelize import check_layout, parallelize, unwrap

    procs, par = LAYOUTS[args.layout]
    dp = par.get("dp", 1)
    overrides = [f"parallel.{k}={v}" for k, v in par.items()] + [
        f"parallel.fsdp={args.fsdp}",
        f"parallel.activation_checkpoint={args.activation_checkpoint}",
        f"data.micro_batch_size={args.micro}",
        f"data.global_batch_size={args.micro * args.accum * dp}",
        "precision=bf16",
        "device=cuda",
        *args.override,
    ]
    cfg = load_config(ROOT / args.config, overrides)
    info = init_distributed(cfg.device)
    derived = derive(cfg, info.world_size)
    check_layout(cfg, derived)
    seed_everything(cfg.seed)
    model = parallelize(build_model(cfg.model).to(info.device), cfg, derived, info)
    opt = build_optimizer(unwrap(model), cfg.optim, info.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(
        0, cfg.model.vocab_size, (args.accum, args.micro, cfg.data.seq_len + 1), generator=gen
    )
    batches = [
        {"input_ids": t[:, :-1].to(info.device), "labels": t[:, 1:].to(info.device), "doc_ids": None}
        for t in tokens
    ]

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model.forward_backward(batches, autocast=autocast)
        model.clip_grad_norm_(cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    tokens_per_step = derived.tokens_per_step
    if info.is_main:
        print(
            "RESULT "
            + json.dumps(
                {
                    "layout": args.layout,
                    "gpus": info.world_size,
                    "step_s_median": step_s,
                    "tokens_per_step": tokens_per_step,
                    "tokens_per_s_per_gpu": tokens_per_step / step_s / info.world_size,
                    "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "loss": float(loss),
                    "micro": args.micro,
                    "accum": args.accum,
                    "seq_len": cfg.data.seq_len,
                    "fsdp": args.fsdp,
                    "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                }
            ),
            flush=True,
        )
    shutdown(exit_code=0 if info.world_size > 1 else None)


def driver(args: argparse.Namespace) -> int:
    results = []
    for name in args.layouts.split(","):
        procs = LAYOUTS[name][0]
        if procs > args.gpus:
            print(f"skip {name}: needs {procs} GPUs, --gpus {args.gpus}", file=sys.stderr)
            continue
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            str(Path(__file__).resolve()),
            "--worker",
            "--layout",
            name,
        ] + _forwarded(args)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1][len("RESULT ") :]))
        print(json.dumps(results[-1]), flush=True)
    print(_table(results))
    return 0 if results else 1


def _forwarded(args: argparse.Namespace) -> list[str]:
    out = [
        "--config",
        args.config,
        "--micro",
        str(args.micro),
        "--accum",
        str(args.accum),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--fsdp",
        str(args.fsdp).lower(),
        "--activation-checkpoint",
        str(args.activation_checkpoint).lower(),
    ]
    for item in args.override:
        out += ["--override", item]
    return out


def _table(results: list[dict]) -> str:
    base = next((r["tokens_per_s_per_gpu"] for r in results if r["layout"] == "dp1"), None)
    rows = [
        "| layout | GPUs | tokens/s/GPU | step (s) | peak memory (GiB) | weak-scaling efficiency vs dp1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        eff = (
            f"{100 * r['tokens_per_s_per_gpu'] / base:.1f}%" if base and r["layout"].startswith("dp") else "-"
        )
        rows.append(
            f"| {r['layout']} | {r['gpus']} | {r['tokens_per_s_per_gpu']:,.0f} | {r['step_s_median']:.3f} | "
            f"{r['peak_mem_gib']:.1f} | {eff} |"
        )
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/based_1b_10b.yaml")
    p.add_argument("--layouts", default="dp1,dp2,dp4,tp2,pp2")
    p.add_argument("--gpus", type=int, default=4, help="GPUs on this node; larger layouts are skipped")
    p.add_argument("--micro", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per replica and step (pp: >= pp)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fsdp", type=lambda s: s.lower() == "true", default=True)
    p.add_argument("--activation-checkpoint", type=lambda s: s.lower() == "true", default=False)
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="config key=value, e.g. model.linear_attn.backend=triton (repeatable)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
