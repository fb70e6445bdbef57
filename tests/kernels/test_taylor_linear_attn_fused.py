"""The fused (sequential-chunk, state on chip) Taylor linear-attention kernels against the float64 oracle."""

import pytest
import torch
from kernel_checks import (
    DEVICE,
    check_output_and_grads,
    check_state_io_against_quadratic,
    leaves,
    packed_doc_ids,
)

from kernels.taylor_linear_attn import taylor_linear_attention_quadratic
from kernels.taylor_linear_attn.fused_impl import taylor_linear_attention_fused

# (B, T, H, F, Dv, document lengths, dtype, chunk, backward chunk, feature tile build)
CASES = [
    (2, 63, 2, 16, 40, [5, 1, 30], torch.float32, 16, 32, "select"),
    (1, 77, 1, 8, 24, [20, 40], torch.bfloat16, 32, 16, "reshape"),
    # second-order state in 4 / 2 row blocks (F 8 pads to FP 16: blocks of 64 / 128 rows, zero rows masked)
    (2, 63, 2, 16, 40, [5, 1, 30], torch.float32, 16, 32, "split"),
    (1, 77, 1, 8, 24, [20, 40], torch.bfloat16, 32, 16, "split2"),
]


def case_id(case) -> str:
    b, t, h, f, dv, docs, dtype, bc, bcb, outer = case
    return f"B{b}-T{t}-H{h}-F{f}-D{dv}-{str(dtype).split('.')[-1]}-C{bc}-{bcb}-{outer}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_matches_float64_with_documents_and_state(case):
    b, t, h, f, dv, docs, dtype, bc, bcb, outer = case
    torch.manual_seed(0)
    doc_ids = packed_doc_ids(b, t, docs)
    split = dict(split=dict(outer="split", row_blocks=4), split2=dict(outer="split", row_blocks=2))
    blocks = dict(chunk_size=bc, chunk_size_bwd=bcb, block_v=16, block_v_bwd=16, **split.get(outer, dict(outer=outer)))
    (q, k, v), (q64, k64, v64) = leaves([torch.randn(b, t, h, f, device=DEVICE) for _ in range(2)]
                                        + [torch.randn(b, t, h, dv, device=DEVICE)], dtype)
    o = taylor_linear_attention_fused(q, k, v, doc_ids=doc_ids, **blocks)
    o_ref = taylor_linear_attention_quadratic(q64, k64, v64, doc_ids=doc_ids)
    check_output_and_grads(o, o_ref, (q, k, v), (q64, k64, v64), dtype, ["dq", "dk", "dv"])
    nf = 1 + f + f * f
    low, high = leaves([q.detach(), k.detach(), v.detach()], dtype)
    kv0 = (0.3 * torch.randn(b, h, nf, dv, device=DEVICE)).requires_grad_()
    ks0 = (1.0 + torch.rand(b, h, nf, device=DEVICE)).requires_grad_()
    out = taylor_linear_attention_fused(*low, doc_ids=doc_ids, initial_state=(kv0, ks0), output_final_state=True,
                                        **blocks)
    check_state_io_against_quadratic(out, [*low, kv0, ks0],
                                     [*high, kv0.detach().double().requires_grad_(),
                                      ks0.detach().double().requires_grad_()], doc_ids, dtype)
