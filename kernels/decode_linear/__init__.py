"""Linear layer for the few rows of a decode step: y = x W^T + b with the weights streamed once.

    decode_linear(x, weight, bias=None, backend="auto")
    decode_swiglu(x, weight, backend="triton")

x [..., K] (at most 16 rows for the Triton kernel: the batch of a decode step), weight [N, K], bias [N] or
None; returns [..., N] in x's dtype. backend "auto" runs the Triton kernel where kernels/tiles.py has a
measured entry for (K, N) on this device kind (the shapes where it beat cuBLAS, bench/decode_linear.py) and
the rows, dtypes and device allow it, else torch's linear; "triton" forces the kernel (the table's tiles, or
the given/built-in ones); "reference" is torch's linear. Differentiable (the backward is torch's products).

decode_swiglu is SwiGLU's fc1 and gate in one kernel, x [M, K] and fc1's weight [2H, K] = [value rows; gate
rows] -> value * silu(gate) [M, H]: each program streams the value and gate rows of its output columns, so the
gate runs in the epilogue and the [M, 2H] output of fc1 is never written (one launch instead of two). For the
decode step only (no autograd, at most 16 rows); `swiglu_applies` says where it runs.
"""

from __future__ import annotations

import torch

from .._common import check_backend, check_same_device, check_tensor, interpreting, rows_2d
from ..tiles import decode_linear_tiles, decode_swiglu_tiles
from .reference import decode_linear_reference, decode_swiglu_reference

__all__ = ["DEFAULT_TILES", "MAX_ROWS", "SWIGLU_TILES", "decode_linear", "decode_linear_reference", "decode_swiglu",
           "decode_swiglu_reference", "swiglu_applies", "triton_applies"]

_OP = "decode_linear"
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TRITON_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROWS = 16
DEFAULT_TILES = {"block_n": 16, "block_k": 256, "num_stages": 4, "num_warps": 4}
# decode_swiglu's tiles (output columns per program, of each half) where kernels/tiles.py lists none: per program
# two weight tiles of block_n rows per K step; the best of five at Based-1.3B's fc1 on the H200 (2026-12-02)
SWIGLU_TILES = {"block_n": 32, "block_k": 128, "num_stages": 5, "num_warps": 4}


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _half_decode_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """What both kernels' "applies" checks share: at most MAX_ROWS rows, x and weight in one half dtype."""
    return x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16) and _rows(x) <= MAX_ROWS


def _check_triton_inputs(op: str, x: torch.Tensor, weight: torch.Tensor, hint: str) -> None:
    """A clear error where backend='triton' cannot take x and weight."""
    rows = _rows(x)
    if rows > MAX_ROWS or x.dtype not in _TRITON_FLOATS or weight.dtype != x.dtype:
        raise ValueError(f"{op}: backend='triton' takes at most {MAX_ROWS} rows of x in weight's dtype (fp32, "
                         f"bf16 or fp16); got {rows} rows, x {x.dtype}, weight {weight.dtype}{hint}")


def triton_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True where backend="auto" runs the Triton kernel: a table entry for (K, N) on this device kind, half
    precision weights and x, at most 16 rows, CUDA tensors (or the interpreter)."""
    if not _half_decode_rows(x, weight):
        return False
    if bias is not None and bias.dtype != weight.dtype:
        return False
    if not (x.is_cuda or interpreting()):
        return False
    entry = decode_linear_tiles(x.device, weight.shape[1], weight.shape[0])
    return bool(entry) and _rows(x) <= entry.get("max_rows", MAX_ROWS)


def _check_tile_fields(op: str, tiles: dict) -> None:
    unknown = set(tiles) - set(DEFAULT_TILES)
    if unknown:
        raise ValueError(f"{op}: unknown tile fields {sorted(unknown)}; expected {sorted(DEFAULT_TILES)}")


def _check(x, weight, bias) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{_OP}: x must be a tensor [..., K]")
    check_tensor(_OP, "weight", weight, 2, _FLOATS)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{_OP}: x [..., K] and weight [N, K] disagree on K: {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if bias is not None:
        check_tensor(_OP, "bias", bias, 1, _FLOATS)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{_OP}: bias must be [N] = [{weight.shape[0]}]; got {tuple(bias.shape)}")
    check_same_device(_OP, x=x, weight=weight, bias=bias)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: str = "auto",
                  **tiles) -> torch.Tensor:
    """See the module docstring; `tiles` (block_n, block_k, num_stages, num_warps) override the table."""
    _check(x, weight, bias)
    if backend == "auto":
        backend = "triton" if triton_applies(x, weight, bias) else "reference"
    check_backend(_OP, backend, *(t for t in (x, weight, bias) if t is not None))
    if backend == "reference":
        return decode_linear_reference(x, weight, bias)
    _check_triton_inputs(_OP, x, weight, ". Use backend='auto' or 'reference'.")
    _check_tile_fields(_OP, tiles)
    merged = dict(DEFAULT_TILES, **decode_linear_tiles(x.device, weight.shape[1], weight.shape[0], **tiles))
    from . import ops

    bias = bias.contiguous() if bias is not None else None
    y = ops.decode_linear_op(rows_2d(x), weight.contiguous(), bias, merged["block_n"], merged["block_k"],
                             merged["num_stages"], merged["num_warps"])
    return y.reshape(*x.shape[:-1], weight.shape[0])


def swiglu_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where decode_swiglu's kernel runs: at most 16 rows, half-precision x and weight of one dtype, an even
    number of weight rows, CUDA tensors (or the interpreter), and no gradient to record (it has no backward)."""
    if not _half_decode_rows(x, weight):
        return False
    if weight.dim() != 2 or weight.shape[0] % 2 or x.shape[-1] != weight.shape[1]:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return (x.is_cuda and weight.is_cuda) or (interpreting() and x.device.type == weight.device.type == "cpu")


def decode_swiglu(x: torch.Tensor, weight: torch.Tensor, backend: str = "triton", **tiles) -> torch.Tensor:
    """x [..., K], fc1's weight [2H, K] -> value * silu(gate) [..., H] in x's dtype (see the module docstring);
    `tiles` override SWIGLU_TILES; backend "reference" is torch's linear, then the gate."""
    op = "decode_swiglu"
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{op}: x must be a tensor [..., K]")
    check_tensor(op, "weight", weight, 2, _FLOATS)
    if weight.shape[0] % 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: expected x [..., K] and weight [2H, K]; got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    check_same_device(op, x=x, weight=weight)
    check_backend(op, backend, x, weight)
    if backend == "reference":
        return decode_swiglu_reference(x, weight)
    _check_triton_inputs(op, x, weight, ". Use backend='reference'.")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        raise ValueError(f"{op}: the Triton form has no backward (decode only); run it under torch.no_grad() or "
                         "use backend='reference'")
    _check_tile_fields(op, tiles)
    merged = {**SWIGLU_TILES, **decode_swiglu_tiles(x.device, weight.shape[1], weight.shape[0], **tiles)}
    from . import ops

    y = ops.decode_swiglu_op(rows_2d(x), weight.contiguous(), merged["block_n"], merged["block_k"],
                             merged["num_stages"], merged["num_warps"])
    return y.reshape(*x.shape[:-1], weight.shape[0] // 2)
