"""PyTorch custom ops (namespace `based::`) around the Triton sliding-window attention kernels.

One opaque operator per kernel call, with a fake implementation (shapes and dtypes) and autograd on the
operator, so that torch.compile keeps the kernels inside its graph (it cannot trace a raw Triton launch):
- based::sliding_window_fwd: o [B, T, H, D] and the log-sum-exp [B, H, T] fp32 (saved for backward).
- based::sliding_window_bwd: dq, dk, dv.
- based::sliding_window_step: one decode token; writes k, v into the ring caches in place (mutates_args).
`tiles` is one int per kernels.tiles.SWA_FIELDS except "bwd" (0 = the per-device table, then the built-in
default); `bwd` is the backward mode ("" = the table's, then "split"). Bodies import Triton only when run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._common import last_dim_contiguous
from ..tiles import SWA_FIELDS, sliding_window_tiles

INT_FIELDS = tuple(f for f in SWA_FIELDS if f != "bwd")


def _plan(q: Tensor, window: int, tiles: list[int], bwd: str):
    from .triton_impl import Plan

    explicit = {name: (value or None) for name, value in zip(INT_FIELDS, tiles, strict=True)}
    explicit["bwd"] = bwd or None
    return Plan(q.shape[-1], **sliding_window_tiles(q.device, window, q.shape[-1], **explicit))


def doc_start_positions(doc_ids: Tensor | None, batch: int, seqlen: int, device: torch.device) -> Tensor:
    """int32 [B, T]: the position where each token's document starts (position 0, and every change of doc id
    along the row); zeros when doc_ids is None. The kernels mask with it: key j is visible to query i when
    max(i - window, start(i)) <= j <= i."""
    if doc_ids is None:
        return torch.zeros(batch, seqlen, dtype=torch.int32, device=device)
    idx = torch.arange(seqlen, device=device).expand(batch, seqlen)
    change = torch.ones_like(doc_ids, dtype=torch.bool)
    change[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.where(change, idx, 0).cummax(dim=1).values.to(torch.int32).contiguous()


def _prepare(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None):
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return q, k, v, doc_start_positions(doc_ids, q.shape[0], q.shape[1], q.device)


@torch.library.custom_op("based::sliding_window_fwd", mutates_args=())
def sliding_window_fwd(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None, window: int, scale: float,
                       tiles: list[int], bwd: str) -> tuple[Tensor, Tensor]:
    """q, k, v [B, T, H, D] -> o [B, T, H, D] (q's dtype), lse [B, H, T] fp32."""
    from .triton_impl import forward

    return forward(*_prepare(q, k, v, doc_ids), window, scale, _plan(q, window, tiles, bwd))


@sliding_window_fwd.register_fake
def _(q, k, v, doc_ids, window, scale, tiles, bwd):
    batch, seqlen, heads, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(batch, heads, seqlen, dtype=torch.float32))


@torch.library.custom_op("based::sliding_window_bwd", mutates_args=())
def sliding_window_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None, o: Tensor,
                       lse: Tensor, window: int, scale: float, tiles: list[int],
                       bwd: str) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv [B, T, H, D] in the inputs' dtypes."""
    from .triton_impl import backward

    q, k, v, starts = _prepare(q, k, v, doc_ids)
    dq, dk, dv = backward(do, q, k, v, starts, o, lse, window, scale, _plan(q, window, tiles, bwd))
    return dq.contiguous(), dk, dv


@sliding_window_bwd.register_fake
def _(do, q, k, v, doc_ids, o, lse, window, scale, tiles, bwd):
    fmt = torch.contiguous_format
    return (torch.empty_like(q, memory_format=fmt), torch.empty_like(k, memory_format=fmt),
            torch.empty_like(v, memory_format=fmt))


def _setup(ctx, inputs, output) -> None:
    q, k, v, doc_ids, window, scale, tiles, bwd = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, doc_ids, o, lse)
    ctx.args = (window, scale, tiles, bwd)


def _backward(ctx, do, d_lse):
    q, k, v, doc_ids, o, lse = ctx.saved_tensors
    dq, dk, dv = sliding_window_bwd(do, q, k, v, doc_ids, o, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


sliding_window_fwd.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("based::sliding_window_step", mutates_args=("k_cache", "v_cache"))
def sliding_window_step(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor,
                        scale: float) -> Tensor:
    """One decode token: q, k, v [B, H, D]; ring caches [B, W, H, D] (slot pos % W written in place);
    pos [B]. Returns o [B, H, D]."""
    return _step_body(q, k, v, k_cache, v_cache, pos, scale)


def _step_body(q, k, v, k_cache, v_cache, pos, scale):
    from .triton_impl import sliding_window_step_triton

    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return sliding_window_step_triton(q, k, v, k_cache, v_cache, pos, scale=scale)


def sliding_window_step_call(q, k, v, k_cache, v_cache, pos, scale: float) -> Tensor:
    """The custom op under torch.compile, its body in eager mode (the op's dispatch costs ~7x a plain call;
    see taylor_linear_attn.ops.taylor_linear_attention_step_call)."""
    if torch.compiler.is_compiling():
        return sliding_window_step(q, k, v, k_cache, v_cache, pos, scale)
    return _step_body(q, k, v, k_cache, v_cache, pos, scale)


@sliding_window_step.register_fake
def _(q, k, v, k_cache, v_cache, pos, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def sliding_window_attention_triton(q, k, v, *, window, doc_ids=None, scale=None, block_m=None, block_n=None,
                                    num_warps=None, num_stages=None, bwd=None, bwd_block_m=None,
                                    bwd_block_n=None, bwd_warps=None, dq_block_m=None, dq_block_n=None,
                                    dq_warps=None, bwd_stages=None):
    """Triton path of `sliding_window_attention` (arguments already validated), through
    based::sliding_window_fwd; block sizes are tunable (None: kernels/tiles.py's table, then the default).

    bwd: backward mode, "split" (default, deterministic) or "fused" (one kernel, dQ by fp32 atomics);
    bwd_block_m, bwd_block_n, bwd_warps: the dK/dV kernel's tiles and warps (default: the forward's);
    dq_block_m, dq_block_n, dq_warps: the dQ kernel's (default: the dK/dV kernel's); bwd_stages: the
    backward's pipeline stages (default: num_stages).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    given = dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                 bwd_block_m=bwd_block_m, bwd_block_n=bwd_block_n, bwd_warps=bwd_warps, dq_block_m=dq_block_m,
                 dq_block_n=dq_block_n, dq_warps=dq_warps, bwd_stages=bwd_stages)
    tiles = [int(given[name] or 0) for name in INT_FIELDS]
    if bwd is not None and bwd not in ("split", "fused"):
        raise ValueError(f"sliding_window_attention_triton: bwd={bwd!r}; expected one of ('split', 'fused') "
                         "(or None for 'split')")
    o, _ = sliding_window_fwd(q, k, v, doc_ids, int(window), scale, tiles, bwd or "")
    return o
