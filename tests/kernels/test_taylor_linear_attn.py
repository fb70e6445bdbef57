"""Taylor linear attention: Triton kernels and the chunked reference against the float64 T x T oracle."""

import pytest
import torch
from kernel_checks import (
    DEVICE,
    assert_close,
    check_output_and_grads,
    check_state_io_against_quadratic,
    grads,
    leaves,
    packed_doc_ids,
)

from kernels.taylor_linear_attn import (
    taylor_linear_attention,
    taylor_linear_attention_quadratic,
    taylor_linear_attention_reference,
    taylor_linear_attention_step,
)

SHAPES = [(1, 1, 1, 16, 16), (2, 17, 2, 16, 24), (2, 63, 3, 16, 40), (1, 100, 2, 8, 16), (1, 77, 1, 16, 72)]
DTYPES = [torch.float32, torch.bfloat16]
DOCS = {"one-doc": None, "packed": [5, 1, 30]}


def shape_id(shape) -> str:
    b, t, h, f, dv = shape
    return f"B{b}-T{t}-H{h}-F{f}-D{dv}"


def make_inputs(b, t, h, f, dv, with_state=False):
    q, k = torch.randn(b, t, h, f, device=DEVICE), torch.randn(b, t, h, f, device=DEVICE)
    v = torch.randn(b, t, h, dv, device=DEVICE)
    if not with_state:
        return q, k, v
    nf = 1 + f + f * f
    kv0 = 0.3 * torch.randn(b, h, nf, dv, device=DEVICE)
    k_sum0 = 1.0 + torch.rand(b, h, nf, device=DEVICE)
    return q, k, v, kv0, k_sum0


@pytest.mark.parametrize("docs", list(DOCS), ids=list(DOCS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_and_gradients_match_float64(shape, dtype, docs):
    b, t, h, f, dv = shape
    doc_ids = packed_doc_ids(b, t, DOCS[docs])
    (q, k, v), (q64, k64, v64) = leaves(make_inputs(*shape), dtype)
    o = taylor_linear_attention(q, k, v, doc_ids=doc_ids, backend="triton")
    o_ref = taylor_linear_attention_quadratic(q64, k64, v64, doc_ids=doc_ids)
    check_output_and_grads(o, o_ref, (q, k, v), (q64, k64, v64), dtype, ["dq", "dk", "dv"])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES[2:], ids=shape_id)
def test_many_chunks_forward_and_gradients(shape, dtype):
    """16-token chunks: the state passes carry S and dS across several chunks and document starts."""
    from kernels.taylor_linear_attn.triton_impl import taylor_linear_attention_triton

    b, t, h, f, dv = shape
    doc_ids = packed_doc_ids(b, t, [5, 1, 30])
    (q, k, v), (q64, k64, v64) = leaves(make_inputs(*shape), dtype)
    o = taylor_linear_attention_triton(q, k, v, doc_ids=doc_ids, chunk_size=16, block_v_bwd=16)
    o_ref = taylor_linear_attention_quadratic(q64, k64, v64, doc_ids=doc_ids)
    check_output_and_grads(o, o_ref, (q, k, v), (q64, k64, v64), dtype, ["dq", "dk", "dv"])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("blocks", [dict(chunk_size=16, block_v=16, block_v_state=16, block_f=16),
                                    dict(chunk_size=32, block_v=32, block_v_state=16)], ids=["c16", "c32"])
def test_state_in_and_out_with_small_blocks(dtype, blocks):
    """Small chunks and blocks (several chunks, value and feature blocks): initial state, final state and
    their gradients, with document boundaries inside and across chunks."""
    from kernels.taylor_linear_attn.triton_impl import taylor_linear_attention_triton

    b, t, h, f, dv = 2, 83, 2, 16, 24
    doc_ids = packed_doc_ids(b, t, [40, 3, 9])
    q, k, v, kv0, ks0 = make_inputs(b, t, h, f, dv, with_state=True)
    (q, k, v), (q64, k64, v64) = leaves((q, k, v), dtype)
    (kv0, ks0), (kv64, ks64) = leaves((kv0, ks0), torch.float32)
    o, (kv, ks) = taylor_linear_attention_triton(q, k, v, doc_ids=doc_ids, initial_state=(kv0, ks0),
                                                 output_final_state=True, **blocks)
    assert kv.dtype == ks.dtype == torch.float32
    check_state_io_against_quadratic((o, (kv, ks)), (q, k, v, kv0, ks0), (q64, k64, v64, kv64, ks64), doc_ids, dtype)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_packed_documents_equal_separate_runs(backend):
    lengths = [7, 30, 20]
    t = sum(lengths)
    q, k, v = make_inputs(1, t, 2, 16, 24)
    doc_ids = packed_doc_ids(1, t, lengths)
    packed = taylor_linear_attention(q, k, v, doc_ids=doc_ids, backend=backend)
    start = 0
    for length in lengths:
        sl = slice(start, start + length)
        alone = taylor_linear_attention(q[:, sl], k[:, sl], v[:, sl], backend=backend)
        assert_close(f"doc at {start}", packed[:, sl], alone, torch.float32)
        start += length


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_prefill_then_continue_equals_one_pass(backend):
    """Final state of the first part, fed as initial state to the second part, reproduces the full run."""
    q, k, v = make_inputs(2, 70, 2, 16, 24)
    full = taylor_linear_attention(q, k, v, backend=backend)
    first, state = taylor_linear_attention(q[:, :45], k[:, :45], v[:, :45], output_final_state=True, backend=backend)
    second = taylor_linear_attention(q[:, 45:], k[:, 45:], v[:, 45:], initial_state=state, backend=backend)
    assert_close("continued", torch.cat([first, second], 1), full, torch.float32)


def test_chunked_reference_matches_quadratic_with_gradients():
    b, t, h, f, dv = 2, 50, 2, 8, 12
    doc_ids = packed_doc_ids(b, t, [11, 20])
    q, k, v, kv0, ks0 = (x.double().requires_grad_() for x in make_inputs(b, t, h, f, dv, with_state=True))
    out = taylor_linear_attention_reference(q, k, v, doc_ids=doc_ids, initial_state=(kv0, ks0),
                                            output_final_state=True, chunk_size=16)
    ref = taylor_linear_attention_quadratic(q, k, v, doc_ids=doc_ids, initial_state=(kv0, ks0),
                                            output_final_state=True)
    flat, flat_ref = [out[0], *out[1]], [ref[0], *ref[1]]
    for a, e in zip(flat, flat_ref, strict=True):
        assert_close("reference", a, e, torch.float32, scale=1e-3)
    cot = [torch.randn_like(x) for x in flat_ref]
    for g, g_ref in zip(grads(flat, [q, k, v, kv0, ks0], cot), grads(flat_ref, [q, k, v, kv0, ks0], cot), strict=True):
        assert_close("reference grad", g, g_ref, torch.float32, scale=1e-3)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dv", [24, 72], ids=lambda d: f"D{d}")
def test_decode_steps_continue_a_prefill(backend, dv):
    """Prefill with output_final_state, then one step per token: equals the parallel form on the whole."""
    b, t, h, f = 2, 30, 3, 16
    q, k, v = make_inputs(b, t, h, f, dv)
    full = taylor_linear_attention_quadratic(q.double(), k.double(), v.double())
    _, (kv, ks) = taylor_linear_attention(q[:, :20], k[:, :20], v[:, :20], output_final_state=True, backend=backend)
    kv, ks = kv.detach().contiguous(), ks.detach().contiguous()
    for i in range(20, t):
        o, kv2, ks2 = taylor_linear_attention_step(q[:, i], k[:, i], v[:, i], kv, ks, backend=backend)
        assert kv2 is kv and ks2 is ks, "the step updates the state in place"
        assert_close(f"step {i}", o, full[:, i], torch.float32)
