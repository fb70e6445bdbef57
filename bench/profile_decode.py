"""Where a decode step's time goes: GPU kernel time per step by kernel, against the CUDA-graph step time.

    python bench/profile_decode.py --config based_1b_10b --batch 64 --out runs/bench/profile_decode.json
    python bench/profile_decode.py --config based_1b_10b --batch 64 --compile default   # the compiled step

Builds the model as bench/generation.py does (random weights, bf16, Triton mixers for Based), prefills a
--prompt-len prompt, then profiles --steps eager static-buffer steps (tools/generate.py's StaticStep without
graphs: the same kernels as the graph replays, launched one by one) with torch.profiler, and times the same
number of graph replays. The step is the one bench/generation.py times: the greedy head inside the step, and
with --compile MODE the torch.compile'd regions (tools.generate.compiled_regions). Prints the kernel time
per step (the sum of GPU kernel durations; if it is far below
the graph step time, the step is bound by per-kernel overheads, not by the kernels) and the kernels that take
most of it, and writes both as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# the repository root first: bench/kernels.py would otherwise shadow the `kernels` package
sys.path.insert(0, str(ROOT))

from bench.generation import make_model, mamba_ssm_error  # noqa: E402
from bench.profile_step import breakdown  # noqa: E402
from tools import generate as tools_generate  # noqa: E402
from tools.generate import StaticStep, static_attention  # noqa: E402


def _prefilled_state(model, batch: int, prompt_len: int):
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), device=next(model.parameters()).device)
    with torch.no_grad():
        logits, state = model.prefill(prompt)
    return logits[:, -1].argmax(-1), state


def kernel_table(model, batch: int, prompt_len: int, steps: int, compile_mode: str | None = None
                 ) -> tuple[list[dict], float]:
    """Per kernel name: calls and GPU microseconds per step, over `steps` eager static steps."""
    token, state = _prefilled_state(model, batch, prompt_len)
    capacity = prompt_len + 2 * steps + 2
    with torch.inference_mode(), static_attention(model, state, capacity) as static_state:
        step = StaticStep(model, static_state, batch, use_graphs=False, compile_mode=compile_mode, greedy=True)
        step(token)  # warm-up: Triton and torch.compile compile outside the profile
        step()
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel[event.name]
            entry[0] += 1
            entry[1] += event.device_time
    rows = [{"kernel": name, "calls_per_step": calls / steps, "us_per_step": us / steps}
            for name, (calls, us) in per_kernel.items()]
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows, sum(r["us_per_step"] for r in rows)


def graph_step_ms(model, batch: int, prompt_len: int, steps: int, compile_mode: str | None = None) -> float:
    """Mean ms of one CUDA-graph step replay (capture excluded)."""
    token, state = _prefilled_state(model, batch, prompt_len)
    with torch.inference_mode(), static_attention(model, state, prompt_len + steps + 2) as static_state:
        step = StaticStep(model, static_state, batch, use_graphs=True, compile_mode=compile_mode, greedy=True)
        step(token)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="based_1b_10b", help="a configs/*.yaml name")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--compile", default="off", help="torch.compile mode of the step (off: eager kernels)")
    parser.add_argument("--linears", default="gated", choices=tools_generate.LINEAR_CHOICES,
                        help="Linear layers on decode_linear where kernels/tiles.py lists them, the "
                             "linear-attention q, k, v as one product, each block's last add deferred into the "
                             "next fused norm and fc1 and the gate as one kernel (gated); the same without the "
                             "gate (fused); without the deferred adds (table); decode_linear alone (unfused); "
                             "or cuBLAS")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "profile_decode.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/profile_decode.py needs a CUDA GPU")
    # Mamba on mamba-ssm's step kernels where they import
    model = make_model(args.config, "triton", mamba_backend="reference" if mamba_ssm_error() else "mamba_ssm")
    compile_mode = None if args.compile == "off" else args.compile
    tools_generate.set_linears(args.linears)
    rows, kernel_us = kernel_table(model, args.batch, args.prompt_len, args.steps, compile_mode)
    graph_ms = graph_step_ms(model, args.batch, args.prompt_len, args.steps, compile_mode)
    calls = sum(r["calls_per_step"] for r in rows)
    print(f"{args.config} batch {args.batch}: graph step {graph_ms:.3f} ms; GPU kernel time {kernel_us / 1e3:.3f} ms "
          f"per step in {calls:.0f} kernels ({kernel_us / 1e3 / graph_ms:.0%} of the step)")
    by_category = {cat: ms * 1e3 for cat, ms in breakdown({r["kernel"]: r["us_per_step"] for r in rows}, 1)["ms"].items()
                   if ms}
    print("by category (us/step): " + ", ".join(f"{cat} {us:.1f}" for cat, us in
                                                 sorted(by_category.items(), key=lambda kv: -kv[1])))
    print("| kernel | calls/step | us/step | share of kernel time |\n|---|---|---|---|")
    for r in rows[: args.top]:
        print(f"| {r['kernel'][:90]} | {r['calls_per_step']:.0f} | {r['us_per_step']:.1f} | "
              f"{r['us_per_step'] / kernel_us:.1%} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": args.config, "batch": args.batch, "prompt_len": args.prompt_len,
                                    "compile": compile_mode, "linears": args.linears,
                                    "steps": args.steps, "device": torch.cuda.get_device_name(),
                                    "graph_step_ms": graph_ms, "kernel_us_per_step": kernel_us,
                                    "by_category_us": by_category,
                                    "kernels": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
