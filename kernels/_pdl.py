"""Programmatic dependent launch (PDL) for the decode step's small kernels (Hopper and newer).

A decode step is ~300 short kernels, each a few microseconds, and each normally starts only after the one
before it has finished and its launch has gone through (docs/PERFORMANCE.md: about 4 us above the weight
stream per product). With PDL a kernel is launched while the one before it still runs: its programs become
resident, may read what no kernel of the step writes (the weights: optionally, L2 prefetches of the first
tiles of the program's weight rows), then wait for the previous kernel to complete (`griddepcontrol.wait`)
before they read anything it may have written or write anything at all.

The rule every kernel here keeps, and why it is safe: before the wait, no stores and no loads except
weights; after the wait, it lets the next kernel launch (`griddepcontrol.launch_dependents`). A kernel's
wait returns once the kernel just before it has completed, and that one completed only after its own wait
returned (or, launched without PDL, it started after its predecessor completed), so past the wait every
earlier kernel of the stream has completed: the same order as without PDL for everything but weight reads.

    pdl_enabled(device, group) True where a group's kernels launch with PDL (env BASED_PDL)
    pdl_options(device, group) a launch's PDL constants and Triton launch option
    l2_prefetch_enabled()      True where the products prefetch their weight rows before the wait
    release(PDL)               (in a kernel) wait for the previous kernel, then let the next one launch
    prefetch_rows_l2(...)      (in a kernel) bulk-prefetch the first bytes of weight rows into L2

Off in Triton's CPU interpreter, on devices below compute capability 9.0, and with a Triton that lacks the
`launch_pdl` option. BASED_PDL picks the kernel groups (GROUPS; default DEFAULT_GROUPS, the decode products
and the fused norm): 0 none, 1 all, or a comma list (bench/generation.py --pdl and bench/decode_linear.py --pdl
time the forms).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._common import interpreting

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: pdl_enabled() is False, so the kernels never reach these names
    gdc_launch_dependents = gdc_wait = None


@functools.cache
def _triton_has_launch_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return gdc_wait is not None and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.cache
def _device_supports(index: int) -> bool:
    return _triton_has_launch_pdl() and torch.cuda.get_device_capability(index)[0] >= 9


GROUPS = ("linear", "norm", "mixer", "attention")
# the groups on by default: with the mixer step kernels too, Based-1.3B's graph step ran slower than without PDL
# at batch 1 and 16 on the H200; with the products and the norm alone, faster (docs/PERFORMANCE.md, 2026-12-02)
DEFAULT_GROUPS = "linear,norm"


def _groups() -> frozenset:
    """The kernel groups BASED_PDL turns on: "1" all, "0" none, or a comma list of GROUPS (default
    DEFAULT_GROUPS). Read at each launch; parsed once per value."""
    return _parse_groups(os.environ.get("BASED_PDL", DEFAULT_GROUPS).strip())


@functools.cache
def _parse_groups(value: str) -> frozenset:
    if value in ("0", "1"):
        return frozenset(GROUPS if value == "1" else ())
    chosen = frozenset(g.strip() for g in value.split(",") if g.strip())
    if not chosen <= set(GROUPS):
        raise ValueError(f"BASED_PDL={value!r}: expected 0, 1 or a comma list of {GROUPS}")
    return chosen


def pdl_enabled(device: torch.device, group: str = "linear") -> bool:
    """True where `group`'s kernels (GROUPS: the decode products, the fused norm, the mixer step kernels,
    decode_attention) launch with PDL on this device: CUDA, compute capability >= 9.0, a Triton with
    `launch_pdl`, not the interpreter, and the group in BASED_PDL (read at each call)."""
    if interpreting() or device.type != "cuda" or group not in _groups():
        return False
    return _device_supports(device.index if device.index is not None else torch.cuda.current_device())


def l2_prefetch_enabled() -> bool:
    """True where the decode products, launched with PDL, prefetch the first K tiles of their weight rows into
    L2 before the wait (env BASED_PDL_PREFETCH="1"; off by default)."""
    return os.environ.get("BASED_PDL_PREFETCH", "0") == "1"


def bulk_prefetch_ok(weight: torch.Tensor) -> bool:
    """True where every row of the 2-D `weight` can be one bulk L2 prefetch: 16-byte aligned rows whose
    length is a multiple of 16 bytes (cp.async.bulk.prefetch's rule)."""
    size = weight.element_size()
    return (weight.data_ptr() % 16 == 0 and (weight.stride(0) * size) % 16 == 0
            and (weight.shape[1] * size) % 16 == 0 and weight.stride(1) == 1)


def pdl_options(device: torch.device, group: str, prefetch: bool | None = None) -> dict:
    """A launch's PDL arguments for a kernel of `group`: the PDL constant (and PREFETCH, where the kernel takes
    one: the caller says whether its weights allow bulk prefetches) and Triton's `launch_pdl` where PDL is on."""
    pdl = pdl_enabled(device, group)
    options = {"PDL": pdl}
    if prefetch is not None:
        options["PREFETCH"] = pdl and prefetch and l2_prefetch_enabled()
    if pdl:
        options["launch_pdl"] = True
    return options


@triton.jit
def release(PDL: tl.constexpr):
    """Wait until the previous kernel has completed, then let the next kernel of the stream launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_rows_l2(W, rows, stride_row, row_bytes):
    """One bulk L2 prefetch per weight row in `rows` (the first row_bytes, a multiple of 16, from
    W + row * stride_row). Rows past the weight must be clamped by the caller: the instruction has no mask."""
    addr = (W + rows.to(tl.int64) * stride_row).to(tl.int64)
    size = tl.full(rows.shape, 0, tl.int32) + row_bytes
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                              [addr, size], dtype=tl.int32, is_pure=False, pack=1)
