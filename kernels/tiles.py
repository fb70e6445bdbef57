"""Block sizes (tiles) of the Triton kernels per device and shape, and their lookup.

The kernels' built-in defaults (in each Plan) were swept on an H100 (docs/PERFORMANCE.md). A table entry
overrides some of them for one device kind and one shape; the lookup order of each field is: the caller's
explicit argument, the entry of this device kind, the entry of "default", the Plan's built-in default.

Keys:
- LINEAR_ATTN_TILES[kind][(Dv, T)]: value head dim Dv (exact match) and sequence length T (the entry with
  the largest T <= the call's T, else the smallest T of that Dv). Fields: chunk_size, block_f, block_v,
  block_v_state, block_v_bwd, num_warps, bwd_warps, num_stages (taylor_linear_attn Plan arguments).
- SLIDING_WINDOW_TILES[kind][(window, D)]: window and head dim, exact match. Fields: block_m, block_n,
  num_warps, num_stages, bwd, bwd_block_m, bwd_block_n, bwd_warps, dq_block_m, dq_block_n, dq_warps,
  bwd_stages (sliding_window Plan arguments).
- DECODE_LINEAR_TILES[kind][(K, N)]: a decode step's weight shape [N, K], exact match. Fields: block_n,
  block_k, num_stages, num_warps, and max_rows: the most rows of x it measured faster at (decode_linear).
  Unlike the others, a shape without an entry does not run
  the Triton kernel at all (decode_linear's backend "auto" then takes cuBLAS): only shapes where the kernel
  measured faster are listed.
- LA_FORWARD_CUDA[kind]: the (Dv, T, B*H) shapes, exact match, where taylor_linear_attention's forward runs the
  CUDA kernel of kernels/taylor_linear_attn/cuda instead of the Triton one (measured faster by bench/la_cuda.py).
- DECODE_SWIGLU_TILES[kind][(K, N)]: fc1's weight shape [N = 2H, K] of decode_swiglu, exact match. Fields:
  block_n, block_k, num_stages, num_warps; a shape without an entry runs kernels.decode_linear.SWIGLU_TILES.

`python bench/kernels.py --sweep` (and `python bench/decode_linear.py`) prints the entries it finds for the device it runs on, in this format.
"""

from __future__ import annotations

import functools

import torch

LA_FIELDS = ("chunk_size", "block_f", "block_v", "block_v_state", "block_v_bwd", "num_warps", "bwd_warps",
             "num_stages")
SWA_FIELDS = ("block_m", "block_n", "num_warps", "num_stages", "bwd", "bwd_block_m", "bwd_block_n", "bwd_warps",
              "dq_block_m", "dq_block_n", "dq_warps", "bwd_stages")
DL_FIELDS = ("block_n", "block_k", "num_stages", "num_warps", "max_rows")
DEVICE_KINDS = ("H100", "H200", "default")

# The H100 entries are the Plans' built-in defaults (its sweeps picked them), so the table holds none.
LINEAR_ATTN_TILES: dict[str, dict[tuple[int, int], dict]] = {
    "H100": {},
    # bench/kernels.py --sweep --only la --seqlens 2048 on one H200, torch 2.11.0+cu130, 2026-12-01, CUDA-graph
    # timing (f+b ms, B 16 x T 2048: Dv112 1.944 against the default's 2.101, Dv128 1.918 against 2.051; Dv64
    # keeps the default: 3 stages measured 1.336 against 1.343, inside the 2% noise margin)
    "H200": {
        (112, 2048): {"chunk_size": 64, "num_warps": 4, "bwd_warps": 4},
        (128, 2048): {"chunk_size": 64, "num_warps": 4, "bwd_warps": 4},
    },
    "default": {},
}

SLIDING_WINDOW_TILES: dict[str, dict[tuple[int, int], dict]] = {
    "H100": {},
    # bench/kernels.py --sweep --only swa --seqlens 2048 on one H200, torch 2.11.0+cu130, 2026-12-01, CUDA-graph
    # timing (f+b ms, B 16 x T 2048: W128 D128 0.984 against the default's 1.007); every other shape keeps the
    # default (the entries of the eager-timed sweep before measured slower than it: W128 D64 0.763 vs 0.599)
    "H200": {
        (128, 128): {"block_m": 64, "block_n": 32, "bwd_block_m": 64, "bwd_block_n": 64},
    },
    "default": {},
}

DECODE_LINEAR_TILES: dict[str, dict[tuple[int, int], dict]] = {
    "H100": {},
    # python bench/decode_linear.py on one H200, torch 2.11.0+cu130, 2026-12-01 (docs/PERFORMANCE.md): the shapes of
    # the three 1.3B configs where the best tile beat cuBLAS by >= 3% at 1 row (max_rows 1) or at 1 and 16 rows
    "H200": {
        (128, 4096): {"block_n": 16, "block_k": 128, "num_stages": 5, "num_warps": 4, "max_rows": 16},
        (1680, 1680): {"block_n": 16, "block_k": 512, "num_stages": 3, "num_warps": 4, "max_rows": 1},
        (1680, 50272): {"block_n": 64, "block_k": 256, "num_stages": 3, "num_warps": 4, "max_rows": 1},
        (1792, 256): {"block_n": 16, "block_k": 512, "num_stages": 3, "num_warps": 4, "max_rows": 16},
        (1792, 1792): {"block_n": 16, "block_k": 512, "num_stages": 3, "num_warps": 4, "max_rows": 16},
        (1792, 50264): {"block_n": 64, "block_k": 256, "num_stages": 3, "num_warps": 4, "max_rows": 16},
        (2048, 50288): {"block_n": 64, "block_k": 256, "num_stages": 3, "num_warps": 4, "max_rows": 16},
        (3584, 1792): {"block_n": 16, "block_k": 512, "num_stages": 3, "num_warps": 4, "max_rows": 16},
        (4096, 2048): {"block_n": 16, "block_k": 512, "num_stages": 3, "num_warps": 4, "max_rows": 16},
    },
    "default": {},
}

DECODE_SWIGLU_TILES: dict[str, dict[tuple[int, int], dict]] = {
    "H100": {},
    # python bench/decode_linear.py --swiglu --rows 1,16 on one H200, torch 2.11.0+cu130, 2026-12-02 (us per call,
    # M1 / M16): Based's fc1 keeps SWIGLU_TILES (8.68 / 8.58, the best of five); Transformer++'s takes 64/128/4
    # (11.57 / 11.03 against the default's 12.08 / 13.14; fc1 on cuBLAS + the gate: 13.11 / 13.59)
    "H200": {
        (1680, 8960): {"block_n": 64, "block_k": 128, "num_stages": 4, "num_warps": 4},
    },
    "default": {},
}

# Where taylor_linear_attention's forward runs the hand-written CUDA kernel (kernels/taylor_linear_attn/cuda) in
# place of the Triton forward: (Dv, T, B*H), exact match, the shapes where it measured >= 3% faster. One CTA per
# (row x head, value block) walks the chunks in order, so it wins only where those CTAs fill the GPU at a short T.
LA_FORWARD_CUDA: dict[str, set[tuple[int, int, int]]] = {
    "H100": set(),
    # python bench/la_cuda.py --no-sanitize --sweep on one H200, torch 2.11.0+cu130, 2026-12-02, after the
    # one-reciprocal-per-row normalize (forward ms, CUDA / Triton, H16): Dv64 T2048 B16 0.218 / 0.351; Dv112
    # T2048 B16 0.462 / 0.542, T4096 B8 0.459 / 0.587; Dv128 T2048 B16 0.458 / 0.537, T4096 B8 0.453 / 0.582;
    # even or slower at Dv64 T4096 and at T8192. At the published runs' micro batch (--tokens 16384: B8 T2048
    # H16): Dv112 0.235 / 0.305, Dv128 0.233 / 0.302, Dv64 0.190 / 0.194 (2%: not listed)
    "H200": {(64, 2048, 256), (112, 2048, 256), (112, 2048, 128), (112, 4096, 128), (128, 2048, 256),
             (128, 2048, 128), (128, 4096, 128)},
    "default": set(),
}


# Constant for torch.compile: decode_linear looks its table up inside a compiled decode step, where Dynamo
# cannot trace torch.cuda.get_device_name (a non-tensor result: a graph break per call)
@functools.cache
@torch.compiler.assume_constant_result
def _cuda_kind(index: int) -> str:
    name = torch.cuda.get_device_name(index)
    for kind in DEVICE_KINDS[:-1]:
        if kind in name:
            return kind
    return "default"


def device_kind(device: torch.device | str) -> str:
    """"H100", "H200" (by the CUDA device name) or "default" (other GPUs, CPU, the Triton interpreter)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "default"
    return _cuda_kind(device.index if device.index is not None else torch.cuda.current_device())


def _la_entry(table: dict, dv: int, seqlen) -> dict:
    """The entry of Dv with the largest T <= seqlen (else the smallest T); {} when Dv has none.
    `seqlen` may be a symbolic size under torch.compile (the comparisons then become guards)."""
    ts = sorted(t for d, t in table if d == dv)
    if not ts:
        return {}
    below = [t for t in ts if t <= seqlen]
    return table[(dv, below[-1] if below else ts[0])]


def _merge(fields: tuple[str, ...], explicit: dict, *entries: dict) -> dict:
    """Per field: the explicit value when not None, else the first entry that sets it; unset fields omitted."""
    out = {}
    for name in fields:
        value = explicit.get(name)
        for entry in entries:
            if value is not None:
                break
            value = entry.get(name)
        if value is not None:
            out[name] = value
    return out


def linear_attn_tiles(device: torch.device | str, value_dim: int, seqlen, **explicit) -> dict:
    """Plan arguments of taylor_linear_attn for this call: `explicit` (None = not given) over the table."""
    kind = device_kind(device)
    tables = (LINEAR_ATTN_TILES.get(kind, {}), LINEAR_ATTN_TILES["default"])
    return _merge(LA_FIELDS, explicit, *(_la_entry(t, value_dim, seqlen) for t in tables))


def la_forward_backend(device: torch.device | str, value_dim: int, seqlen: int, rows: int) -> str:
    """"cuda" where LA_FORWARD_CUDA lists (Dv, T, B*H) for this device kind, else "triton"."""
    return "cuda" if (value_dim, seqlen, rows) in LA_FORWARD_CUDA.get(device_kind(device), set()) else "triton"


def sliding_window_tiles(device: torch.device | str, window: int, head_dim: int, **explicit) -> dict:
    """Plan arguments of sliding_window for this call: `explicit` (None = not given) over the table."""
    kind = device_kind(device)
    key = (window, head_dim)
    return _merge(SWA_FIELDS, explicit, SLIDING_WINDOW_TILES.get(kind, {}).get(key, {}),
                  SLIDING_WINDOW_TILES["default"].get(key, {}))


def decode_linear_tiles(device: torch.device | str, k: int, n: int, **explicit) -> dict:
    """decode_linear's tiles for weight [N, K]: `explicit` (None = not given) over the table; {} where neither
    sets anything (decode_linear's backend "auto" then takes cuBLAS)."""
    key = (k, n)
    return _merge(DL_FIELDS, explicit, DECODE_LINEAR_TILES.get(device_kind(device), {}).get(key, {}),
                  DECODE_LINEAR_TILES["default"].get(key, {}))


def decode_swiglu_tiles(device: torch.device | str, k: int, n: int, **explicit) -> dict:
    """decode_swiglu's tiles for fc1's weight [N, K]: `explicit` (None = not given) over the table; the fields
    neither sets are omitted (decode_swiglu fills them from SWIGLU_TILES)."""
    key = (k, n)
    return _merge(DL_FIELDS[:-1], explicit, DECODE_SWIGLU_TILES.get(device_kind(device), {}).get(key, {}),
                  DECODE_SWIGLU_TILES["default"].get(key, {}))
