"""Training throughput of the 1.3B Based, Transformer++ and Mamba shapes on one GPU, side by side.

    python bench/train_throughput.py [--archs based,attn,mamba] [--batch 4] [--steps 8] [--backend triton]

Random tokens, seq 2048, bf16 autocast over fp32 weights, fused AdamW, the trainer's loss. Prints one table
(tokens/s, MFU by the architecture-aware FLOPs model over the 989 TFLOP/s bf16 dense peak, peak memory) and
writes JSON to --out. MFU here counts the model's FLOPs only (no recomputation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# the repository root first: bench/kernels.py would otherwise shadow the `kernels` package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn import functional as F

from based_layers import build_model  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.flops import training_flops_per_token  # noqa: E402

CONFIGS = {
    "based": "configs/based_1b_50b.yaml",
    "attn": "configs/attn_1b_50b.yaml",
    "mamba": "configs/mamba_1b_50b.yaml",
}
PEAK = 989e12


def measure(arch: str, batch: int, steps: int, warmup: int, backend: str, compile_model: bool) -> dict:
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
    cfg = load_config(CONFIGS[arch], overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model).cuda()
    if compile_model:
        for key, block in list(model.transformer.layers.items()):
            model.transformer.layers[key] = torch.compile(block)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    seq = cfg.data.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

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
        "batch": batch,
        "seq_len": seq,
        "ms_per_step": elapsed * 1e3,
        "tokens_per_s": tps,
        "mfu": flops * tps / PEAK,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "params": model.num_parameters(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", default="based,attn,mamba")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backend", default="triton", help="Based mixer backend: triton or reference")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", default="bench_train_throughput.json")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for arch in args.archs.split(","):
        try:
            rows.append(measure(arch, args.batch, args.steps, args.warmup, args.backend, args.compile))
        except Exception as err:  # report the failure in the table instead of losing the other rows
            rows.append({"arch": arch, "error": f"{type(err).__name__}: {str(err)[:200]}"})
        torch.cuda.empty_cache()
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "git": rev, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    attn_tps = next(
        (r["tokens_per_s"] for r in rows if r.get("arch") == "attn" and "tokens_per_s" in r), None
    )
    print(f"device {result['device']}, batch {args.batch} x 2048, bf16 autocast, fused AdamW")
    print(
        f"{'arch':6s} {'backend':9s} {'ms/step':>9s} {'tokens/s':>10s} {'MFU':>6s} {'vs attn':>8s} {'mem GiB':>8s}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['arch']:6s} error: {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / attn_tps:.2f}x" if attn_tps else "-"
        print(
            f"{r['arch']:6s} {r['backend']:9s} {r['ms_per_step']:9.1f} {r['tokens_per_s']:10.0f} "
            f"{r['mfu']:6.1%} {ratio:>8s} {r['peak_mem_gib']:8.1f}"
        )


if __name__ == "__main__":
    main()
