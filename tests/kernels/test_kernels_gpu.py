"""The numerics contract at realistic shapes on a CUDA GPU, in bf16: `pytest -m gpu tests/kernels`.

fp32 is checked on the CPU (interpreter, exact fp32 products); on the GPU fp32 inputs use tf32 matmuls.
"""

import pytest
import torch
from kernel_checks import (
    assert_close,
    check_output_and_grads,
    check_state_io_against_quadratic,
    leaves,
    packed_doc_ids,
)

from kernels.short_conv import short_conv_gated, short_conv_gated_reference, short_conv_gated_step
from kernels.sliding_window import (
    sliding_window_attention,
    sliding_window_attention_dense,
    sliding_window_step,
)
from kernels.sliding_window.triton_impl import sliding_window_attention_triton
from kernels.taylor_linear_attn import (
    taylor_linear_attention,
    taylor_linear_attention_step,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DOCS = [700, 3, 250]
DTYPE_IDS = {torch.bfloat16: "bf16", torch.float32: "fp32"}


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("dv", [64, 112, 128], ids=lambda d: f"D{d}")
def test_taylor_linear_attention(dv, dtype):
    b, t, h, f = 2, 1000, 4, 16
    doc_ids = packed_doc_ids(b, t, DOCS, device="cuda")
    nf = 1 + f + f * f
    raw = [torch.randn(b, t, h, f, device="cuda"), torch.randn(b, t, h, f, device="cuda"),
           torch.randn(b, t, h, dv, device="cuda")]
    (q, k, v), (q64, k64, v64) = leaves(raw, dtype)
    (kv0, ks0), (kv64, ks64) = leaves([0.3 * torch.randn(b, h, nf, dv, device="cuda"),
                                       1 + torch.rand(b, h, nf, device="cuda")], torch.float32)
    o, (kv, ks) = taylor_linear_attention(q, k, v, doc_ids=doc_ids, initial_state=(kv0, ks0),
                                          output_final_state=True)
    check_state_io_against_quadratic((o, (kv, ks)), (q, k, v, kv0, ks0), (q64, k64, v64, kv64, ks64), doc_ids, dtype)


@pytest.mark.parametrize("bwd", ["split", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("dim,window", [(64, 128), (112, 128), (128, 64)], ids=lambda x: str(x))
def test_sliding_window_attention(dim, window, dtype, bwd):
    b, t, h = 2, 1500, 4
    doc_ids = packed_doc_ids(b, t, DOCS, device="cuda")
    (q, k, v), (q64, k64, v64) = leaves([torch.randn(b, t, h, dim, device="cuda") for _ in range(3)], dtype)
    if bwd == "split":
        o = sliding_window_attention(q, k, v, window=window, doc_ids=doc_ids)
    else:
        o = sliding_window_attention_triton(q, k, v, window=window, doc_ids=doc_ids, bwd="fused")
    o_ref = sliding_window_attention_dense(q64, k64, v64, window=window, doc_ids=doc_ids)
    check_output_and_grads(o, o_ref, (q, k, v), (q64, k64, v64), dtype, ["dq", "dk", "dv"])


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=DTYPE_IDS.get)
def test_short_conv_gated(dtype):
    b, t, c = 2, 1000, 2048
    doc_ids = packed_doc_ids(b, t, DOCS, device="cuda")
    (u,), (u64,) = leaves([torch.randn(b, t, 2 * c, device="cuda")], dtype)
    (w,), (w64,) = leaves([torch.randn(c, 3, device="cuda")], torch.float32)
    y = short_conv_gated(*u.chunk(2, -1), w, doc_ids=doc_ids)
    y_ref = short_conv_gated_reference(*u64.chunk(2, -1), w64, doc_ids=doc_ids)
    check_output_and_grads(y, y_ref, (u, w), (u64, w64), dtype, ["du", "dw"])


def test_decode_steps_match_reference():
    b, h, f, dv, window, c = 8, 16, 16, 112, 128, 3584
    nf = 1 + f + f * f
    q, k = torch.randn(b, h, f, device="cuda"), torch.randn(b, h, f, device="cuda")
    v = torch.randn(b, h, dv, device="cuda")
    kv, ks = torch.randn(b, h, nf, dv, device="cuda"), 50 + torch.rand(b, h, nf, device="cuda")
    kv_ref, ks_ref = kv.double(), ks.double()
    o, _, _ = taylor_linear_attention_step(q, k, v, kv, ks)
    o_ref, _, _ = taylor_linear_attention_step(q.double(), k.double(), v.double(), kv_ref, ks_ref,
                                               backend="reference")
    assert_close("la step", o, o_ref, torch.float32)
    assert_close("la state", kv, kv_ref, torch.float32)
    kc, vc = torch.randn(b, window, h, dv, device="cuda"), torch.randn(b, window, h, dv, device="cuda")
    kc_ref, vc_ref = kc.double(), vc.double()
    pos = torch.tensor([0, 1, 5, 127, 128, 129, 1000, 77], device="cuda")
    o = sliding_window_step(q.new_ones(1) * v, v.flip(-1), v.roll(1, -1), kc, vc, pos)
    o_ref = sliding_window_step(v.double(), v.flip(-1).double(), v.roll(1, -1).double(), kc_ref, vc_ref, pos,
                                backend="reference")
    assert_close("swa step", o, o_ref, torch.float32)
    assert_close("swa cache", kc, kc_ref, torch.float32)
    u1, u2, w = torch.randn(b, c, device="cuda"), torch.randn(b, c, device="cuda"), torch.randn(c, 3, device="cuda")
    state = torch.randn(b, c, 3, device="cuda")
    state_ref = state.double()
    y = short_conv_gated_step(u1, u2, w, state)
    y_ref = short_conv_gated_step(u1.double(), u2.double(), w.double(), state_ref, backend="reference")
    assert_close("conv step", y, y_ref, torch.float32)
    assert_close("conv state", state, state_ref, torch.float32)
