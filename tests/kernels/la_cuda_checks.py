"""Helpers of the CUDA linear-attention checks, shared by tests/kernels/test_la_cuda.py and bench/la_cuda.py
(no pytest import): inputs, float64 references of den and of the chunk states, and one comparison of every
output of forward_cuda."""

from __future__ import annotations

import math

import torch
from kernel_checks import assert_close, packed_doc_ids, rel_err

from kernels.taylor_linear_attn import taylor_linear_attention_reference

F = 16
DOCS = [700, 3, 250]


def make_case(b, t, h, dv, *, docs: bool, state: bool, device="cpu", doc_dtype=torch.int32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, F, generator=gen).bfloat16().to(device)
    k = torch.randn(b, t, h, F, generator=gen).bfloat16().to(device)
    v = torch.randn(b, t, h, dv, generator=gen).bfloat16().to(device)
    lengths = [max(1, t // 3), 3, max(1, t // 5)] if t < 2 * sum(DOCS) else DOCS
    ids = packed_doc_ids(b, t, lengths if docs else None, device=device)
    ids = torch.zeros(b, t, dtype=doc_dtype, device=device) if ids is None else ids.to(doc_dtype)
    kv0 = ks0 = None
    if state:
        nf = 1 + F + F * F
        kv0 = (0.3 * torch.randn(b, h, nf, dv, generator=gen)).to(device)
        ks0 = (1.0 + torch.rand(b, h, nf, generator=gen)).to(device)
    return q, k, v, ids, kv0, ks0


def case_id(b, t, h, dv, docs, state, final, bc=None) -> str:
    parts = [f"B{b}-T{t}-H{h}-D{dv}", "packed" if docs else "one-doc", "state" if state else "zero", "final" if final
             else "no-final"]
    return "-".join(parts + ([f"BC{bc}"] if bc else []))


def den_reference(q, k, docs, ks0, eps):
    """[B, H, T] float64: sum over the same document's earlier keys of phi(q).phi(k), plus phi(q).ks0 in the
    row's first document, plus eps (what the kernels store)."""
    qd, kd = q.double(), k.double()
    s = torch.einsum("bthf,bshf->bhts", qd, kd) / math.sqrt(F)
    t = q.shape[1]
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril() & (docs[:, :, None] == docs[:, None, :])[:, None]
    den = ((1 + s + 0.5 * s * s) * mask).sum(-1)
    if ks0 is not None:
        from kernels.taylor_linear_attn import taylor_feature_map

        first = (docs == docs[:, :1]).double()[:, None, :]
        den = den + first * torch.einsum("bthn,bhn->bht", taylor_feature_map(qd), ks0.double())
    return den + eps


def states_reference(q, k, v, docs, kv0, ks0, chunk, lay):
    """float64 symmetric states before each chunk (the prefix's final state, in the kernels' layout)."""
    b, t, h, _ = q.shape
    dv = v.shape[-1]
    nc = -(-t // chunk)
    init = None if kv0 is None else (kv0.double(), ks0.double())
    states, zs = [], []
    to_sym = lay.to_sym.double()
    for c in range(nc):
        if c == 0:
            if init is None:
                kv = torch.zeros(b, h, 1 + F + F * F, dv, dtype=torch.float64, device=q.device)
                ks = torch.zeros(b, h, 1 + F + F * F, dtype=torch.float64, device=q.device)
            else:
                kv, ks = init
        else:
            sl = slice(0, c * chunk)
            _, (kv, ks) = taylor_linear_attention_reference(q[:, sl].double(), k[:, sl].double(), v[:, sl].double(),
                                                            doc_ids=docs[:, sl], initial_state=init,
                                                            output_final_state=True)
        states.append(torch.einsum("pn,bhnd->bhpd", to_sym, kv).reshape(b * h, -1, dv))
        zs.append(torch.einsum("pn,bhn->bhp", to_sym, ks).reshape(b * h, -1))
    return torch.stack(states, 1), torch.stack(zs, 1)


def check_against_references(got, q, k, v, docs, kv0, ks0, final_wanted, plan, triton_out=None, eps=1e-12):
    """Every output of forward_cuda against the float64 references (bf16 bounds) and, when given, the Triton
    forward's (closer bounds: the same rounding points, other summation orders and chunking)."""
    from kernels.taylor_linear_attn.triton_impl import layout

    o, den, (states, zst), final = got
    lay = layout(F, plan.BF, str(q.device))
    init = None if kv0 is None else (kv0.double(), ks0.double())
    out = taylor_linear_attention_reference(q.double(), k.double(), v.double(), doc_ids=docs, initial_state=init,
                                            output_final_state=final_wanted)
    o_ref, fin_ref = out if final_wanted else (out, None)
    assert o.dtype == torch.bfloat16 and states.dtype == torch.bfloat16
    assert_close("o", o, o_ref, torch.bfloat16)
    assert_close("den", den, den_reference(q, k, docs, ks0, eps), torch.float32, scale=50)
    s_ref, z_ref = states_reference(q, k, v, docs, kv0, ks0, plan.BC, lay)
    assert_close("states", states, s_ref, torch.bfloat16)
    assert_close("zst", zst, z_ref, torch.float32, scale=50)
    if final_wanted:
        assert_close("final kv", final[0], fin_ref[0], torch.bfloat16)
        assert_close("final k_sum", final[1], fin_ref[1], torch.float32, scale=50)
    else:
        assert final is None
    if triton_out is None:
        return
    o_t, den_t, (states_t, zst_t), final_t = triton_out
    # bf16 outputs: a few bf16 roundings apart (on the CPU the Triton interpreter's o is 6.5e-3 from float64, the
    # emulated kernel's 2.2e-3); fp32 ones: summation order only
    assert rel_err(o, o_t, 1e-1) < 2e-2, "o vs Triton"
    assert rel_err(den, den_t) < 1e-5, "den vs Triton"
    assert rel_err(states, states_t, 1e-1) < 2e-2, "states vs Triton"
    assert rel_err(zst, zst_t) < 1e-5, "zst vs Triton"
    if final_wanted:
        assert rel_err(final[0], final_t[0]) < 2e-2, "final kv vs Triton"
        assert rel_err(final[1], final_t[1]) < 1e-5, "final k_sum vs Triton"
