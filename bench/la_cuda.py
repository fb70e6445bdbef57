"""The CUDA forward of Taylor linear attention (kernels/taylor_linear_attn/cuda) on one GPU: build, sanitizers,
correctness against the Triton forward and the float64 reference, then timings against the Triton forward.

    python bench/la_cuda.py [--out runs/bench/la_cuda.json] [--sweep] [--fresh-build] [--no-sanitize] [--quick]
                            [--tokens 32768,16384]
    python bench/la_cuda.py --stages [--out ...]   # build, then only the stage breakdown (under a minute)

1. build: nvcc at first use (seconds, or "cached"); --fresh-build builds into a new cache folder;
2. sanitizers (unless --no-sanitize; needs compute-sanitizer beside nvcc): memcheck, racecheck and synccheck
   on one small call (two value blocks, documents, initial and final state, 64-token state chunks);
3. correctness: B 2, H 3, T 1/63/64/777/2048, Dv 64/112/128, with and without packed documents and an initial
   state (final state on; off too at T 777): relative L2 error of every output (o, den, states, zst, final kv,
   k_sum) against float64 (bounds of tests/kernels/test_la_cuda.py) and against triton_impl.forward;
4. timing (ms, median of CUDA-graph replays, bench.kernels.bench_ms): forward_cuda vs triton_impl.forward
   (Plan.for_call's tiles) at B*T = 32,768, H 16, F 16, Dv 64/112/128, T 2048/4096/8192; --sweep adds the other
   value block (2 warps, BV 32).
A failing shape is reported and the run goes on (a CUDA fault poisons the context: the later rows say so).

--stages (instead of 2-4): where the kernel's time goes, without hardware counters. The kernel is timed with
stages left out (forward_cuda's `skip` mask, cuda.SKIP: each stage alone, all compute, all global loads and
stores, everything) at B16 H16 T2048 Dv64 and B8 H16 T4096 Dv128, in one process, as CUDA-graph medians; the
full kernel is timed first and last (its drift bounds what a small delta means). A delta is what the kernel
saves without that stage: its share of the critical path, not its own duration (stages that overlap others
save less than they take). Outputs of a skipped run are wrong by design.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the float64 references and bounds of the tests (one statement of them)
sys.path.insert(0, str(ROOT / "tests" / "kernels"))

from kernel_checks import BOUNDS, rel_err  # noqa: E402
from la_cuda_checks import den_reference, make_case, states_reference  # noqa: E402

from kernels.taylor_linear_attn import cuda as la_cuda  # noqa: E402
from kernels.taylor_linear_attn import taylor_linear_attention_reference  # noqa: E402
from kernels.taylor_linear_attn.plan import Plan  # noqa: E402
from kernels.tiles import LA_FIELDS  # noqa: E402

TOKENS = 32768
HEADS = 16
F = 16
OUTPUTS = ("o", "den", "states", "zst", "kv", "ks")
# (bound against float64, bound against Triton) per output: bf16 outputs at the bf16 bound, fp32 ones at 50x the
# fp32 bound (as the tests)
LIMITS = {"o": (BOUNDS[torch.bfloat16], 2e-2), "den": (50 * BOUNDS[torch.float32], 1e-5),
          "states": (BOUNDS[torch.bfloat16], 2e-2), "zst": (50 * BOUNDS[torch.float32], 1e-5),
          "kv": (BOUNDS[torch.bfloat16], 2e-2), "ks": (50 * BOUNDS[torch.float32], 1e-5)}
FLOORS = {"o": 1e-1, "den": 1e-2, "states": 1e-1, "zst": 1e-2, "kv": 1e-1, "ks": 1e-2}


def provenance() -> dict:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                         check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                           check=False).stdout.strip()
    return {"command": " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "git": (rev or "unknown") + ("+dirty" if dirty else ""), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__}


def build(fresh: bool) -> dict:
    if fresh:
        os.environ["BASED_LA_CUDA_CACHE"] = tempfile.mkdtemp(prefix="la_cuda_build_")
    nvcc = la_cuda.find_nvcc()
    cached = la_cuda.library_path(nvcc).is_file()
    start = time.time()
    path = la_cuda.built_library_path()
    lib = la_cuda.library()
    info = {"nvcc": la_cuda.nvcc_version(nvcc).splitlines()[-1], "seconds": round(time.time() - start, 1),
            "cached": cached, "path": str(path), "flags": list(la_cuda.NVCC_FLAGS),
            "smem_bytes": {w: lib.based_la_smem_bytes(w) for w in la_cuda.WARPS}}
    print(f"build: {'cached' if cached else 'built'} in {info['seconds']} s ({info['nvcc']}); shared memory per "
          f"CTA {info['smem_bytes']}", flush=True)
    return info


def sanitizer_child() -> None:
    """One small call, run under compute-sanitizer by `sanitize`."""
    q, k, v, ids, kv0, ks0 = make_case(1, 200, 1, 112, docs=True, state=True, device="cuda")
    plan = Plan(200, F, 112, chunk_size=64)
    la_cuda.forward_cuda(q, k, v, ids, 1e-12, kv0, ks0, True, plan)
    torch.cuda.synchronize()


def sanitize() -> dict:
    tool_path = la_cuda.find_nvcc().parent / "compute-sanitizer"
    if not tool_path.is_file():
        print(f"sanitizers: skipped ({tool_path} not found)", flush=True)
        return {"skipped": f"{tool_path} not found"}
    results = {}
    for tool in ("memcheck", "racecheck", "synccheck"):
        cmd = [str(tool_path), "--tool", tool, "--error-exitcode", "9", sys.executable, __file__, "--sanitizer-child"]
        start = time.time()
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
            tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-12:])
            results[tool] = {"rc": run.returncode, "seconds": round(time.time() - start, 1), "tail": tail}
        except subprocess.TimeoutExpired:
            results[tool] = {"rc": None, "seconds": 90, "tail": "timed out"}
        verdict = "PASS" if results[tool]["rc"] == 0 else "FAIL"
        print(f"sanitizer {tool}: {verdict} ({results[tool]['seconds']} s)", flush=True)
        if verdict == "FAIL":
            print(results[tool]["tail"], flush=True)
    return results


def output_errors(got, want, ref) -> dict:
    """{name: (error vs float64, error vs Triton)} of one call."""
    errs = {}
    for name, g, w, r in zip(OUTPUTS, got, want, ref, strict=True):
        if g is None:
            continue
        errs[name] = (rel_err(g, r, FLOORS[name]), rel_err(g, w, FLOORS[name]))
    return errs


def one_case(t, dv, docs, state, final) -> dict:
    from kernels.taylor_linear_attn.triton_impl import forward, layout

    b, h = 2, 3
    q, k, v, ids, kv0, ks0 = make_case(b, t, h, dv, docs=docs, state=state, device="cuda")
    plan = Plan.for_call(q, v, [0] * len(LA_FIELDS))
    o, den, (st, zst), fin = la_cuda.forward_cuda(q, k, v, ids, 1e-12, kv0, ks0, final, plan)
    o_t, den_t, (st_t, zst_t), fin_t = forward(q, k, v, ids, 1e-12, kv0, ks0, final, plan)
    init = None if kv0 is None else (kv0.double(), ks0.double())
    out = taylor_linear_attention_reference(q.double(), k.double(), v.double(), doc_ids=ids, initial_state=init,
                                            output_final_state=True)
    s_ref, z_ref = states_reference(q, k, v, ids, kv0, ks0, plan.BC, layout(F, plan.BF, str(q.device)))
    got = (o, den, st, zst, *(fin if final else (None, None)))
    want = (o_t, den_t, st_t, zst_t, *(fin_t if final else (None, None)))
    ref = (out[0], den_reference(q, k, ids, ks0, 1e-12), s_ref, z_ref, *out[1])
    errs = output_errors(got, want, ref)
    ok = all(e_ref <= LIMITS[n][0] and e_tri <= LIMITS[n][1] for n, (e_ref, e_tri) in errs.items())
    return {"T": t, "Dv": dv, "docs": docs, "state": state, "final": final, "BC": plan.BC, "errors": errs,
            "pass": ok}


def correctness(quick: bool) -> list[dict]:
    cases = [(t, dv, docs, state, True) for t in (1, 63, 64, 777, 2048) for dv in (64, 112, 128)
             for docs in (False, True) for state in (False, True)]
    cases += [(777, dv, True, True, False) for dv in (64, 112, 128)]
    if quick:
        cases = [c for c in cases if c[0] in (63, 777) and c[2] == c[3]]
    rows = []
    print("correctness (relative error vs float64 / vs Triton):", flush=True)
    print(f"{'shape':40s} " + " ".join(f"{n:>17s}" for n in OUTPUTS) + "  verdict", flush=True)
    for t, dv, docs, state, final in cases:
        label = (f"B2 H3 T{t} Dv{dv} {'packed' if docs else 'one-doc'} {'state' if state else 'zero'} "
                 f"{'final' if final else 'no-final'}")
        try:
            row = one_case(t, dv, docs, state, final)
            cells = " ".join(f"{row['errors'][n][0]:8.1e}/{row['errors'][n][1]:8.1e}" if n in row["errors"]
                             else f"{'-':>17s}" for n in OUTPUTS)
            print(f"{label:40s} {cells}  {'PASS' if row['pass'] else 'FAIL'}", flush=True)
        except Exception as err:
            row = {"T": t, "Dv": dv, "docs": docs, "state": state, "final": final, "pass": False,
                   "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            print(f"{label:40s} ERROR {row['error']}", flush=True)
        rows.append({**row, "errors": {n: list(e) for n, e in row.get("errors", {}).items()}})
    return rows


def time_shape(dv: int, t: int, sweep: bool, tokens: int = TOKENS) -> dict:
    """ms of the Triton and CUDA forwards at one shape, B = tokens // t (one document per row, no state in or
    out)."""
    from bench.kernels import bench_ms
    from kernels.taylor_linear_attn.triton_impl import forward

    b = tokens // t
    q, k = (torch.randn(b, t, HEADS, F, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(b, t, HEADS, dv, device="cuda", dtype=torch.bfloat16)
    docs = torch.zeros(b, t, dtype=torch.int32, device="cuda")
    plan = Plan.for_call(q, v, [0] * len(LA_FIELDS))
    row = {"B": b, "T": t, "Dv": dv, "BH": b * HEADS, "BC": plan.BC}
    with torch.no_grad():
        row["triton_ms"] = bench_ms(lambda: forward(q, k, v, docs, 1e-12, None, None, False, plan))
        for warps in (4, 2) if sweep else (4,):
            row[f"cuda_w{warps}_ms"] = bench_ms(
                lambda w=warps: la_cuda.forward_cuda(q, k, v, docs, 1e-12, None, None, False, plan, warps=w))
    row["ratio"] = row["cuda_w4_ms"] / row["triton_ms"]
    return row


def timing(sweep: bool, quick: bool, tokens: int = TOKENS) -> list[dict]:
    """The forwards at Dv 64/112/128 x T 2048/4096/8192 (T <= tokens), B = tokens // T."""
    shapes = [(dv, t) for dv in (64, 112, 128) for t in (2048, 4096, 8192) if t <= tokens]
    if quick:
        shapes = [(64, 2048), (128, 2048)]
    rows = []
    print(f"\ntiming (ms, B*T = {tokens}, H {HEADS}, F {F}, bf16):", flush=True)
    print(f"{'shape':22s} {'triton':>8s} {'cuda W4':>8s} {'ratio':>6s}" + (f" {'cuda W2':>8s}" if sweep else ""),
          flush=True)
    for dv, t in shapes:
        label = f"B{tokens // t} T{t} Dv{dv}"
        try:
            row = time_shape(dv, t, sweep, tokens)
            extra = f" {row['cuda_w2_ms']:8.3f}" if sweep else ""
            print(f"{label + ' BC' + str(row['BC']):22s} {row['triton_ms']:8.3f} {row['cuda_w4_ms']:8.3f} "
                  f"{row['ratio']:6.2f}{extra}", flush=True)
        except Exception as err:
            row = {"T": t, "Dv": dv, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            print(f"{label}: ERROR {row['error']}", flush=True)
        rows.append(row)
    if sweep:
        best = {f"Dv{r['Dv']}-T{r['T']}": 4 if r["cuda_w4_ms"] <= r["cuda_w2_ms"] else 2
                for r in rows if "cuda_w2_ms" in r}
        print(f"best warps per shape: {best}", flush=True)
    return rows


# (variant, skip mask) of --stages: the full kernel, each stage alone, then the groups
STAGE_SHAPES = ((16, 2048, 64), (8, 4096, 128))
LOADS_STORES = la_cuda.SKIP["loads"] | la_cuda.SKIP["output"] | la_cuda.SKIP["states"]
COMPUTE = (la_cuda.SKIP["features"] | la_cuda.SKIP["intra"] | la_cuda.SKIP["readout"] | la_cuda.SKIP["update"]
           | la_cuda.SKIP["normalize"])
STAGE_VARIANTS = (("full", 0), *((f"-{name}", bit) for name, bit in la_cuda.SKIP.items()),
                  ("compute only (-loads -output -states)", LOADS_STORES),
                  ("loads/stores only (-all compute)", COMPUTE), ("empty loop (-everything)", sum(la_cuda.SKIP.values())))


def stage_reading(rows: list[dict], full_ms: float) -> str:
    """One line: the single stages by what leaving each out saves, and the two groups."""
    singles = sorted((r for r in rows if r["variant"].startswith("-")), key=lambda r: -r["delta_ms"])
    parts = [f"{r['variant'][1:]} {r['delta_pct']:.0f}%" for r in singles[:5]]
    groups = {r["variant"]: r for r in rows}
    compute = groups["compute only (-loads -output -states)"]
    memory = groups["loads/stores only (-all compute)"]
    return (f"of {full_ms:.3f} ms, leaving out saves: " + ", ".join(parts)
            + f"; compute alone runs {compute['ms']:.3f} ms ({100 * compute['ms'] / full_ms:.0f}% of the kernel), "
            f"loads/stores alone {memory['ms']:.3f} ms ({100 * memory['ms'] / full_ms:.0f}%)")


def stage_shape(b: int, t: int, dv: int) -> dict:
    """ms of every STAGE_VARIANTS mask at one shape (one document per row, no state in or out)."""
    from bench.kernels import bench_ms

    q, k = (torch.randn(b, t, HEADS, F, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(b, t, HEADS, dv, device="cuda", dtype=torch.bfloat16)
    docs = torch.zeros(b, t, dtype=torch.int32, device="cuda")
    plan = Plan.for_call(q, v, [0] * len(LA_FIELDS))

    def ms(skip: int) -> float:
        with torch.no_grad():
            return bench_ms(lambda: la_cuda.forward_cuda(q, k, v, docs, 1e-12, None, None, False, plan, skip=skip))

    times = {name: ms(skip) for name, skip in STAGE_VARIANTS}
    full_again = ms(0)
    full = 0.5 * (times["full"] + full_again)
    rows = [{"variant": name, "skip": skip, "ms": times[name], "delta_ms": full - times[name],
             "delta_pct": 100 * (full - times[name]) / full} for name, skip in STAGE_VARIANTS]
    return {"B": b, "T": t, "H": HEADS, "Dv": dv, "BC": plan.BC, "full_first_ms": times["full"],
            "full_last_ms": full_again, "full_ms": full, "variants": rows, "reading": stage_reading(rows, full)}


def stages() -> list[dict]:
    results = []
    for b, t, dv in STAGE_SHAPES:
        label = f"B{b} H{HEADS} T{t} F{F} Dv{dv}"
        try:
            res = stage_shape(b, t, dv)
        except Exception as err:
            results.append({"B": b, "T": t, "Dv": dv, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"})
            print(f"\nstages {label}: ERROR {results[-1]['error']}", flush=True)
            continue
        print(f"\nstages {label} BC{res['BC']} (ms, CUDA-graph medians; full {res['full_first_ms']:.4f} first, "
              f"{res['full_last_ms']:.4f} last):", flush=True)
        print(f"{'variant':40s} {'skip':>5s} {'ms':>8s} {'saves ms':>9s} {'saves %':>8s}", flush=True)
        for r in res["variants"]:
            print(f"{r['variant']:40s} {r['skip']:5d} {r['ms']:8.4f} {r['delta_ms']:9.4f} {r['delta_pct']:7.1f}%",
                  flush=True)
        print(f"reading: {res['reading']}", flush=True)
        results.append(res)
    return results


def parse_tokens(text: str) -> list[int]:
    """--tokens' comma list as integers; a usage error naming the flag on anything else."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 2048 for v in values):
        raise SystemExit(f"la_cuda.py: --tokens takes a comma list of integers >= 2048; got {text!r}")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "la_cuda.json")
    ap.add_argument("--sweep", action="store_true", help="also time the 2-warp (BV 32) kernel")
    ap.add_argument("--fresh-build", action="store_true", help="build into a new cache folder (times the build)")
    ap.add_argument("--no-sanitize", action="store_true", help="skip compute-sanitizer")
    ap.add_argument("--quick", action="store_true", help="a few correctness cases and two timed shapes")
    ap.add_argument("--tokens", default=str(TOKENS),
                    help="comma list of B*T totals to time at (e.g. 32768,16384: 16384 is the published runs' "
                         "micro batch, 8 x 2048)")
    ap.add_argument("--stages", action="store_true",
                    help="only the build and the stage breakdown (the kernel timed with stages left out)")
    ap.add_argument("--sanitizer-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    token_totals = parse_tokens(args.tokens)
    if args.sanitizer_child:
        sanitizer_child()
        return
    out = {"provenance": provenance()}
    try:
        out["build"] = build(args.fresh_build)
        if args.stages:
            out["stages"] = stages()
        else:
            if not args.no_sanitize:
                out["sanitize"] = sanitize()
            out["correct"] = correctness(args.quick)
            out["timing"] = [row for tokens in token_totals
                             for row in timing(args.sweep, args.quick, tokens)]
            failed = [r for r in out["correct"] if not r["pass"]]
            print(f"\ncorrectness: {len(out['correct']) - len(failed)}/{len(out['correct'])} PASS", flush=True)
    except Exception:
        out["error"] = traceback.format_exc()
        print(out["error"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
