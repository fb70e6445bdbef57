"""Block sizes of one Taylor linear-attention call (no Triton import: the fake implementations that
torch.compile traces need the shapes of the chunk states, which depend on the chunk and feature block)."""

from __future__ import annotations

import math

import torch

from .._common import next_pow2
from ..tiles import LA_FIELDS, linear_attn_tiles


def cdiv(a, b: int):
    """Ceiling division; `a` may be a symbolic size under torch.compile."""
    return (a + b - 1) // b


def padded_rows(feature_dim: int, block_f: int) -> int:
    """NP: the kernels' state rows (1 + F + F(F+1)/2 symmetric features) padded to a multiple of block_f."""
    rows = 1 + feature_dim + feature_dim * (feature_dim + 1) // 2
    return cdiv(rows, block_f) * block_f


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Chunk states are bf16 for bf16 inputs (the tensor cores read them as they are), fp32 otherwise."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


class Plan:
    """Block sizes of one call: chunk BC, feature block BF, value blocks BV (forward output), BVS (state
    passes) and BVB (backward), warps per kernel. Defaults: the fastest of the configurations timed on an
    H100 (docs/PERFORMANCE.md); kernels/tiles.py overrides them per device and shape (`Plan.for_call`)."""

    def __init__(self, seqlen, feature_dim: int, value_dim: int, chunk_size: int | None = None,
                 block_f: int | None = None, block_v: int | None = None, block_v_state: int | None = None,
                 block_v_bwd: int | None = None, num_warps: int | None = None, bwd_warps: int | None = None,
                 num_stages: int | None = None) -> None:
        self.F = feature_dim
        self.FP = max(16, next_pow2(feature_dim))
        self.BC = chunk_size or 128
        self.BF = block_f or 32
        self.NF = 1 + feature_dim + feature_dim * feature_dim
        self.NP = padded_rows(feature_dim, self.BF)
        self.BV = block_v or min(128, max(16, next_pow2(value_dim)))
        self.BVS = block_v_state or min(128, max(16, next_pow2(value_dim)))
        self.NV = cdiv(value_dim, self.BV)
        self.NVS = cdiv(value_dim, self.BVS)
        self.BVB = block_v_bwd or min(128, max(16, next_pow2(value_dim)))
        # T >= 1 is checked by the public function
        self.NC = cdiv(seqlen, self.BC)
        # 4 warps up to [128 x 64] tiles (Dv <= 64), 8 above: on the H100 at Dv 64 the output kernel takes
        # 0.36 vs 0.45 ms and the backward 1.07 vs 1.18 ms with 4 (docs/PERFORMANCE.md, third session)
        self.num_warps = num_warps or (8 if self.BV * self.BC > 8192 else 4)
        self.bwd_warps = bwd_warps or (8 if self.BVB * self.BC > 8192 else 4)
        self.inv_sqrt_f = 1.0 / math.sqrt(feature_dim)
        # software-pipelining depth of the kernels' loops; {} keeps Triton's default
        self.stages = {} if num_stages is None else {"num_stages": num_stages}

    @classmethod
    def for_call(cls, q: torch.Tensor, v: torch.Tensor, tiles: list[int]) -> Plan:
        """The plan of a call with q [B, T, H, F], v [B, T, H, Dv] and the caller's `tiles` (one int per
        tiles.LA_FIELDS, 0 = not given) over the per-device table."""
        explicit = {name: (value or None) for name, value in zip(LA_FIELDS, tiles, strict=True)}
        chosen = linear_attn_tiles(q.device, v.shape[-1], q.shape[1], **explicit)
        return cls(q.shape[1], q.shape[-1], v.shape[-1], **chosen)


def tiles_arg(**explicit: int | None) -> list[int]:
    """The `tiles` list of the custom ops from keyword block sizes (None or missing = not given)."""
    unknown = set(explicit) - set(LA_FIELDS)
    if unknown:
        raise ValueError(f"taylor_linear_attention: unknown block-size arguments {sorted(unknown)}; "
                         f"expected some of {LA_FIELDS}")
    return [int(explicit.get(name) or 0) for name in LA_FIELDS]


def resolved_tiles_arg(q: torch.Tensor, v: torch.Tensor, **explicit: int | None) -> list[int]:
    """tiles_arg of the block sizes this call will use: the explicit ones over kernels/tiles.py's table, with
    the chunk size and feature block always set (the built-in defaults where neither gives them). The caller
    resolves them, not the op: the chunk states' shapes depend on those two, and as constants of a compiled
    graph (which inductor's cache keys) the op's fake and real bodies cannot disagree on them, even when the
    table differs between tracing and running (a new checkout under a warm cache: seen on the H200)."""
    tiles_arg(**explicit)  # the unknown-name check
    chosen = linear_attn_tiles(q.device, v.shape[-1], q.shape[1], **explicit)
    plan = Plan(q.shape[1], q.shape[-1], v.shape[-1], **chosen)
    return tiles_arg(**dict(chosen, chunk_size=plan.BC, block_f=plan.BF))
