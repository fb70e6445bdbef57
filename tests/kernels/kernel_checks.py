"""Shared helpers of the kernel tests: error bounds per dtype, packed-document ids, gradient runs."""

from __future__ import annotations

import torch

# relative L2 error bounds against a float64 reference computed from the same (rounded) inputs
BOUNDS = {torch.float32: 2e-5, torch.bfloat16: 2.5e-2, torch.float16: 5e-3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor_rms: float = 1e-2) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere gives inf.

    The denominator is at least floor_rms * sqrt(numel), so that a gradient that is zero in exact
    arithmetic (dq and dk at T = 1) is compared on an absolute scale.
    """
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return float("inf")
    floor = floor_rms * max(1, expected.numel()) ** 0.5
    return ((actual - expected).norm() / expected.norm().clamp_min(floor)).item()


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """Relative error within BOUNDS[dtype] * scale; bf16/fp16 round unit-scale operands by ~4e-3, so their
    absolute floor is an RMS of 0.1 (fp32: 0.01)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected, floor_rms=1e-2 if dtype == torch.float32 else 1e-1)
    bound = BOUNDS[dtype] * scale
    assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.1e} ({dtype})"


def packed_doc_ids(batch: int, seqlen: int, lengths: list[int] | None, device=DEVICE) -> torch.Tensor | None:
    """Row 0 packs documents of the given lengths (the last one takes the rest); other rows shift them."""
    if lengths is None:
        return None
    rows = []
    for b in range(batch):
        ids, doc = [], 10 * b
        for length in lengths[b % len(lengths):] + lengths[: b % len(lengths)]:
            ids += [doc] * length
            doc += 1
        ids = (ids + [doc] * seqlen)[:seqlen]
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.int32, device=device)


def leaves(tensors, dtype):
    """Detached copies in `dtype` that require grad, and float64 copies of the same rounded values."""
    low = [t.to(dtype).detach().requires_grad_() for t in tensors]
    high = [t.detach().double().requires_grad_() for t in low]
    return low, high


def grads(outputs, inputs, cotangents):
    """d(sum_i <outputs_i, cotangents_i>)/d inputs, computed in each input's own precision path."""
    loss = sum((o.double() * c.double()).sum() for o, c in zip(outputs, cotangents, strict=True))
    return torch.autograd.grad(loss, inputs)


def check_output_and_grads(out, out_ref, inputs, inputs_f64, dtype, names) -> None:
    """A kernel's output `out` of `inputs` against the float64 `out_ref` of `inputs_f64` (the same rounded
    values, see `leaves`): the output's dtype and value, then the gradient of every input for one random
    cotangent, each within the dtype's bound. `names` labels the inputs' gradients in failures."""
    assert out.dtype == inputs[0].dtype, f"output dtype {out.dtype} != input dtype {inputs[0].dtype}"
    assert_close("output", out, out_ref, dtype)
    cot = torch.randn_like(out_ref)
    got, want = grads([out], list(inputs), [cot]), grads([out_ref], list(inputs_f64), [cot])
    for name, g, g_ref in zip(names, got, want, strict=True):
        assert_close(name, g, g_ref, dtype)


def check_state_io_against_quadratic(out, leaves_lowp, leaves_f64, doc_ids, dtype) -> None:
    """Compare (o, (kv, k_sum)) of a kernel run with an initial state against the float64 quadratic oracle.

    `leaves_lowp` / `leaves_f64` are (q, k, v, kv0, k_sum0) as the kernel and the oracle received them; the
    outputs and every gradient (q, k, v and both initial-state tensors) must agree within the dtype's bound.
    """
    from kernels.taylor_linear_attn import taylor_linear_attention_quadratic

    o, (kv, ks) = out
    q64, k64, v64, kv64, ks64 = leaves_f64
    o_ref, (kv_ref, ks_ref) = taylor_linear_attention_quadratic(q64, k64, v64, doc_ids=doc_ids,
                                                                initial_state=(kv64, ks64), output_final_state=True)
    for name, a, e in (("o", o, o_ref), ("kv", kv, kv_ref), ("k_sum", ks, ks_ref)):
        assert_close(name, a, e, dtype)
    cot = [torch.randn_like(o_ref), 0.01 * torch.randn_like(kv_ref), 0.01 * torch.randn_like(ks_ref)]
    got = grads([o, kv, ks], list(leaves_lowp), cot)
    want = grads([o_ref, kv_ref, ks_ref], list(leaves_f64), cot)
    for name, g, g_ref in zip(["dq", "dk", "dv", "d_kv0", "d_k_sum0"], got, want, strict=True):
        assert_close(name, g, g_ref, dtype)
