"""Generation benchmark: Based-1.3B vs Transformer++-1.3B shapes (random weights, bf16) on one GPU.

    python bench/generation.py --out runs/bench/generation.json

Models: configs/based_1b_10b.yaml (d 1792, 36 layers: 22 BaseConv, 7 Taylor linear attention with 16 heads
x dv 112, 7 sliding window 128) and configs/attn_1b_10b.yaml (d 1680, 36 layers, 24 heads x 70, SDPA).

- decode: a prompt of --prompt-len random tokens, then --new-tokens greedy steps through tools/generate.py's
  static-buffer step replayed from CUDA graphs (the attention KV cache preallocated, read in 128-token
  buckets); time = the decode loop without graph captures; throughput = batch x new tokens / time. Based's
  mixers use the Triton kernels that passed the probe (their fused one-token steps update the state in
  place); --reference-decode decodes on the PyTorch step code instead.
- prefill: `prefill` (logits of every position + the state) of --prefill-batches x --prefill-len tokens;
  Based's mixers on their Triton kernels, attention on torch SDPA (FlashAttention-2 kernel on H100);
  median of CUDA-event timings.
- floor: the decode step's memory-bandwidth bound, (weight bytes + batch x state bytes read and written
  per step) / bandwidth, with the bandwidth of a device-to-device copy measured in the same run.
Writes the numbers as JSON (--out) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# the repository root first: bench/kernels.py would otherwise shadow the `kernels` package
sys.path.insert(0, str(ROOT))

from based_layers import build_model  # noqa: E402
from tools.generate import StaticStep, static_attention  # noqa: E402
from tools.model_io import model_config_from_dict  # noqa: E402


def model_config(name: str, backend: str):
    import yaml

    values = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["model"]
    for section in ("base_conv", "linear_attn", "sliding_window"):
        if section in values:
            values[section] = {**values[section], "backend": backend}
    return model_config_from_dict(values)


def make_model(name: str, backend: str, device: str = "cuda"):
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(model_config(name, backend))
    return model.to(torch.bfloat16).eval()


def copy_bandwidth(device: str = "cuda") -> float:
    """Bytes per second of a 2 GiB device-to-device copy (bytes read + written)."""
    src = torch.randn(256 * 1024 * 1024, device=device, dtype=torch.float32) if device == "cuda" else None
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    bw = 2 * src.numel() * 4 / statistics.median(times[1:])
    del src, dst
    torch.cuda.empty_cache()
    return bw


def _state_rw_bytes(state: list[dict], prompt_len: int, new_tokens: int) -> int:
    """Bytes of recurrent state one decode step reads and writes, per sequence, averaged over the decode."""
    total = 0
    for layer in state:
        batch = next(iter(layer.values())).shape[0]
        if "valid" in layer:  # attention KV cache: read the cached tokens, write one
            per_token = (layer["k"][0, 0].numel() + layer["v"][0, 0].numel()) * layer["k"].element_size()
            total += per_token * (prompt_len + new_tokens / 2 + 1)
        elif "pos" in layer:  # sliding-window ring: read it, write one slot
            total += (layer["k"].numel() + layer["v"].numel()) * layer["k"].element_size() // batch
        else:  # linear-attention state, conv tails, SSM state: read and written every step
            total += 2 * sum(t.numel() * t.element_size() for t in layer.values()) // batch
    return int(total)


@torch.inference_mode()
def bench_decode(model, batch: int, prompt_len: int, new_tokens: int, bandwidth: float) -> dict:
    vocab = model.cfg.vocab_size
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device="cuda").manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, prompt_len), device="cuda", generator=gen)
    logits, state = model.prefill(ids)
    token = logits[:, -1, :vocab].argmax(-1)
    del logits
    rw = _state_rw_bytes(state, prompt_len, new_tokens)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    mode = "cuda_graphs"
    try:
        seconds, capture, graphs, steps = _decode_loop(
            model, state, token, batch, prompt_len, new_tokens, True
        )
    except Exception as err:  # capture failed: measure the same static-buffer step eagerly, on fewer steps
        mode = f"eager (graph capture failed: {type(err).__name__}: {err})"[:300]
        torch.cuda.synchronize()
        _, state = model.prefill(ids)
        seconds, capture, graphs, steps = _decode_loop(
            model, state, token, batch, prompt_len, min(new_tokens, 64), False
        )
    floor_s = (weights + batch * rw) / bandwidth
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": steps,
        "mode": mode,
        "decode_seconds": seconds,
        "ms_per_step": 1e3 * seconds / steps,
        "tokens_per_second": batch * steps / seconds,
        "graphs": graphs,
        "capture_seconds": capture,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "state_rw_bytes_per_seq_step": rw,
        "weight_bytes": weights,
        "floor_ms_per_step": 1e3 * floor_s,
        "fraction_of_floor": floor_s / (seconds / steps),
    }


def _decode_loop(model, state, token, batch: int, prompt_len: int, steps: int, graphs: bool):
    """(decode seconds without captures, capture seconds, graphs captured, steps) of greedy decoding."""
    vocab = model.cfg.vocab_size
    with static_attention(model, state, prompt_len + steps) as static_state:
        step = StaticStep(model, static_state, batch, use_graphs=graphs)
        torch.cuda.synchronize()
        capture, start = 0.0, time.perf_counter()
        for _ in range(steps):
            if graphs and step.will_capture():  # keep graph captures out of the time
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = step(token)
                torch.cuda.synchronize()
                capture += time.perf_counter() - t0
            else:
                out = step(token)
            token = out[:, :vocab].argmax(-1)
        torch.cuda.synchronize()
        return time.perf_counter() - start - capture, capture, len(step.graphs), steps


@torch.inference_mode()
def bench_eager_decode(model, steps: int = 32) -> dict:
    """Batch-1 decode without CUDA graphs, to show what the graphs save."""
    vocab = model.cfg.vocab_size
    ids = torch.randint(0, vocab, (1, 16), device="cuda")
    logits, state = model.prefill(ids)
    token = logits[:, -1, :vocab].argmax(-1)
    for _ in range(4):
        logits, state = model.step(token, state)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        logits, state = model.step(token, state)
        token = logits[:, :vocab].argmax(-1)
    torch.cuda.synchronize()
    return {"ms_per_step": 1e3 * (time.perf_counter() - start) / steps}


@torch.inference_mode()
def graph_check(model, batch: int = 4, steps: int = 24) -> dict:
    """CUDA-graph decode (static buffers, bucketed KV cache) against the eager step: same tokens and logits?"""
    from tools.generate import generate

    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in (40, 17, 29, 8)][
        :batch
    ]
    eager = generate(model, prompts, steps, keep_logits=True)
    graph = generate(model, prompts, steps, keep_logits=True, cuda_graph=True)
    same = sum(
        a == b for ra, rb in zip(eager.tokens, graph.tokens, strict=True) for a, b in zip(ra, rb, strict=True)
    )
    first = (graph.logits[:, :2] - eager.logits[:, :2]).norm() / eager.logits[:, :2].norm()
    return {"tokens_equal_fraction": same / (batch * steps), "first_steps_rel_err": first.item()}


@torch.inference_mode()
def bench_prefill(model, batch: int, seqlen: int, repeats: int = 3) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seqlen), device="cuda")
    times = []
    for i in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        logits, state = model.prefill(ids)
        end.record()
        torch.cuda.synchronize()
        del logits, state
        if i >= 1:
            times.append(start.elapsed_time(end) / 1e3)
    seconds = statistics.median(times)
    return {
        "batch": batch,
        "seqlen": seqlen,
        "seconds": seconds,
        "ms": 1e3 * seconds,
        "tokens_per_second": batch * seqlen / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def _guard(results: dict, key: str, fn, *args):
    """Run one measurement; an error is recorded (and printed) instead of ending the benchmark."""
    try:
        results[key] = fn(*args)
        print(f"  {key}: {json.dumps(results[key], default=float)[:220]}", flush=True)
    except Exception as err:  # keep the other measurements
        results[key] = {"error": f"{type(err).__name__}: {err}"[:800]}
        print(f"  {key}: ERROR {results[key]['error']}", flush=True)
        torch.cuda.empty_cache()
    if _SAVE is not None:
        _SAVE()


_SAVE = None


PROBE = """
import sys
sys.path.insert(0, {root!r})
from bench.generation import probe_kernels
probe_kernels({shapes!r})
"""


def probe_kernels(shapes=((1, 4096), (8, 4096))) -> dict:
    """{mixer section: "triton" or "reference"}: each Triton kernel at the prefill shapes vs its reference.

    Runs in a child process (see `kernel_backends`): a kernel that faults leaves the CUDA context unusable.
    """
    from based_layers.mixers import MIXER_CLASSES

    cfg = model_config("based_1b_10b", "triton")
    choice = {}
    for section in ("base_conv", "sliding_window", "linear_attn"):
        torch.manual_seed(0)
        with torch.device("cuda"):
            mixer = MIXER_CLASSES[section](cfg.d_model, getattr(cfg, section)).to(torch.bfloat16)
        err = 0.0
        for batch, seqlen in shapes:
            x = torch.randn(batch, seqlen, cfg.d_model, device="cuda", dtype=torch.bfloat16)
            with torch.inference_mode():
                mixer.backend = "triton"
                fast, _ = mixer(x, return_state=True)
                mixer.backend = "reference"
                ref, _ = mixer(x, return_state=True)
                torch.cuda.synchronize()
            err = max(err, ((fast.float() - ref.float()).norm() / ref.float().norm()).item())
        choice[section] = "triton" if err < 2e-2 else "reference"
        choice[f"{section}_rel_err"] = err
        print("PROBE" + json.dumps({section: choice[section], f"{section}_rel_err": err}), flush=True)
    return choice


def kernel_backends(shapes) -> dict:
    """Probe the Triton kernels in a child process; a kernel that failed or was not reached uses its reference."""
    import subprocess

    choice = {"base_conv": "reference", "linear_attn": "reference", "sliding_window": "reference"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", PROBE.format(root=str(ROOT), shapes=tuple(shapes))],
            capture_output=True,
            text=True,
            timeout=150,
        )
        for line in proc.stdout.splitlines():
            if line.startswith("PROBE"):
                choice.update(json.loads(line[5:]))
        if proc.returncode != 0:
            choice["error"] = proc.stderr.strip().splitlines()[-1][:400] if proc.stderr.strip() else "crashed"
    except subprocess.TimeoutExpired:
        choice["error"] = "probe timed out"
    return choice


def set_backends(model, backends: dict) -> None:
    """Switch Based's mixers between Triton and reference (they read `backend` at call time)."""
    from based_layers.mixers import BaseConv, LinearAttention, SlidingWindowAttention

    sections = {
        BaseConv: "base_conv",
        LinearAttention: "linear_attn",
        SlidingWindowAttention: "sliding_window",
    }
    for block in model.transformer.layers.values():
        section = sections.get(type(block.mixer))
        if section is not None:
            block.mixer.backend = backends.get(section, "reference")


def run(args) -> dict:
    global _SAVE
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _SAVE = lambda: args.out.write_text(
        json.dumps(results, indent=1, default=float) + "\n"
    )  # after each measurement
    results["copy_bandwidth_bytes_per_s"] = bandwidth = copy_bandwidth()
    print(f"device {results['device']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    # Based's mixers run the Triton kernels that pass the probe (prefill shapes, in a child process), for
    # prefill and for decode (the fused one-token steps); --reference-decode decodes on the PyTorch steps
    results["kernel_backends"] = backends = kernel_backends(
        [(b, args.prefill_len) for b in args.prefill_batches]
    )
    print(f"Based mixer backends: {backends}", flush=True)
    models = {
        "based": make_model("based_1b_10b", "reference"),
        "attn": make_model("attn_1b_10b", "reference"),
    }
    results["decode_backends"] = "reference" if args.reference_decode else "probed"
    if not args.reference_decode:
        set_backends(models["based"], backends)
    for name, model in models.items():
        results[name] = {"parameters": model.num_parameters()}
        print(f"{name}: {results[name]['parameters']:,} parameters", flush=True)
    for batch in args.batches:  # both models at each batch size, so that a cut-short run still has ratios
        for name, model in models.items():
            _guard(
                results[name],
                f"decode_b{batch}",
                bench_decode,
                model,
                batch,
                args.prompt_len,
                args.new_tokens,
                bandwidth,
            )
    for name, model in models.items():
        _guard(results[name], "eager_decode_b1", bench_eager_decode, model)
        _guard(results[name], "graph_check", graph_check, model)
    set_backends(models["based"], backends)
    for batch in args.prefill_batches:
        for name, model in models.items():
            _guard(results[name], f"prefill_b{batch}", bench_prefill, model, batch, args.prefill_len)
    return results


def table(results: dict) -> str:
    rows = ["| measurement | Based-1.3B | Transformer++-1.3B | Based / Transformer |", "|---|---|---|---|"]
    based, attn = results["based"], results["attn"]

    def cell(entry, key, field, fmt):
        value = entry.get(key, {}).get(field)
        return fmt.format(value) if value is not None else entry.get(key, {}).get("error", "-")[:40]

    for key in [k for k in based if k.startswith("decode_b")]:
        b, a = based[key].get("tokens_per_second"), attn.get(key, {}).get("tokens_per_second")
        ratio = f"{b / a:.2f}x" if b and a else "-"
        rows.append(
            f"| decode tokens/s, batch {key[8:]} | {cell(based, key, 'tokens_per_second', '{:,.0f}')} | "
            f"{cell(attn, key, 'tokens_per_second', '{:,.0f}')} | {ratio} |"
        )
        rows.append(
            f"| decode ms/step (floor), batch {key[8:]} | {cell(based, key, 'ms_per_step', '{:.2f}')} "
            f"({cell(based, key, 'floor_ms_per_step', '{:.2f}')}) | {cell(attn, key, 'ms_per_step', '{:.2f}')} "
            f"({cell(attn, key, 'floor_ms_per_step', '{:.2f}')}) | |"
        )
    for key in [k for k in based if k.startswith("prefill_b")]:
        b, a = based[key].get("seconds"), attn.get(key, {}).get("seconds")
        ratio = f"{a / b:.2f}x faster" if b and a else "-"
        rows.append(
            f"| prefill ms, batch {key[9:]} x {results['args']['prefill_len']} | "
            f"{cell(based, key, 'ms', '{:.1f}')} | {cell(attn, key, 'ms', '{:.1f}')} | {ratio} |"
        )
    b, a = (
        based.get("eager_decode_b1", {}).get("ms_per_step"),
        attn.get("eager_decode_b1", {}).get("ms_per_step"),
    )
    rows.append(
        f"| eager (no graph) ms/step, batch 1 | {b if b is None else f'{b:.2f}'} | "
        f"{a if a is None else f'{a:.2f}'} | |"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,16,64,128")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--prefill-len", type=int, default=4096)
    parser.add_argument("--prefill-batches", default="1,8")
    parser.add_argument("--reference-decode", action="store_true",
                        help="decode Based on its PyTorch step code instead of the probed Triton kernels")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "generation.json")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.prefill_batches = [int(b) for b in args.prefill_batches.split(",")]
    if not torch.cuda.is_available():
        print("bench/generation.py needs a CUDA GPU", file=sys.stderr)
        return 1
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
