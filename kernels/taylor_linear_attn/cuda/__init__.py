"""Hand-written CUDA forward of causal normalized Taylor linear attention (F = 16, bf16): a drop-in for
triton_impl.forward, with the same outputs, so that the Triton backward consumes them.

based_fwd.cu holds the kernel (its header comment describes the algorithm) and an `extern "C"` launcher that
takes raw pointers, strides and a stream; this module builds it with the system nvcc at first use (no torch C++
headers), caches the .so under a user cache folder keyed by the source, the flags and the nvcc version, loads
it with ctypes and launches on torch's current stream (so CUDA-graph capture works; nothing is allocated or
synchronized inside the launcher).

    forward_cuda(q, k, v, docs, eps, kv0, ks0, output_final_state, plan, skip=0) -> o, den, (states, zst), final
    cuda_applies(q, k, v, plan=None) -> whether forward_cuda takes these inputs (else use the Triton forward)

Environment: BASED_LA_CUDA=0 turns the CUDA path off (cuda_applies answers False); CUDA_HOME (or PATH) finds
nvcc; BASED_LA_CUDA_CACHE overrides the cache folder (default $XDG_CACHE_HOME/based_kernels or
~/.cache/based_kernels).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from ..._common import new_output
from ..plan import Plan

SOURCE = Path(__file__).with_name("based_fwd.cu")
EMULATOR_HEADER = Path(__file__).with_name("emulate.h")
ARCH_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80")
NVCC_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", *ARCH_FLAGS)
FEATURE_DIM = 16
CHUNK = 64  # the kernel's chunk; plan.BC must be a multiple (states are written every plan.BC tokens)
MIN_ROWS = 160  # the kernel holds 160 feature rows; plan.NP must be at least that (pad rows written as zeros)
WARPS = (4, 2)  # warps per CTA = value block / 16: 4 (BV 64, the default) or 2 (BV 32)
_ENV = "BASED_LA_CUDA"
# Timing only (bench/la_cuda.py --stages): the stages forward_cuda's `skip` mask leaves out, as la::Skip in
# based_fwd.cu. Any nonzero mask gives wrong outputs (never an out-of-bounds access or a hang).
SKIP = {"features": 1, "intra": 2, "readout": 4, "update": 8, "normalize": 16, "output": 32, "states": 64,
        "prefetch": 128, "loads": 256, "barriers": 512}


def enabled() -> bool:
    """False when BASED_LA_CUDA=0."""
    return os.environ.get(_ENV, "1") != "0"


def cuda_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan | None = None) -> bool:
    """Whether forward_cuda takes q, k [B, T, H, F] and v [B, T, H, Dv] (and the plan's chunk and padding):
    enabled, CUDA tensors of compute capability >= 8.0, all bf16, F = 16, Dv a multiple of 8, the last dim
    contiguous, the other strides multiples of 8 elements and 16-byte aligned data (the kernel moves 16 bytes
    at a time). Otherwise the caller runs the Triton forward."""
    if not enabled() or not all(t.is_cuda for t in (q, k, v)):
        return False
    if not (q.dtype == k.dtype == v.dtype == torch.bfloat16) or q.shape[-1] != FEATURE_DIM:
        return False
    if v.shape[-1] % 8 != 0 or torch.cuda.get_device_capability(q.device) < (8, 0):
        return False
    for t in (q, k, v):
        if t.stride(-1) != 1 or any(s % 8 for s in t.stride()[:-1]) or t.data_ptr() % 16:
            return False
    return plan is None or (plan.BC % CHUNK == 0 and plan.NP >= MIN_ROWS)


def find_nvcc() -> Path:
    """nvcc from $CUDA_HOME/bin, else from PATH; a RuntimeError saying what to do when there is none."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    raise RuntimeError(
        "taylor_linear_attention: the CUDA forward (kernels/taylor_linear_attn/cuda) is built at first use with "
        f"nvcc, which was not found (CUDA_HOME={home!r}, not on PATH). Install the CUDA toolkit (nvcc >= 12.0) "
        f"and set CUDA_HOME, or set {_ENV}=0 to use the Triton forward.")


def build_command(nvcc: Path, source: Path, out: Path) -> list[str]:
    """The nvcc command line that builds the launcher library; library folders of pip-style toolkits (lib/
    beside lib64/) are added so the static CUDA runtime links."""
    home = nvcc.resolve().parent.parent
    libs = [f"-L{d}" for d in (home / "lib64", home / "lib") if d.is_dir()]
    return [str(nvcc), *NVCC_FLAGS, *libs, str(source), "-o", str(out)]


def nvcc_version(nvcc: Path) -> str:
    result = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=False)
    return result.stdout.strip()


def cache_key(source_text: str, flags: tuple[str, ...] | list[str], compiler_version: str) -> str:
    """Hex digest naming one build: any change of source, flags or compiler makes a new library."""
    digest = hashlib.sha256()
    for part in (source_text, "\0".join(flags), compiler_version):
        digest.update(part.encode())
        digest.update(b"\1")
    return digest.hexdigest()[:24]


def cache_dir() -> Path:
    explicit = os.environ.get("BASED_LA_CUDA_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "based_kernels"


def compile_library(command: list[str], out: Path, what: str) -> Path:
    """Run `command` (its last argument is the output path, replaced here by a temporary file in out's folder),
    then rename the result into place: atomic, so concurrent processes never load a half-written library."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        result = subprocess.run([*command[:-1], tmp], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-30:])
            raise RuntimeError(f"taylor_linear_attention: building {what} failed (exit {result.returncode}).\n"
                               f"command: {' '.join(command)}\n{tail}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def library_path(nvcc: Path) -> Path:
    """Where the .so of the current source, flags and this nvcc is cached."""
    return cache_dir() / f"based_fwd-{cache_key(SOURCE.read_text(), NVCC_FLAGS, nvcc_version(nvcc))}.so"


def built_library_path() -> Path:
    """The cached .so of the current source, flags and nvcc, built now if missing."""
    nvcc = find_nvcc()
    out = library_path(nvcc)
    if not out.is_file():
        compile_library(build_command(nvcc, SOURCE, out), out, f"the CUDA forward ({SOURCE.name})")
    return out


_POINTERS = 12
_STRIDES = 13
_INTS = 7  # batch, seqlen, heads, value_dim, np, nc, bcr


def load(path: Path) -> ctypes.CDLL:
    """Load a built library (the CUDA one or the CPU emulation of the tests) and declare its functions."""
    lib = ctypes.CDLL(str(path))
    lib.based_la_fwd.restype = ctypes.c_int
    lib.based_la_fwd.argtypes = ([ctypes.c_void_p] * _POINTERS + [ctypes.c_longlong] * _STRIDES
                                 + [ctypes.c_int] * _INTS + [ctypes.c_float] + [ctypes.c_int] * 4
                                 + [ctypes.c_void_p])
    lib.based_la_smem_bytes.restype = ctypes.c_int
    lib.based_la_smem_bytes.argtypes = [ctypes.c_int]
    lib.based_la_error_string.restype = ctypes.c_char_p
    lib.based_la_error_string.argtypes = [ctypes.c_int]
    return lib


@functools.cache
def library() -> ctypes.CDLL:
    """The CUDA library, built (or found in the cache) and loaded once per process."""
    return load(built_library_path())


_UNAVAILABLE: list[str] = []  # why the library cannot be had in this process (one warning, then the Triton path)


def available() -> bool:
    """True when the library is loaded, building it now if needed. False, with one warning per process, when
    nvcc is missing or the build fails (the caller then runs the Triton forward), and while a CUDA graph is
    being captured before the library was loaded (loading it sets a kernel attribute, which capture forbids)."""
    if _UNAVAILABLE:
        return False
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if library.cache_info().currsize == 0 and capturing:
        return False
    try:
        library()
    except RuntimeError as err:
        _UNAVAILABLE.append(str(err))
        warnings.warn(f"{err}\nThe Triton forward runs instead.", RuntimeWarning, stacklevel=2)
        return False
    return True


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def launch(lib: ctypes.CDLL, q, k, v, docs, start, outputs, plan: Plan, eps: float, warps: int, stream,
           skip: int = 0) -> None:
    """One kernel launch. start: (S0 [BH, NP, Dv], z0 [BH, NP]) fp32 symmetric or None; outputs: o, den,
    states, zst, s_end, z_end (the last two None when no final state is wanted); skip: SKIP bits (timing)."""
    batch, seqlen, heads, _ = q.shape
    o, den, states, zst, s_end, z_end = outputs
    s0, z0 = start if start is not None else (None, None)
    strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], docs.stride(0)]
    device = q.device.index if q.is_cuda else -1
    code = lib.based_la_fwd(
        _ptr(q), _ptr(k), _ptr(v), _ptr(docs), _ptr(s0), _ptr(z0), _ptr(o), _ptr(den), _ptr(states), _ptr(zst),
        _ptr(s_end), _ptr(z_end), *strides, batch, seqlen, heads, v.shape[-1], states.shape[2], plan.NC,
        plan.BC // CHUNK, float(eps), warps, docs.element_size(), skip, device, stream)
    if code != 0:
        raise RuntimeError(f"taylor_linear_attention: the CUDA forward failed: "
                           f"{lib.based_la_error_string(code).decode()} (code {code}; B {batch}, T {seqlen}, "
                           f"H {heads}, Dv {v.shape[-1]}, BC {plan.BC}, NP {states.shape[2]}, warps {warps}, skip {skip})")


def _check(q, k, v, docs, plan: Plan, warps: int) -> None:
    if q.shape[-1] != FEATURE_DIM or plan.F != FEATURE_DIM:
        raise ValueError(f"forward_cuda: feature dim must be {FEATURE_DIM}; got {q.shape[-1]} (use the Triton forward)")
    if not (q.dtype == k.dtype == v.dtype == torch.bfloat16):
        raise ValueError(f"forward_cuda: takes bf16 q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}")
    if plan.BC % CHUNK or plan.NP < MIN_ROWS:
        raise ValueError(f"forward_cuda: plan.BC must be a multiple of {CHUNK} and plan.NP >= {MIN_ROWS}; got BC "
                         f"{plan.BC}, NP {plan.NP}")
    if docs.dtype not in (torch.int32, torch.int64) or docs.stride(-1) != 1:
        raise ValueError(f"forward_cuda: docs must be int32 or int64 with contiguous rows; got {docs.dtype}, "
                         f"strides {docs.stride()}")
    if warps not in WARPS:
        raise ValueError(f"forward_cuda: warps must be one of {WARPS}; got {warps}")


def forward_cuda(q, k, v, docs, eps, kv0, ks0, output_final_state, plan: Plan, *, warps: int = 4,
                 lib: ctypes.CDLL | None = None, skip: int = 0):
    """triton_impl.forward's contract: q, k [B, T, H, 16], v [B, T, H, Dv] bf16 (any strides but the last);
    docs [B, T] int32/int64; kv0 [B, H, NF, Dv], ks0 [B, H, NF] (published layout) or None. Returns o
    [B, T, H, Dv] bf16, den [B, H, T] fp32 (the normalizer plus eps, as the Triton kernel stores it), the chunk
    states ([B*H, NC, NP, Dv] bf16, [B*H, NC, NP] fp32: the symmetric state before each plan.BC-token chunk)
    and the final state (published layout, fp32) or None. `lib`: the CPU emulation library (tests); by
    default the CUDA library, launched on torch's current stream. `skip`: timing only, SKIP bits of the stages
    to leave out (0, the default, is the real kernel; any other mask gives wrong outputs)."""
    from ..triton_impl import initial_state_sym, layout, publish_final

    _check(q, k, v, docs, plan, warps)
    batch, seqlen, heads, _ = q.shape
    dv = v.shape[-1]
    bh = batch * heads
    lay = layout(plan.F, plan.BF, str(q.device))
    start = initial_state_sym(kv0, ks0, lay, plan, bh, dv)
    o = new_output((batch, seqlen, heads, dv), v.dtype, v.device)
    den = new_output((batch, heads, seqlen), torch.float32, v.device)
    states = new_output((bh, plan.NC, lay.NP, dv), torch.bfloat16, v.device)
    zst = new_output((bh, plan.NC, lay.NP), torch.float32, v.device)
    end = (None, None)
    if output_final_state:
        end = (new_output((bh, lay.NP, dv), torch.float32, v.device),
               new_output((bh, lay.NP), torch.float32, v.device))
    if lib is None:
        # the launcher sets its shared-memory limit and launches on the current device: make it q's
        with torch.cuda.device(q.device):
            launch(library(), q, k, v, docs, start, (o, den, states, zst, *end), plan, eps, warps,
                   torch.cuda.current_stream(q.device).cuda_stream, skip)
    else:
        launch(lib, q, k, v, docs, start, (o, den, states, zst, *end), plan, eps, warps, None, skip)
    final = None
    if output_final_state:
        final = publish_final(end, kv0, ks0, docs, lay, plan, (batch, heads, dv))
    return o, den, (states, zst), final

