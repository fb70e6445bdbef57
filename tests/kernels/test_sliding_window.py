"""Sliding-window attention: Triton kernels and the banded reference against the float64 dense oracle."""

import pytest
import torch
from kernel_checks import DEVICE, assert_close, check_output_and_grads, grads, leaves, packed_doc_ids

from kernels.sliding_window import (
    sliding_window_attention,
    sliding_window_attention_dense,
    sliding_window_attention_reference,
    sliding_window_step,
)

# (B, T, H, D, window); D 48 and 112 are not powers of two
CASES = [(1, 1, 1, 16, 4), (2, 17, 2, 32, 4), (2, 63, 3, 48, 8), (1, 100, 2, 112, 16), (1, 130, 1, 64, 64),
         (2, 70, 2, 16, 0)]
DTYPES = [torch.float32, torch.bfloat16]
DOCS = {"one-doc": None, "packed": [5, 1, 30]}
BWD_MODES = ["split", "fused"]


def case_id(case) -> str:
    b, t, h, d, w = case
    return f"B{b}-T{t}-H{h}-D{d}-W{w}"


def make_inputs(b, t, h, d):
    return [torch.randn(b, t, h, d, device=DEVICE) for _ in range(3)]


def attend_triton(q, k, v, window, doc_ids, bwd):
    """Triton attention with backward mode `bwd`: the default ("split") through the public function, the
    other through the Triton entry (the public function takes no tuning options)."""
    if bwd == "split":
        return sliding_window_attention(q, k, v, window=window, doc_ids=doc_ids, backend="triton")
    from kernels.sliding_window.triton_impl import sliding_window_attention_triton

    return sliding_window_attention_triton(q, k, v, window=window, doc_ids=doc_ids, bwd=bwd)


@pytest.mark.parametrize("bwd", BWD_MODES)
@pytest.mark.parametrize("docs", list(DOCS), ids=list(DOCS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_gradients_match_float64(case, dtype, docs, bwd):
    b, t, h, d, window = case
    doc_ids = packed_doc_ids(b, t, DOCS[docs])
    (q, k, v), (q64, k64, v64) = leaves(make_inputs(b, t, h, d), dtype)
    o = attend_triton(q, k, v, window, doc_ids, bwd)
    o_ref = sliding_window_attention_dense(q64, k64, v64, window=window, doc_ids=doc_ids)
    check_output_and_grads(o, o_ref, (q, k, v), (q64, k64, v64), dtype, ["dq", "dk", "dv"])


# forward query/key tiles, then optional backward ones (the backward uses the forward's when absent)
BLOCKS = [(16, 16), (32, 16), (16, 64), (64, 32, 16, 64)]


def blocks_id(blocks) -> str:
    fwd = f"BM{blocks[0]}-BN{blocks[1]}"
    return fwd if len(blocks) == 2 else f"{fwd}-bwdBM{blocks[2]}-bwdBN{blocks[3]}"


@pytest.mark.parametrize("bwd", BWD_MODES)
@pytest.mark.parametrize("blocks", BLOCKS, ids=blocks_id)
def test_block_shapes(blocks, bwd):
    """Other query/key block sizes visit the right key blocks (window not a multiple of the blocks)."""
    from kernels.sliding_window.triton_impl import sliding_window_attention_triton

    b, t, h, d, window = 1, 90, 2, 32, 21
    doc_ids = packed_doc_ids(b, t, [40, 13])
    (q, k, v), (q64, k64, v64) = leaves(make_inputs(b, t, h, d), torch.float32)
    bwd_blocks = dict(zip(["bwd_block_m", "bwd_block_n"], blocks[2:], strict=False))
    o = sliding_window_attention_triton(q, k, v, window=window, doc_ids=doc_ids, block_m=blocks[0],
                                        block_n=blocks[1], bwd=bwd, **bwd_blocks)
    o_ref = sliding_window_attention_dense(q64, k64, v64, window=window, doc_ids=doc_ids)
    check_output_and_grads(o, o_ref, (q, k, v), (q64, k64, v64), torch.float32, ["dq", "dk", "dv"])


@pytest.mark.parametrize("bwd", BWD_MODES)
def test_dq_kernel_tiles_of_its_own(bwd):
    """The dQ kernel with tiles of the transposed shape (16 x 32) beside the dK/dV kernel's (32 x 16), and the
    backward's own pipeline stages, across document starts and a sequence end inside a tile."""
    from kernels.sliding_window.triton_impl import sliding_window_attention_triton

    b, t, h, d, window = 2, 150, 2, 32, 70
    doc_ids = packed_doc_ids(b, t, [90, 7, 40])
    (q, k, v), (q64, k64, v64) = leaves(make_inputs(b, t, h, d), torch.float32)
    o = sliding_window_attention_triton(q, k, v, window=window, doc_ids=doc_ids, block_m=16, block_n=32, bwd=bwd,
                                        bwd_block_m=32, bwd_block_n=16, dq_block_m=16, dq_block_n=32, bwd_stages=3)
    o_ref = sliding_window_attention_dense(q64, k64, v64, window=window, doc_ids=doc_ids)
    check_output_and_grads(o, o_ref, (q, k, v), (q64, k64, v64), torch.float32, ["dq", "dk", "dv"])


def test_document_starts_the_kernels_mask_with():
    """Each token's document start, from doc ids (position 0 and every change of id start one)."""
    from kernels.sliding_window.ops import doc_start_positions

    ids = torch.tensor([[5, 5, 5, 7, 7, 9], [0, 1, 1, 1, 1, 1]])
    assert doc_start_positions(ids, 2, 6, ids.device).tolist() == [[0, 0, 0, 3, 3, 5], [0, 1, 1, 1, 1, 1]]
    none = doc_start_positions(None, 2, 3, ids.device)
    assert none.dtype == torch.int32 and none.tolist() == [[0, 0, 0], [0, 0, 0]]


def test_unknown_backward_mode_names_the_choices():
    from kernels.sliding_window.triton_impl import sliding_window_attention_triton

    q, k, v = make_inputs(1, 8, 1, 16)
    with pytest.raises(ValueError, match=r"bwd='atomic'; expected one of \('split', 'fused'\)"):
        sliding_window_attention_triton(q, k, v, window=4, bwd="atomic")


@pytest.mark.parametrize("window", [0, 3, 40])
def test_banded_reference_matches_dense(window):
    b, t, h, d = 2, 57, 2, 8
    doc_ids = packed_doc_ids(b, t, [20, 2])
    q, k, v = (x.double().requires_grad_() for x in make_inputs(b, t, h, d))
    o = sliding_window_attention_reference(q, k, v, window=window, doc_ids=doc_ids, scale=0.3)
    o_ref = sliding_window_attention_dense(q, k, v, window=window, doc_ids=doc_ids, scale=0.3)
    assert_close("o", o, o_ref, torch.float32, scale=1e-3)
    do = torch.randn_like(o_ref)
    for g, g_ref in zip(grads([o], [q, k, v], [do]), grads([o_ref], [q, k, v], [do]), strict=True):
        assert_close("grad", g, g_ref, torch.float32, scale=1e-3)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_packed_documents_equal_separate_runs(backend):
    lengths = [7, 30, 20]
    t = sum(lengths)
    q, k, v = make_inputs(1, t, 2, 32)
    packed = sliding_window_attention(q, k, v, window=9, doc_ids=packed_doc_ids(1, t, lengths), backend=backend)
    start = 0
    for length in lengths:
        sl = slice(start, start + length)
        alone = sliding_window_attention(q[:, sl], k[:, sl], v[:, sl], window=9, backend=backend)
        assert_close(f"doc at {start}", packed[:, sl], alone, torch.float32)
        start += length


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dim", [32, 48], ids=lambda d: f"D{d}")
def test_decode_steps_match_parallel(backend, dim):
    """Ring buffer of W past tokens (slot = pos % W), a document restart in row 1, stale cache contents."""
    b, t, h, window = 2, 26, 2, 6
    q, k, v = make_inputs(b, t, h, dim)
    doc_ids = torch.zeros(b, t, dtype=torch.int32, device=DEVICE)
    doc_ids[1, 11:] = 1
    full = sliding_window_attention_dense(q.double(), k.double(), v.double(), window=window, doc_ids=doc_ids)
    k_cache = torch.randn(b, window, h, dim, device=DEVICE)
    v_cache = torch.randn(b, window, h, dim, device=DEVICE)
    for i in range(t):
        pos = torch.tensor([i, i if i < 11 else i - 11], device=DEVICE)
        o = sliding_window_step(q[:, i], k[:, i], v[:, i], k_cache, v_cache, pos, backend=backend)
        assert_close(f"step {i}", o, full[:, i], torch.float32)
