"""PyTorch custom ops (namespace `based::`) around the Triton Taylor linear-attention kernels.

torch.compile cannot trace a raw Triton launch (inductor fails on the kernel's source), so each kernel call
is one opaque operator with a fake implementation (shapes and dtypes only, for tracing) and autograd
registered on the operator: a compiled model keeps the kernels inside its graph, without graph breaks.

Ops (their bodies import Triton only when they run):
- based::taylor_linear_attention_fwd: o, den [B, H, T], chunk states, final state (empty when not asked).
- based::taylor_linear_attention_bwd: dq, dk, dv and the gradient of the initial state (empty when not asked).
- based::taylor_linear_attention_step: one decode token; updates kv, k_sum in place (mutates_args).
`tiles` is one int per kernels.tiles.LA_FIELDS (0 = the per-device table, then the built-in default).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._common import last_dim_contiguous
from ..tiles import la_forward_backend
from .plan import Plan, resolved_tiles_arg, state_dtype, tiles_arg  # noqa: F401  (tiles_arg: tests, bench)

_FINAL = torch.float32


def _docs(doc_ids: Tensor | None, q: Tensor) -> Tensor:
    """doc_ids as the kernels read them: contiguous, zeros when absent (one document per row)."""
    if doc_ids is None:
        return torch.zeros(q.shape[0], q.shape[1], dtype=torch.int32, device=q.device)
    return doc_ids.contiguous()


def _contig(*tensors: Tensor) -> tuple[Tensor, ...]:
    # kernels take any strides but the last (compiled graphs may hand the op other layouts)
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _nf(feature_dim: int) -> int:
    return 1 + feature_dim + feature_dim * feature_dim


def _forward_impl(q: Tensor, k: Tensor, v: Tensor, plan: Plan):
    """triton_impl.forward, or the CUDA kernel's forward_cuda (kernels/taylor_linear_attn/cuda: the same outputs)
    at a shape kernels/tiles.py LA_FORWARD_CUDA lists, for inputs it takes, once its library is built."""
    from .triton_impl import forward

    if la_forward_backend(q.device, v.shape[-1], q.shape[1], q.shape[0] * q.shape[2]) != "cuda":
        return forward
    from . import cuda

    return cuda.forward_cuda if cuda.cuda_applies(q, k, v, plan) and cuda.available() else forward


@torch.library.custom_op("based::taylor_linear_attention_fwd", mutates_args=())
def taylor_linear_attention_fwd(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None, kv0: Tensor | None,
                                ks0: Tensor | None, eps: float, output_final_state: bool,
                                tiles: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """q, k [B, T, H, F], v [B, T, H, Dv] -> o [B, T, H, Dv], den [B, H, T] fp32, chunk states
    [B*H, NC, NP, Dv] and [B*H, NC, NP], final (kv [B, H, NF, Dv], k_sum [B, H, NF]) fp32 or two empty."""
    q, k, v = _contig(q, k, v)
    plan = Plan.for_call(q, v, tiles)
    forward = _forward_impl(q, k, v, plan)
    o, den, (states, zst), final = forward(q, k, v, _docs(doc_ids, q), eps, kv0, ks0, output_final_state, plan)
    if final is None:
        final = (q.new_empty(0, dtype=_FINAL), q.new_empty(0, dtype=_FINAL))
    return o, den, states, zst, final[0].contiguous(), final[1].contiguous()


@taylor_linear_attention_fwd.register_fake
def _(q, k, v, doc_ids, kv0, ks0, eps, output_final_state, tiles):
    batch, seqlen, heads, f = q.shape
    dv = v.shape[-1]
    plan = Plan.for_call(q, v, tiles)
    o = v.new_empty(batch, seqlen, heads, dv)
    den = v.new_empty(batch, heads, seqlen, dtype=torch.float32)
    states = v.new_empty(batch * heads, plan.NC, plan.NP, dv, dtype=state_dtype(v.dtype))
    zst = v.new_empty(batch * heads, plan.NC, plan.NP, dtype=torch.float32)
    if output_final_state:
        kv = v.new_empty(batch, heads, _nf(f), dv, dtype=_FINAL)
        ks = v.new_empty(batch, heads, _nf(f), dtype=_FINAL)
    else:
        kv, ks = v.new_empty(0, dtype=_FINAL), v.new_empty(0, dtype=_FINAL)
    return o, den, states, zst, kv, ks


@torch.library.custom_op("based::taylor_linear_attention_bwd", mutates_args=())
def taylor_linear_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None, o: Tensor,
                                den: Tensor, states: Tensor, zst: Tensor, d_kv: Tensor | None,
                                d_ks: Tensor | None, need_d_initial: bool,
                                tiles: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv (the inputs' dtypes) and the initial state's gradient (fp32; two empty tensors unless
    need_d_initial). d_kv, d_ks: gradients of the final state, or None (a missing one counts as zeros)."""
    from .triton_impl import backward, final_state_grads

    q, k, v = _contig(q, k, v)
    plan = Plan.for_call(q, v, tiles)
    d_final = final_state_grads(d_kv, d_ks, q, v, plan.NF)
    dq, dk, dv, d_init = backward(do, q, k, v, _docs(doc_ids, q), o, den, (states, zst), d_final, need_d_initial,
                                  plan)
    if d_init is None:
        d_init = (q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32))
    return dq.contiguous(), dk.contiguous(), dv, d_init[0].contiguous(), d_init[1].contiguous()


@taylor_linear_attention_bwd.register_fake
def _(do, q, k, v, doc_ids, o, den, states, zst, d_kv, d_ks, need_d_initial, tiles):
    batch, _, heads, f = q.shape
    if need_d_initial:
        d_kv0 = q.new_empty(batch, heads, _nf(f), v.shape[-1], dtype=torch.float32)
        d_ks0 = q.new_empty(batch, heads, _nf(f), dtype=torch.float32)
    else:
        d_kv0, d_ks0 = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format), d_kv0, d_ks0


def _setup_fwd(ctx, inputs, output) -> None:
    q, k, v, doc_ids, kv0, ks0, _, output_final_state, tiles = inputs
    o, den, states, zst, _, _ = output
    ctx.mark_non_differentiable(den, states, zst)
    # unused outputs (den, the chunk states, a final state nobody reads) get None, not zero tensors
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, doc_ids, o, den, states, zst)
    ctx.tiles = tiles
    ctx.output_final_state = output_final_state
    ctx.need_d_initial = kv0 is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])


def _backward_fwd(ctx, do, d_den, d_states, d_zst, d_kv, d_ks):
    q, k, v, doc_ids, o, den, states, zst = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    if not ctx.output_final_state:
        d_kv = d_ks = None
    dq, dk, dv, d_kv0, d_ks0 = taylor_linear_attention_bwd(do, q, k, v, doc_ids, o, den, states, zst, d_kv, d_ks,
                                                           ctx.need_d_initial, ctx.tiles)
    if not ctx.need_d_initial:
        d_kv0 = d_ks0 = None
    return dq, dk, dv, None, d_kv0, d_ks0, None, None, None


taylor_linear_attention_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)


@torch.library.custom_op("based::taylor_linear_attention_step", mutates_args=("kv", "k_sum"))
def taylor_linear_attention_step(q: Tensor, k: Tensor, v: Tensor, kv: Tensor, k_sum: Tensor, eps: float) -> Tensor:
    """One decode token: q, k [B, H, F], v [B, H, Dv]; kv [B, H, NF, Dv], k_sum [B, H, NF] fp32 contiguous,
    updated in place. Returns o [B, H, Dv] in v's dtype."""
    return _step_body(q, k, v, kv, k_sum, eps)


def _step_body(q, k, v, kv, k_sum, eps):
    from .triton_impl import taylor_linear_attention_step_triton

    q, k, v = _contig(q, k, v)
    return taylor_linear_attention_step_triton(q, k, v, kv, k_sum, eps)[0]


def taylor_linear_attention_step_call(q, k, v, kv, k_sum, eps: float) -> Tensor:
    """The decode step through the custom op under torch.compile (so the in-place update is in the graph),
    and straight to its body in eager mode: the op's Python dispatch costs about 7x a plain call (84 vs 12 us
    on this project's CPU machine), paid per layer and token when decoding without CUDA graphs."""
    if torch.compiler.is_compiling():
        return taylor_linear_attention_step(q, k, v, kv, k_sum, eps)
    return _step_body(q, k, v, kv, k_sum, eps)


@taylor_linear_attention_step.register_fake
def _(q, k, v, kv, k_sum, eps):
    return v.new_empty(v.shape[0], v.shape[1], v.shape[2])


def taylor_linear_attention_triton(q, k, v, *, eps=1e-12, doc_ids=None, initial_state=None,
                                   output_final_state=False, chunk_size=None, block_f=None, block_v=None,
                                   block_v_state=None, block_v_bwd=None, num_warps=None, bwd_warps=None,
                                   num_stages=None):
    """Triton path of `taylor_linear_attention` (arguments already validated) through the custom op
    based::taylor_linear_attention_fwd; block sizes are tunable (None: kernels/tiles.py's table for this
    device and shape, then the built-in default)."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    tiles = resolved_tiles_arg(q, v, chunk_size=chunk_size, block_f=block_f, block_v=block_v,
                               block_v_state=block_v_state, block_v_bwd=block_v_bwd, num_warps=num_warps,
                               bwd_warps=bwd_warps, num_stages=num_stages)
    kv0, ks0 = initial_state if initial_state is not None else (None, None)
    o, _, _, _, kv, ks = taylor_linear_attention_fwd(q, k, v, doc_ids, kv0, ks0, float(eps),
                                                     bool(output_final_state), tiles)
    if output_final_state:
        return o, (kv, ks)
    return o
