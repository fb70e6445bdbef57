"""Fused linear attention (kernels/taylor_linear_attn/fused_impl.py) against the chunk-state kernels, SDPA and
the floor, on one CUDA GPU; block-size sweep of the fused kernels.

    python bench/la_fused.py [--out results.json] [--quick]

1. correctness on the GPU (fp32 and bf16, packed documents, initial/final state) against the chunked
   PyTorch reference in fp32;
2. forward at ThunderKittens' shape (B 16, H 16, T 2048, F 16, Dv 64, bf16): chunk-state kernels vs the
   fused kernel over a grid of (chunk, value block, warps);
3. forward + backward at B*T = 32k, 16 heads, Dv 64 / 112 / 128, T 2048 / 4096 / 8192: chunk-state, fused
   (backward blocks swept at T 2048), SDPA full causal attention at the same head dim, and the floor of
   bench/kernels.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernels import bench_ms, fwd_and_fwdbwd, la_floor, measure_ceilings, sdpa_causal  # noqa: E402
from kernels.taylor_linear_attn import taylor_linear_attention_reference  # noqa: E402
from kernels.taylor_linear_attn.fused_impl import taylor_linear_attention_fused  # noqa: E402
from kernels.taylor_linear_attn.triton_impl import taylor_linear_attention_triton  # noqa: E402

HEADS = 16
F = 16


def _cfg(outer, bc, bv, w, stages=1, nb=None) -> dict:
    cfg = dict(outer=outer, chunk_size=bc, block_v=bv, num_warps=w, num_stages=stages)
    return cfg if nb is None else dict(cfg, row_blocks=nb)


# forward configurations compiled by bench/triton_resources.py la-fwd --all (registers, spills, wgmma)
FWD_EXPLORE = ([_cfg("reshape", bc, bv, w) for bc, bv, w in itertools.product((16, 32, 64), (16, 32, 64), (4, 8))]
               + [_cfg("select", 32, 32, 8)]
               + [_cfg("split", bc, bv, w, 1, nb) for bc, bv, w, nb in
                  itertools.product((32, 64), (16, 32, 64), (4, 8), (4, 2))])
# the forward sweep at TK's shape (15 timings + num_stages 2 of the best): the spill-free whole-tile builds,
# the best measured one (reshape 32/32/4: 0.934 ms on the H200), and the row-block split at 64-token chunks
# (all big products on wgmma; spill-free at value block 16 / 4 warps, 168-680 stack bytes at 32-64)
FWD_CANDIDATES = ([_cfg("reshape", bc, bv, w) for bc, bv, w in ((32, 16, 4), (32, 32, 8), (16, 16, 4), (32, 32, 4),
                                                                 (64, 32, 8))]
                  + [_cfg("select", 32, 32, 8)]
                  + [_cfg("split", 64, bv, 4, 1, 4) for bv in (16, 32, 64)]
                  + [_cfg("split", 64, 32, 4, 2, 4), _cfg("split", 32, 16, 4, 1, 4)])
# left out: the split design at 8 warps (64/16/8 with 4 or 2 row blocks), which hit an illegal memory access on
# the H200 (Triton 3.6, 2026-12-01) and left the CUDA context unusable for the rest of the run


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_correct() -> list[dict]:
    """Output, final state and every gradient of the fused kernels vs the fp32 chunked reference."""
    rows = []
    torch.manual_seed(0)
    for dtype, dv, t, outer in ((torch.float32, 112, 1000, "split"), (torch.bfloat16, 64, 2048, "split"),
                                (torch.bfloat16, 112, 777, "split"), (torch.bfloat16, 112, 777, "reshape")):
        b, h = 2, 4
        q, k = (torch.randn(b, t, h, F, device="cuda") for _ in range(2))
        v = torch.randn(b, t, h, dv, device="cuda")
        nf = 1 + F + F * F
        kv0 = 0.3 * torch.randn(b, h, nf, dv, device="cuda")
        ks0 = 1 + torch.rand(b, h, nf, device="cuda")
        docs = torch.zeros(b, t, dtype=torch.int32, device="cuda")
        docs[:, t // 3:] = 1
        docs[1, t // 2:] = 2
        ins = [x.to(dtype).requires_grad_() for x in (q, k, v)] + [kv0.requires_grad_(), ks0.requires_grad_()]
        ref_in = [x.detach().float().requires_grad_() for x in ins]
        o, (kv, ks) = taylor_linear_attention_fused(*ins[:3], doc_ids=docs, initial_state=tuple(ins[3:]),
                                                    output_final_state=True, outer=outer)
        o_r, (kv_r, ks_r) = taylor_linear_attention_reference(*ref_in[:3], doc_ids=docs,
                                                              initial_state=tuple(ref_in[3:]),
                                                              output_final_state=True)
        cot = [torch.randn_like(o_r), 0.01 * torch.randn_like(kv_r), 0.01 * torch.randn_like(ks_r)]
        g = torch.autograd.grad([o, kv, ks], ins, [c.to(x.dtype) for c, x in zip(cot, (o, kv, ks), strict=True)])
        g_r = torch.autograd.grad([o_r, kv_r, ks_r], ref_in, cot)
        errs = {"o": rel(o, o_r), "kv": rel(kv, kv_r), "ks": rel(ks, ks_r)}
        errs.update({n: rel(a, e) for n, a, e in zip(["dq", "dk", "dval", "dkv0", "dks0"], g, g_r, strict=True)})
        rows.append({"dtype": str(dtype), "dv": dv, "T": t, "outer": outer, **errs})
        print(f"correct {dtype} Dv{dv} T{t} {outer}: " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()), flush=True)
    return rows


def inputs(batch, seqlen, dv):
    q, k = (torch.randn(batch, seqlen, HEADS, F, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(batch, seqlen, HEADS, dv, device="cuda", dtype=torch.bfloat16)
    return [x.requires_grad_() for x in (q, k, v)]


def time_fwd(fn, ins) -> float:
    with torch.no_grad():
        return bench_ms(lambda: fn(*ins))


def time_fb(fn, ins) -> float:
    """Forward + backward ms, through bench.kernels.fwd_and_fwdbwd (which makes the inputs where the graph
    timing can capture their backward)."""
    return fwd_and_fwdbwd(fn, ins)[1]


def attempt(label, thunk):
    try:
        return thunk()
    except Exception as err:
        print(f"  [{label}] failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
        return None


def tk_forward(tk_dir: Path | None) -> float | None:
    """ThunderKittens' `based(q, k, v)` forward at its own shape ([B, H, T, D] layout, numerator and bf16 state
    only), built by bench/tk_based.sh; None (with the reason printed) where it cannot be imported."""
    if tk_dir is None:
        return None
    sys.path.insert(0, str(tk_dir / "kernels" / "based"))
    try:
        from _C import based  # noqa: PLC0415
    except ImportError as err:
        print(f"  [TK] not importable ({err}); build it with `bash bench/tk_based.sh {tk_dir}`", flush=True)
        return None
    q, k = (torch.randn(16, HEADS, 2048, F, device="cuda", dtype=torch.bfloat16) / F for _ in range(2))
    v = torch.randn(16, HEADS, 2048, 64, device="cuda", dtype=torch.bfloat16) / 64
    return bench_ms(lambda: based(q, k, v))


def sweep_forward(quick: bool, tk_dir: Path | None) -> tuple[dict, list]:
    ins = inputs(16, 2048, 64)
    rows = []
    tk = attempt("TK", lambda: tk_forward(tk_dir))
    if tk is not None:
        rows.append({"kernel": "ThunderKittens", "fwd_ms": tk})
        print(f"TK shape fwd: ThunderKittens {tk:.3f} ms", flush=True)
    chunked = time_fwd(lambda q, k, v: taylor_linear_attention_triton(q, k, v), ins)
    rows.append({"kernel": "chunk-state", "fwd_ms": chunked})
    print(f"TK shape fwd: chunk-state {chunked:.3f} ms", flush=True)
    best = None
    for cfg in FWD_CANDIDATES[:1] if quick else FWD_CANDIDATES:
        ms = attempt(str(cfg), lambda cfg=cfg: time_fwd(lambda q, k, v: taylor_linear_attention_fused(q, k, v, **cfg),
                                                         ins))
        if ms is None:
            continue
        rows.append({"kernel": "fused", **cfg, "fwd_ms": ms})
        print(f"  fused {cfg}: {ms:.3f} ms", flush=True)
        if best is None or ms < best[1]:
            best = (cfg, ms)
    for stages in (2,) if best[0]["num_stages"] != 2 else ():
        cfg = dict(best[0], num_stages=stages)
        ms = attempt(str(cfg), lambda cfg=cfg: time_fwd(lambda q, k, v: taylor_linear_attention_fused(q, k, v, **cfg),
                                                         ins))
        if ms is not None:
            rows.append({"kernel": "fused", **cfg, "fwd_ms": ms})
            print(f"  fused {cfg}: {ms:.3f} ms", flush=True)
            if ms < best[1]:
                best = (cfg, ms)
    return best[0], rows


def sweep_backward(fwd_cfg: dict, quick: bool) -> tuple[dict, list]:
    ins = inputs(16, 2048, 112)
    rows = []
    # (chunk, value block, build, warps) by the local compile (bench/triton_resources.py la-bwd): 8 warps spill
    # far less than 4 (select 32/32: dq 0 / dkv 296 stack bytes vs 792 / 1384); 64-token chunks spill
    # 650-4200 bytes (one kept as a data point)
    grid = [(32, 32, "select", 8)] if quick else [(32, 32, "select", 8), (32, 32, "reshape", 8), (32, 32, "select", 4),
                                                  (32, 32, "reshape", 4), (16, 16, "reshape", 4), (32, 16, "reshape", 4),
                                                  (16, 32, "reshape", 8), (64, 32, "reshape", 8)]
    best = None
    for bc, bvb, outer_bwd, w in grid:
        cfg = dict(fwd_cfg, chunk_size_bwd=bc, block_v_bwd=bvb, bwd_warps=w, outer_bwd=outer_bwd)
        ms = attempt(str(cfg), lambda cfg=cfg: time_fb(lambda q, k, v: taylor_linear_attention_fused(q, k, v, **cfg),
                                                        ins))
        if ms is None:
            continue
        rows.append({"kernel": "fused", **cfg, "fb_ms": ms})
        print(f"  fused f+b Dv112 {cfg}: {ms:.3f} ms", flush=True)
        if best is None or ms < best[1]:
            best = (cfg, ms)
    return best[0], rows


def compare_row(dv: int, t: int, cfg: dict, ceil: dict) -> dict:
    """Fused, chunk-state and SDPA f+b (and the fused forward) at B*T = 32k, 16 heads."""
    batch = 32768 // t
    ins = inputs(batch, t, dv)
    sd = [torch.randn(batch, HEADS, t, dv, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3)]

    def fused(q, k, v):
        return taylor_linear_attention_fused(q, k, v, **cfg)

    row = {"dv": dv, "T": t, "floor_fb": la_floor(32768 * HEADS, dv, ceil)[1]}
    row["fused_fwd"] = attempt("fused fwd", lambda: time_fwd(fused, ins))
    row["fused_fb"] = attempt("fused f+b", lambda: time_fb(fused, ins))
    row["chunked_fb"] = attempt("chunked f+b", lambda: time_fb(taylor_linear_attention_triton, ins))
    row["sdpa_fb"] = attempt("sdpa", lambda: time_fb(sdpa_causal, sd))
    print(row, flush=True)
    return row


def compare(cfg: dict, ceil: dict) -> list[dict]:
    return [compare_row(dv, t, cfg, ceil) for dv, t in ((64, 2048), (112, 2048), (128, 2048), (112, 8192))]


def table(fwd_rows, best_fwd, cmp_rows) -> str:
    chunked = [r for r in fwd_rows if r["kernel"] == "chunk-state"][0]["fwd_ms"]
    tk = [r["fwd_ms"] for r in fwd_rows if r["kernel"] == "ThunderKittens"]
    tk_text = f"{tk[0]:.3f} ms (this run)" if tk else "not built (0.200 ms on 2026-12-01)"
    best_ms = min(r["fwd_ms"] for r in fwd_rows if r["kernel"] == "fused")
    lines = [f"TK shape forward: chunk-state {chunked:.3f} ms, fused {best_ms:.3f} ms ({best_fwd}); TK {tk_text}",
             "| Dv | T | fused f+b | chunked f+b | SDPA f+b | floor | fused/floor | SDPA/fused |",
             "|---|---|---|---|---|---|---|---|"]

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    for r in cmp_rows:
        ratio = "-" if r["fused_fb"] is None else f"{r['fused_fb'] / r['floor_fb']:.2f}"
        vs = "-" if None in (r["fused_fb"], r["sdpa_fb"]) else f"{r['sdpa_fb'] / r['fused_fb']:.2f}"
        lines.append(f"| {r['dv']} | {r['T']} | {f(r['fused_fb'])} | {f(r['chunked_fb'])} | {f(r['sdpa_fb'])} | "
                     f"{f(r['floor_fb'])} | {ratio} | {vs} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="one configuration per sweep")
    ap.add_argument("--tk-dir", type=Path, default=None, help="ThunderKittens checkout built by bench/tk_based.sh")
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        out["correct"] = check_correct()
        out["ceilings"] = measure_ceilings()
        best_fwd, out["fwd_sweep"] = sweep_forward(args.quick, args.tk_dir)
        best, out["bwd_sweep"] = sweep_backward(best_fwd, args.quick)
        out["best"] = best
        out["compare"] = compare(best, out["ceilings"])
        out["table"] = table(out["fwd_sweep"], best_fwd, out["compare"])
    except Exception:
        out["error"] = traceback.format_exc()
        print(out["error"], flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    print(out.get("table", "no table"))


if __name__ == "__main__":
    main()
