"""The decode step's matrix products: our Triton decode_linear against cuBLAS at every weight shape.

    python bench/decode_linear.py [--models based,attn,mamba] [--rows 1,16] [--out results.json]

For each distinct weight shape [N, K] (and bias) of the 1.3B configs' Linear layers, at 1 and 16 rows of x
(decode batch 1 and 16), bf16: torch's linear (cuBLAS) and decode_linear over a grid of tiles. Each timing is a
CUDA graph of 64 products cycling over copies of the weight that together exceed the L2 cache (a decode step
reads every weight once, cold), so it includes the gaps between kernels that a graph replay has. Prints a
table with GB/s against the copy bandwidth and, for the shapes where the best tile beats cuBLAS by 3% or
more at every row count up to some M, the kernels/tiles.py DECODE_LINEAR_TILES entries (max_rows = that M).

`--swiglu` times decode_swiglu (fc1 and the SwiGLU gate in one kernel) over a grid of tiles against the two
kernels it replaces (torch's linear for fc1, then the SwiGLU op) at the 1.3B configs' fc1 shapes.

`--pdl` times both kernels at their table tiles three ways in the same graphs: launched without programmatic
dependent launch (BASED_PDL=0), with it (each call's launch overlaps the call before), and with it plus the
L2 prefetch of the first K tiles of each program's weight rows before the wait (kernels/_pdl.py; off by default).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from based_layers import build_model  # noqa: E402
from based_layers.mixers.linear_attention import LinearAttention  # noqa: E402
from bench.generation import CONFIGS, copy_bandwidth, model_config  # noqa: E402
from kernels.decode_linear import MAX_ROWS, SWIGLU_TILES, decode_linear, decode_swiglu  # noqa: E402
from kernels.swiglu import swiglu  # noqa: E402

TILE_GRID = ([dict(block_n=bn, block_k=bk, num_stages=st, num_warps=4)
              for bn, bk, st in itertools.product((16, 32, 64), (128, 256), (3, 5))]
             + [dict(block_n=16, block_k=512, num_stages=3, num_warps=4),
                dict(block_n=32, block_k=512, num_stages=3, num_warps=8),
                dict(block_n=64, block_k=128, num_stages=4, num_warps=8)])
SWIGLU_GRID = [dict(block_n=bn, block_k=bk, num_stages=st, num_warps=4)
               for bn, bk, st in ((16, 256, 3), (32, 128, 5), (32, 256, 3), (64, 128, 4), (16, 512, 3))]
# fc1 [2H, K] of the 1.3B configs with a GatedMLP: Based, Transformer++
SWIGLU_SHAPES = ((1792, 7168), (1680, 8960))
L2_BYTES = 50 * 2**20
WIN = 0.97


def weight_shapes(models: list[str]) -> dict[tuple[int, int, bool], list[str]]:
    """(K, N, has bias) -> the model:layer names that use it (models built on the meta device), the decode
    step's stacked q, k, v product of each linear-attention layer (tools.generate._FusedQKV) included."""
    shapes: dict[tuple[int, int, bool], list[str]] = {}
    for name in models:
        with torch.device("meta"):
            model = build_model(model_config(CONFIGS[name], "reference"))
        for mod_name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                key = (mod.in_features, mod.out_features, mod.bias is not None)
                shapes.setdefault(key, []).append(f"{name}:{mod_name}")
            if isinstance(mod, LinearAttention):
                stacked = sum(p.out_features for p in (mod.proj_q, mod.proj_k, mod.proj_v))
                shapes.setdefault((mod.proj_q.in_features, stacked, False), []).append(f"{name}:{mod_name}.qkv")
    return shapes


def graph_us(fn, xs, weights, biases, calls: int = 64, replays: int = 10) -> float:
    """Microseconds per product: one CUDA graph of `calls` products cycling over the weight copies."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):  # compile and warm up outside the capture
            fn(xs, weights[i % len(weights)], biases[i % len(weights)])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(xs, weights[i % len(weights)], biases[i % len(weights)])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def _cold_weights(k: int, n: int, has_bias: bool) -> tuple[list, list]:
    """Copies of a bf16 weight [N, K] (and bias) that together exceed the L2 cache."""
    copies = max(2, min(64, -(-4 * L2_BYTES // (2 * k * n))))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
    return weights, [torch.randn(n, device="cuda", dtype=torch.bfloat16) if has_bias else None for _ in weights]


def _tile_timings(kernel, x, weights, biases, ref: torch.Tensor, grid: list[dict], label: str) -> list[dict]:
    """us per call of kernel(x, w, b, **tiles) for each tile of `grid` within 2e-2 of `ref`, fastest first; a
    tile that does not compile or is wrong is reported and skipped."""
    timed = []
    for tiles in grid:
        try:
            with torch.no_grad():
                y = kernel(x, weights[0], biases[0], **tiles).float()
            err = ((y - ref).norm() / ref.norm()).item()
            if not err < 2e-2:
                raise RuntimeError(f"relative error {err:.2e} against the unfused form")
            us = graph_us(lambda x, w, b, t=tiles: kernel(x, w, b, **t), x, weights, biases)
        except Exception as exc:
            print(f"  {label} {tiles}: failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            continue
        timed.append({**tiles, "us": us})
    return sorted(timed, key=lambda t: t["us"])


def bench_shape(k: int, n: int, has_bias: bool, rows_list: list[int]) -> dict:
    weights, biases = _cold_weights(k, n, has_bias)
    out = {"K": k, "N": n, "bias": has_bias, "rows": {}}
    kernel = lambda x, w, b, **t: decode_linear(x, w, b, backend="triton", **t)  # noqa: E731
    for rows in rows_list:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, weights[0], biases[0]).float()
        out["rows"][rows] = {"cublas_us": graph_us(lambda x, w, b: F.linear(x, w, b), x, weights, biases),
                             "tiles": _tile_timings(kernel, x, weights, biases, ref, TILE_GRID, f"K{k} N{n} M{rows}")}
    del weights, biases
    torch.cuda.empty_cache()
    return out


def bench_swiglu(k: int, n: int, rows_list: list[int]) -> dict:
    """us per call of decode_swiglu over SWIGLU_GRID (SWIGLU_TILES marked) and of fc1 on cuBLAS + the SwiGLU op."""
    weights, biases = _cold_weights(k, n, False)
    out = {"K": k, "N": n, "rows": {}}
    grid = SWIGLU_GRID + ([SWIGLU_TILES] if SWIGLU_TILES not in SWIGLU_GRID else [])
    kernel = lambda x, w, b, **t: decode_swiglu(x, w, **t)  # noqa: E731
    for rows in rows_list:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        ref = swiglu(F.linear(x, weights[0])).float()
        tiles = [] if rows > MAX_ROWS else _tile_timings(kernel, x, weights, biases, ref, grid,
                                                         f"fc1 + gate K{k} N{n} M{rows}")
        out["rows"][rows] = {"unfused_us": graph_us(lambda x, w, b: swiglu(F.linear(x, w)), x, weights, biases),
                             "tiles": [{**t, "default": {f: t[f] for f in SWIGLU_TILES} == SWIGLU_TILES}
                                       for t in tiles]}
    del weights, biases
    torch.cuda.empty_cache()
    return out


def run_swiglu(rows_list: list[int]) -> list[dict]:
    """bench_swiglu at every SWIGLU_SHAPES entry; one printed row per shape."""
    results = []
    for k, n in SWIGLU_SHAPES:
        result = bench_swiglu(k, n, rows_list)
        results.append(result)
        cells = []
        for rows, e in result["rows"].items():
            if rows > MAX_ROWS:
                cells.append(f"M{rows}: unfused {e['unfused_us']:.2f} (the kernel takes at most {MAX_ROWS} rows)")
                continue
            best = e["tiles"][0] if e["tiles"] else {"us": float("nan"), "block_n": 0, "block_k": 0, "num_stages": 0}
            default = next((t["us"] for t in e["tiles"] if t["default"]), float("nan"))
            cells.append(f"M{rows}: unfused {e['unfused_us']:.2f} default {default:.2f} best {best['us']:.2f} "
                         f"({best['block_n']}/{best['block_k']}/{best['num_stages']})")
        print(f"| fc1 + gate K{k} N{n} | " + " | ".join(cells) + " |", flush=True)
    return results


PDL_FORMS = {"off": {"BASED_PDL": "0"}, "pdl": {"BASED_PDL": "1", "BASED_PDL_PREFETCH": "0"},
             "pdl+prefetch": {"BASED_PDL": "1", "BASED_PDL_PREFETCH": "1"}}


@contextlib.contextmanager
def _env(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bench_pdl(k: int, n: int, has_bias: bool, rows_list: list[int], swiglu_form: bool) -> dict:
    """us per call of decode_linear (or decode_swiglu) at its table tiles in each PDL_FORMS form."""
    weights, biases = _cold_weights(k, n, has_bias)
    if swiglu_form:
        kernel = lambda x, w, b: decode_swiglu(x, w)  # noqa: E731
    else:
        kernel = lambda x, w, b: decode_linear(x, w, b, backend="triton")  # noqa: E731
    out = {"K": k, "N": n, "bias": has_bias, "swiglu": swiglu_form, "rows": {}}
    for rows in rows_list:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        forms = {}
        for name, env in PDL_FORMS.items():
            with _env(env):
                forms[name] = graph_us(kernel, x, weights, biases)
        out["rows"][rows] = forms
    del weights, biases
    torch.cuda.empty_cache()
    return out


def run_pdl(models: list[str], rows_list: list[int], bandwidth: float) -> list[dict]:
    """bench_pdl at every weight shape of `models` and at the fc1 shapes (decode_swiglu); a row per shape."""
    rows_list = [r for r in rows_list if r <= MAX_ROWS]
    shapes = [(k, n, b, False) for (k, n, b) in sorted(weight_shapes(models))]
    shapes += [(k, n, False, True) for k, n in SWIGLU_SHAPES]
    print("| weight [N, K] | floor us | " + " | ".join(f"M{r}: " + " / ".join(PDL_FORMS) for r in rows_list) + " |")
    results = []
    for k, n, has_bias, swiglu_form in shapes:
        result = bench_pdl(k, n, has_bias, rows_list, swiglu_form)
        results.append(result)
        label = f"{n} x {k}{' +b' if has_bias else ''}{' fc1+gate' if swiglu_form else ''}"
        cells = [" / ".join(f"{result['rows'][r][f]:.2f}" for f in PDL_FORMS) for r in rows_list]
        print(f"| {label} | {2 * k * n / bandwidth * 1e6:.2f} | " + " | ".join(cells) + " |", flush=True)
    return results


def table_entry(result: dict) -> dict | None:
    """The tile that is fastest summed over the row counts where it beats cuBLAS, with max_rows; None if none."""
    best = None
    rows_sorted = sorted(result["rows"])
    for tiles in result["rows"][rows_sorted[0]]["tiles"]:
        key = {f: tiles[f] for f in ("block_n", "block_k", "num_stages", "num_warps")}
        max_rows, total = 0, 0.0
        for rows in rows_sorted:
            entry = result["rows"][rows]
            match = [t for t in entry["tiles"] if all(t[f] == v for f, v in key.items())]
            if not match or match[0]["us"] > WIN * entry["cublas_us"]:
                break
            max_rows, total = rows, total + match[0]["us"]
        if max_rows and (best is None or (max_rows, -total) > (best["max_rows"], -best["total"])):
            best = {**key, "max_rows": max_rows, "total": total}
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="based,attn,mamba")
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--swiglu", action="store_true", help="time decode_swiglu (fc1 + gate) instead")
    parser.add_argument("--pdl", action="store_true", help="time both kernels without PDL, with it, with prefetch")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "decode_linear.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/decode_linear.py needs a CUDA GPU")
    rows_list = [int(r) for r in args.rows.split(",")]
    if args.swiglu:
        results = run_swiglu(rows_list)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "swiglu": results}, indent=1))
        return 0
    bandwidth = copy_bandwidth()
    if args.pdl:
        results = run_pdl(args.models.split(","), rows_list, bandwidth)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth,
                                        "pdl": results}, indent=1))
        return 0
    results, found = [], {}
    for (k, n, has_bias), users in sorted(weight_shapes(args.models.split(",")).items()):
        result = bench_shape(k, n, has_bias, rows_list)
        result["users"] = len(users)
        result["example"] = users[0]
        results.append(result)
        found.setdefault((k, n), []).append(table_entry(result))
        floor_us = 2 * k * n / bandwidth * 1e6
        cells = []
        for rows in rows_list:
            e = result["rows"][rows]
            best = e["tiles"][0] if e["tiles"] else None
            ours = f"{best['us']:.2f} ({best['block_n']}/{best['block_k']}/{best['num_stages']}/{best['num_warps']})" \
                if best else "-"
            cells.append(f"M{rows}: cuBLAS {e['cublas_us']:.2f} ours {ours}")
        print(f"| K{k} N{n}{' +b' if has_bias else ''} x{len(users)} | floor {floor_us:.2f} us | "
              + " | ".join(cells) + " |", flush=True)
    # one entry per (K, N): with and without a bias both must win, and the smaller max_rows holds for both
    entries = {key: min(found_, key=lambda e: e["max_rows"]) for key, found_ in found.items() if None not in found_}
    code = ["DECODE_LINEAR_TILES['" + torch.cuda.get_device_name().split()[-1] + "'] = {"]
    for (k, n), e in sorted(entries.items()):
        fields = ", ".join(f'"{f}": {e[f]}' for f in ("block_n", "block_k", "num_stages", "num_warps", "max_rows"))
        code.append(f"    ({k}, {n}): {{{fields}}},")
    code.append("}")
    print("\n".join(code))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth,
                                    "results": results, "code": "\n".join(code)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
