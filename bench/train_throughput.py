"""Training throughput of the 1.3B Based, Transformer++ and Mamba shapes on one GPU, side by side.

    python bench/train_throughput.py [--archs based,attn,mamba] [--batch 4] [--steps 8] [--backend triton]
                                     [--override model.loss_impl=plain ...]
    python bench/train_throughput.py --trainer [--archs based] [--batch 8] [--accum 2] [--steps 30] [--warmup 10]
                                     [--data DIR] [--override parallel.compile=true ...]

Bench loop (default): random tokens, seq 2048, bf16 autocast over fp32 weights, fused AdamW, the model's loss
(`model.loss_impl`, `model.norm_backend` of the config and overrides). Prints one table (tokens/s, MFU by the
architecture-aware FLOPs model over the 989 TFLOP/s bf16 dense peak, peak memory) and writes JSON to --out.
MFU here counts the model's FLOPs only (no recomputation).

--trainer: runs `python -m pretrain.train CONFIG` itself (a subprocess) for --steps steps on real data (--data:
a prepared corpus at the config's sequence length; default: the tiny generated corpus, made once at seq 2048
under runs/bench/tiny_corpus_2048) and reads tokens/s/GPU and MFU from the run's metrics.jsonl, leaving out
the first --warmup steps (compilation, allocator warm-up). The run folder is deleted afterwards (the trainer
writes a final checkpoint); its metrics.jsonl is kept next to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# the repository root first: bench/kernels.py would otherwise shadow the `kernels` package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from based_layers import build_model  # noqa: E402
from based_layers.loss import resolve_loss_impl  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.flops import training_flops_per_token  # noqa: E402

CONFIGS = {
    "based": "configs/based_1b_50b.yaml",
    "attn": "configs/attn_1b_50b.yaml",
    "mamba": "configs/mamba_1b_50b.yaml",
}
PEAK = 989e12
ROOT = Path(__file__).resolve().parents[1]


def arch_overrides(arch: str, backend: str) -> list[str]:
    """Config overrides of the bench for `arch`: the Based mixer backend, Mamba on mamba-ssm."""
    overrides = []
    if arch == "based":
        overrides = [
            f"model.linear_attn.backend={backend}",
            f"model.sliding_window.backend={backend}",
            f"model.base_conv.backend={backend}",
        ]
    if arch == "mamba":
        try:
            import mamba_ssm  # noqa: F401
        except ImportError:
            raise RuntimeError(
                "mamba-ssm is not installed here; the reference scan is a sequential loop over "
                "time and gives no meaningful throughput"
            ) from None
        overrides = ["model.mamba.backend=mamba_ssm"]
    return overrides


def build_step(arch: str, batch: int, backend: str, compile_model: bool, extra: list[str]):
    """(step function, config, model) of one bench-loop training step on random tokens."""
    cfg = load_config(CONFIGS[arch], arch_overrides(arch, backend) + list(extra))
    torch.manual_seed(0)
    model = build_model(cfg.model).cuda()
    if compile_model:
        for key, block in list(model.transformer.layers.items()):
            model.transformer.layers[key] = torch.compile(block)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    seq = cfg.data.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), device="cuda")
    fused_loss = resolve_loss_impl(cfg.model.loss_impl, tokens.device) != "plain"

    def step() -> None:
        # the trainer's loss: the model's fused head + loss, or fp32 logits and F.cross_entropy
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tokens[:, :-1], labels=tokens[:, 1:] if fused_loss else None)
        loss = out if fused_loss else F.cross_entropy(out.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, cfg, model


def measure(
    arch: str, batch: int, steps: int, warmup: int, backend: str, compile_model: bool, extra: list[str]
) -> dict:
    step, cfg, model = build_step(arch, batch, backend, compile_model, extra)
    seq = cfg.data.seq_len
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - t0) / steps
    tps = batch * seq / elapsed
    flops = training_flops_per_token(cfg.model, seq)
    return {
        "arch": arch,
        "backend": backend if arch == "based" else "-",
        "loss_impl": cfg.model.loss_impl,
        "norm_backend": cfg.model.norm_backend,
        "batch": batch,
        "seq_len": seq,
        "ms_per_step": elapsed * 1e3,
        "tokens_per_s": tps,
        "mfu": flops * tps / PEAK,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "params": model.num_parameters(),
    }


def tiny_corpus(seq_len: int) -> Path:
    """The tiny generated corpus prepared at `seq_len` (made once, under runs/bench)."""
    from data_pipeline.manifest import MANIFEST
    from data_pipeline.tiny_corpus import zstd_available

    out = ROOT / "runs" / "bench" / f"tiny_corpus_{seq_len}"
    if not (out / MANIFEST).exists():
        plain = [] if zstd_available() else ["--no-zstd"]
        subprocess.run(
            [sys.executable, "-m", "data_pipeline.tiny_corpus", "--out", str(out), "--seq-len", str(seq_len), *plain],
            cwd=ROOT,
            check=True,
        )
    return out


def trainer_overrides(data: Path, batch: int, accum: int, steps: int, run_dir: Path) -> list[str]:
    """A short single-process run: every step logged, no validation, no checkpoints but the trainer's last."""
    return [
        f"data.path={data}",
        f"data.micro_batch_size={batch}",
        f"data.global_batch_size={batch * accum}",
        f"schedule.max_steps={steps}",
        "schedule.warmup_steps=0",
        "logging.log_interval=1",
        "logging.val_interval=0",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        "checkpoint.interval=0",
        "checkpoint.resume=none",
        f"run_dir={run_dir}",
    ]


def read_throughput(metrics: Path, skip: int) -> dict:
    """Median tokens/s/GPU and MFU of the logged steps after the first `skip` (from a run's metrics.jsonl)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    perf = [r for r in rows if "perf/tokens_per_s_per_device" in r and r["step"] > skip]
    if not perf:
        raise RuntimeError(
            f"{metrics}: no step after the first {skip} logged perf/tokens_per_s_per_device; "
            "run more --steps than --warmup"
        )
    tps = [r["perf/tokens_per_s_per_device"] for r in perf]
    mfu = [r["perf/mfu"] for r in perf if "perf/mfu" in r]
    return {
        "steps_measured": len(perf),
        "first_step_measured": perf[0]["step"],
        "tokens_per_s": statistics.median(tps),
        "tokens_per_s_min": min(tps),
        "tokens_per_s_max": max(tps),
        "mfu": statistics.median(mfu) if mfu else None,
        "final_loss": perf[-1]["train/loss"],
        "peak_mem_gib": max(r["perf/peak_memory_bytes"] for r in perf) / 2**30,
    }


def measure_trainer(arch: str, config: str, args, out: Path) -> dict:
    """Run pretrain.train for args.steps steps and read its metrics (see the module docstring)."""
    cfg = load_config(config, args.override)
    data = Path(args.data) if args.data else tiny_corpus(cfg.data.seq_len)
    run_dir = out.parent / f"trainer_run_{arch}_{os.getpid()}"
    cmd = [
        sys.executable,
        "-m",
        "pretrain.train",
        config,
        *trainer_overrides(data, args.batch, args.accum, args.steps, run_dir),
        *arch_overrides(arch, args.backend),
        *args.override,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"pretrain.train exited {proc.returncode}: {proc.stderr[-1500:]}")
        metrics = out.with_name(f"{out.stem}.{arch}.metrics.jsonl")
        shutil.copyfile(run_dir / "metrics.jsonl", metrics)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    measured = read_throughput(metrics, args.warmup)
    tokens_per_step = args.batch * args.accum * cfg.data.seq_len
    return {
        "arch": arch,
        "mode": "trainer",
        "config": config,
        "backend": args.backend if arch == "based" else "-",
        "batch": args.batch,
        "accum": args.accum,
        "steps": args.steps,
        "overrides": args.override,
        "wall_s": wall,
        "metrics": str(metrics),
        "ms_per_step": tokens_per_step / measured["tokens_per_s"] * 1e3,
        **measured,
    }


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def print_rows(rows: list[dict], header: str) -> None:
    attn_tps = next(
        (r["tokens_per_s"] for r in rows if r.get("arch") == "attn" and "tokens_per_s" in r), None
    )
    print(header)
    print(
        f"{'arch':6s} {'backend':9s} {'ms/step':>9s} {'tokens/s':>10s} {'MFU':>6s} {'vs attn':>8s} {'mem GiB':>8s}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['arch']:6s} error: {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / attn_tps:.2f}x" if attn_tps else "-"
        ms = f"{r['ms_per_step']:9.1f}" if "ms_per_step" in r else f"{'-':>9s}"
        mfu = f"{r['mfu']:6.1%}" if r.get("mfu") is not None else f"{'-':>6s}"
        print(
            f"{r['arch']:6s} {r['backend']:9s} {ms} {r['tokens_per_s']:10.0f} {mfu} {ratio:>8s} "
            f"{r['peak_mem_gib']:8.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", default="based,attn,mamba")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch (sequences)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--backend", default="triton", help="Based mixer backend: triton or reference")
    parser.add_argument("--compile", action="store_true", help="bench loop: torch.compile every block")
    parser.add_argument("--override", action="append", default=[], help="config key=value (repeatable)")
    parser.add_argument(
        "--trainer", action="store_true", help="run pretrain.train and read its metrics.jsonl"
    )
    parser.add_argument("--config", help="--trainer with one arch: this YAML instead of the 1.3B preset")
    parser.add_argument("--accum", type=int, default=1, help="--trainer: micro-batches per step")
    parser.add_argument(
        "--data", help="--trainer: prepared corpus (default: tiny corpus at the config's seq_len)"
    )
    parser.add_argument("--out", default="bench_train_throughput.json")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for arch in args.archs.split(","):
        try:
            if args.trainer:
                rows.append(measure_trainer(arch, args.config or CONFIGS[arch], args, out))
            else:
                rows.append(
                    measure(
                        arch, args.batch, args.steps, args.warmup, args.backend, args.compile, args.override
                    )
                )
        except Exception as err:  # report the failure in the table instead of losing the other rows
            rows.append({"arch": arch, "error": f"{type(err).__name__}: {str(err)[:1500]}"})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    result = {
        "device": device_name(),
        "torch": torch.__version__,
        "git": rev.stdout.strip(),
        "mode": "trainer" if args.trainer else "bench loop",
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=1))
    what = (
        f"pretrain.train, micro {args.batch} x accum {args.accum}, median of steps > {args.warmup}"
        if args.trainer
        else f"bench loop, batch {args.batch}, bf16 autocast, fused AdamW"
    )
    print_rows(rows, f"device {result['device']}, {what}, overrides {args.override}")


if __name__ == "__main__":
    main()
