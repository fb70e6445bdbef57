"""Compile Triton kernels for a GPU target without a GPU and report what each configuration costs on chip:
registers and stack (spill) bytes per thread, shared memory, the tensor-core instructions (wgmma / mma.sync)
and the layout traffic in the TTGIR (convert_layout, local_alloc).

    python bench/triton_resources.py la-fwd [--arch 90] [--grid reshape,select,split] [--asm DIR]
    python bench/triton_resources.py la-bwd
    python bench/triton_resources.py kernel MODULE:FUNC --ptr Q=*bf16 ... --float eps --const BC=32 ... [--warps 4]

The first two sweep the fused Taylor linear-attention kernels (kernels/taylor_linear_attn/fused_impl.py) at
F 16, bf16 over the configurations bench/la_fused.py times; `kernel` compiles any @triton.jit function (every
argument not named by --ptr, --float or --const is an i32). --asm DIR writes each compiled kernel's TTGIR, PTX
and SASS there. Compiling needs only the Triton wheel (its ptxas, cuobjdump and nvdisasm ship with it); the
numbers are the compiler's, so they hold for the Triton version that runs this (compare like with like).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ALL = False


def signature(fn, ptrs: dict, floats: set, consts: dict) -> dict:
    """Triton signature of fn: constexpr / pointer type / fp32 / i32 per argument."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL from cuobjdump --dump-resource-usage of one cubin."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=False)
    finally:
        os.unlink(f.name)
    text = out.stdout + out.stderr
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}


def sass(cubin: bytes) -> str:
    """The cubin's SASS, by the nvdisasm that ships with Triton."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=False).stdout
    finally:
        os.unlink(f.name)


def compile_report(fn, ptrs: dict, floats: set, consts: dict, num_warps: int, num_stages: int | None = None,
                   arch: int = 90, asm_dir: Path | None = None, label: str = "") -> dict:
    """Compile fn for sm_<arch> and return its resources; writes TTGIR / PTX / SASS under asm_dir if given."""
    src = ASTSource(fn=fn, signature=signature(fn, ptrs, floats, consts), constexprs=consts)
    opts = {"num_warps": num_warps}
    if num_stages is not None:
        opts["num_stages"] = num_stages
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    code = sass(k.asm["cubin"])
    row = {"smem": k.metadata.shared, **_resource_usage(k.asm["cubin"]),
           "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
           "convert_layout": ttgir.count("ttg.convert_layout"), "local_alloc": ttgir.count("ttg.local_alloc"),
           "sass_lines": code.count("\n"), "spill_ld_st": len(re.findall(r"\b(LDL|STL)\b", code))}
    if asm_dir is not None:
        asm_dir.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{fn.__name__}_{label}")
        (asm_dir / f"{stem}.ttgir").write_text(ttgir)
        (asm_dir / f"{stem}.ptx").write_text(ptx)
        (asm_dir / f"{stem}.sass").write_text(code)
    return row


COLUMNS = ("reg", "stack", "spill_ld_st", "smem", "wgmma", "mma_sync", "convert_layout", "local_alloc",
           "sass_lines")


def print_row(label: str, row: dict) -> None:
    print(f"| {label} | " + " | ".join(str(row.get(c, "-")) for c in COLUMNS) + " |", flush=True)


def print_header() -> None:
    print("| config | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")


# ----------------------------------------------------------------------------------------------------------
# presets: the fused Taylor linear-attention kernels at F 16, bf16

LA_PTRS_FWD = {**{n: "*bf16" for n in ("Q", "K", "V", "OUT")}, "DOC": "*i32",
               **{n: "*fp32" for n in ("DEN", "KV0", "KS0", "KV1", "KS1")}}
LA_PTRS_BWD = {**{n: "*bf16" for n in ("Q", "K", "V", "DO", "DVAL")}, "DOC": "*i32",
               **{n: "*fp32" for n in ("DEN", "HH", "KV0", "KS0", "DQ", "DKV1", "DKS1", "DKV0", "DKS0", "DK")}}


def la_forward_configs(outers: list[str], dv: int = 64) -> list[dict]:
    """taylor_linear_attention_fused block arguments to compile: bench/la_fused.py's forward candidates
    (or, with --all, a wider grid) whose feature-tile build is in outers."""
    from bench.la_fused import FWD_CANDIDATES, FWD_EXPLORE  # noqa: PLC0415

    return [c for c in (FWD_EXPLORE if ALL else FWD_CANDIDATES) if c["outer"] in outers]


def la_forward(args) -> None:
    from kernels.taylor_linear_attn.fused_impl import FusedPlan, forward_kernel  # noqa: PLC0415

    print_header()
    for cfg in la_forward_configs(args.grid.split(",")):
        plan = FusedPlan(2048, 16, args.dv, cfg["chunk_size"], cfg["block_v"], num_warps=cfg["num_warps"],
                         num_stages=cfg.get("num_stages"), outer=cfg["outer"], row_blocks=cfg.get("row_blocks", 4))
        fn, consts = forward_kernel(plan, {"PREC": "tf32", "SEL_PREC": "tf32"}, False, False)
        warps, stages = consts.pop("num_warps"), consts.pop("num_stages", None)
        label = " ".join(f"{k}={v}" for k, v in cfg.items())
        _one(label, fn, LA_PTRS_FWD, {"eps", "inv_sqrt_f", "c1", "c2"}, consts, warps, stages, args)


def la_backward(args) -> None:
    from kernels.taylor_linear_attn import fused_impl as fi  # noqa: PLC0415

    print_header()
    # bench/la_fused.py's backward sweep (value block 32; chunks 32 / 64; 4 / 8 warps)
    for (bc, bv, w), (name, fn) in itertools.product(((32, 32, 4), (32, 32, 8), (64, 32, 4), (64, 32, 8)),
                                                    (("dq", fi._fused_bwd_dq_kernel),
                                                     ("dkv", fi._fused_bwd_dkv_kernel))):
        for outer in args.grid.split(","):
            if outer not in ("reshape", "select"):
                continue
            consts = dict(F=16, FP=16, BC=bc, BV=bv, PREC="tf32", SEL_PREC="tf32", CHAIN_PREC="tf32", OUTER=outer)
            consts.update({"HAS_S0": False} if name == "dq" else {"HAS_DS_END": False, "STORE_DS0": False})
            _one(f"{name} {outer} BC{bc} BV{bv} w{w}", fn, LA_PTRS_BWD, {"inv_sqrt_f", "c1", "c2"}, consts, w, 1,
                 args)


def _one(label, fn, ptrs, floats, consts, warps, stages, args) -> None:
    try:
        row = compile_report(fn, ptrs, floats, consts, warps, stages, args.arch, args.asm, label)
    except Exception as err:  # a configuration the compiler rejects is a result too
        print(f"| {label} | failed: {type(err).__name__}: {str(err).splitlines()[0][:160]} |", flush=True)
        return
    print_row(label, row)


def any_kernel(args) -> None:
    module, _, name = args.target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    ptrs = dict(p.split("=", 1) for p in args.ptr)
    consts = {}
    for c in args.const:
        key, _, val = c.partition("=")
        consts[key] = int(val) if val.lstrip("-").isdigit() else {"True": True, "False": False}.get(val, val)
    print_header()
    _one(name, fn, ptrs, set(args.float), consts, args.warps, args.stages, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("la-fwd", "la-bwd", "kernel"))
    ap.add_argument("target", nargs="?", help="MODULE:FUNC for `kernel`")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    ap.add_argument("--grid", default="reshape,select,split", help="feature-tile builds to sweep (la-*)")
    ap.add_argument("--asm", type=Path, default=None, help="write TTGIR / PTX / SASS of each kernel here")
    ap.add_argument("--ptr", action="append", default=[], help="NAME=*bf16 (kernel)")
    ap.add_argument("--float", action="append", default=[], help="fp32 scalar argument (kernel)")
    ap.add_argument("--const", action="append", default=[], help="NAME=VALUE constexpr (kernel)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=None)
    ap.add_argument("--dv", type=int, default=64, help="value head dim (la-fwd)")
    ap.add_argument("--all", action="store_true", help="la-fwd: the wide exploration grid, not the bench's")
    args = ap.parse_args()
    global ALL
    ALL = args.all
    {"la-fwd": la_forward, "la-bwd": la_backward, "kernel": any_kernel}[args.what](args)


if __name__ == "__main__":
    main()
