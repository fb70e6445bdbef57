"""Gated short convolution: Triton kernels against the float64 reference."""

import pytest
import torch
from kernel_checks import DEVICE, assert_close, check_output_and_grads, leaves, packed_doc_ids

from kernels.short_conv import short_conv_gated, short_conv_gated_reference, short_conv_gated_step

# (B, T, C, K)
CASES = [(1, 1, 8, 3), (2, 17, 40, 3), (2, 63, 130, 3), (1, 50, 24, 4)]
DTYPES = [torch.float32, torch.bfloat16]
DOCS = {"one-doc": None, "packed": [5, 1, 30]}


def case_id(case) -> str:
    b, t, c, k = case
    return f"B{b}-T{t}-C{c}-K{k}"


@pytest.mark.parametrize("initial", [False, True], ids=["no-init", "init"])
@pytest.mark.parametrize("docs", list(DOCS), ids=list(DOCS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_gradients_match_float64(case, dtype, docs, initial):
    b, t, c, ks = case
    doc_ids = packed_doc_ids(b, t, DOCS[docs])
    # u1, u2 are the two halves of one projection output: strided views, read in place
    (u,), (u64,) = leaves([torch.randn(b, t, 2 * c, device=DEVICE)], dtype)
    (w,), (w64,) = leaves([torch.randn(c, ks, device=DEVICE)], torch.float32)
    init = torch.randn(b, c, ks - 1, device=DEVICE) if initial else None
    y = short_conv_gated(*u.chunk(2, -1), w, doc_ids=doc_ids, initial_state=init, backend="triton")
    y_ref = short_conv_gated_reference(*u64.chunk(2, -1), w64, doc_ids=doc_ids,
                                       initial_state=None if init is None else init.double())
    check_output_and_grads(y, y_ref, (u, w), (u64, w64), dtype, ["du", "dw"])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_decode_steps_match_parallel(backend):
    b, t, c, ks = 2, 12, 40, 3
    u1, u2 = torch.randn(b, t, c, device=DEVICE), torch.randn(b, t, c, device=DEVICE)
    w = torch.randn(c, ks, device=DEVICE)
    full = short_conv_gated_reference(u1.double(), u2.double(), w.double())
    state = torch.zeros(b, c, ks, device=DEVICE)
    for i in range(t):
        y = short_conv_gated_step(u1[:, i], u2[:, i], w, state, backend=backend)
        assert_close(f"step {i}", y, full[:, i], torch.float32)
    assert torch.equal(state, u1[:, -ks:].transpose(1, 2))


@pytest.mark.parametrize("channels_first", [False, True], ids=["rows-first", "channels-first"])
@pytest.mark.parametrize("tile", [(64, 64, 8), (16, 32, 4)], ids=["BT64-BC64", "BT16-BC32"])
def test_kernel_size_3_backward_tiles_and_grid_orders(tile, channels_first, monkeypatch):
    """The kernel-size-3 backward at other tiles and with the channel-first grid (bench/kernels.py sweeps them):
    the same gradients as the float64 reference, packed documents and tile-crossing lengths included."""
    from kernels.short_conv import triton_impl

    monkeypatch.setattr(triton_impl, "K3_MODE", "tile")
    for name, value in zip(("K3_BLOCK_T", "K3_BLOCK_C", "K3_WARPS"), tile, strict=True):
        monkeypatch.setattr(triton_impl, name, value)
    monkeypatch.setattr(triton_impl, "K3_CHANNELS_FIRST", channels_first)
    b, t, c = 2, 37, 70
    doc_ids = packed_doc_ids(b, t, [5, 1, 30])
    (u,), (u64,) = leaves([torch.randn(b, t, 2 * c, device=DEVICE)], torch.float32)
    (w,), (w64,) = leaves([torch.randn(c, 3, device=DEVICE)], torch.float32)
    y = short_conv_gated(*u.chunk(2, -1), w, doc_ids=doc_ids, backend="triton")
    y_ref = short_conv_gated_reference(*u64.chunk(2, -1), w64, doc_ids=doc_ids)
    check_output_and_grads(y, y_ref, (u, w), (u64, w64), torch.float32, ["du", "dw"])


@pytest.mark.parametrize("docs", list(DOCS), ids=list(DOCS))
@pytest.mark.parametrize("rows, block_c", [(8, 32), (64, 512)], ids=["R8-BC32", "R64-BC512"])
def test_kernel_size_3_backward_row_walk(rows, block_c, docs, monkeypatch):
    """K3_MODE "rows" (the row-walking backward, the default; bench/kernels.py sweeps its blocks): the float64
    reference's gradients at row blocks that do and do not divide T, with and without packed documents."""
    from kernels.short_conv import triton_impl

    monkeypatch.setattr(triton_impl, "K3_MODE", "rows")
    monkeypatch.setattr(triton_impl, "K3_ROWS", rows)
    monkeypatch.setattr(triton_impl, "K3_ROWS_BLOCK_C", block_c)
    for dtype in DTYPES:
        b, t, c = 2, 37, 70
        doc_ids = packed_doc_ids(b, t, DOCS[docs])
        (u,), (u64,) = leaves([torch.randn(b, t, 2 * c, device=DEVICE)], dtype)
        (w,), (w64,) = leaves([torch.randn(c, 3, device=DEVICE)], torch.float32)
        y = short_conv_gated(*u.chunk(2, -1), w, doc_ids=doc_ids, backend="triton")
        y_ref = short_conv_gated_reference(*u64.chunk(2, -1), w64, doc_ids=doc_ids)
        check_output_and_grads(y, y_ref, (u, w), (u64, w64), dtype, ["du", "dw"])
