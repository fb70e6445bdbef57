"""decode_linear (the decode step's Linear layers): the Triton kernel against the float64 reference, the
custom op's opcheck, the table-driven choice of backend "auto", and the errors on bad input; the same for
decode_swiglu (fc1 and the SwiGLU gate in one kernel)."""

import pytest
import torch
from kernel_checks import DEVICE, assert_close, check_output_and_grads, leaves

pytest.importorskip("triton")

from kernels import tiles  # noqa: E402
from kernels.decode_linear import (  # noqa: E402
    SWIGLU_TILES,
    decode_linear,
    decode_linear_reference,
    decode_swiglu,
    decode_swiglu_reference,
    swiglu_applies,
    triton_applies,
    triton_impl,  # noqa: E402
)
from kernels.decode_linear import ops as dl_ops  # noqa: E402

# (rows, K, N, bias): one row (batch 1), odd K and N that no tile divides, the 16-row maximum
CASES = [(1, 96, 40, True), (5, 100, 33, False), (16, 64, 48, True), (3, 37, 17, True)]
TILES = {"block_n": 16, "block_k": 32, "num_stages": 2, "num_warps": 4}


def case_id(case) -> str:
    rows, k, n, bias = case
    return f"M{rows}-K{k}-N{n}" + ("-bias" if bias else "")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_gradients_match_float64(case, dtype):
    rows, k, n, has_bias = case
    torch.manual_seed(rows + k + n)
    tensors = [torch.randn(rows, k, device=DEVICE), torch.randn(n, k, device=DEVICE) / k**0.5]
    if has_bias:
        tensors.append(torch.randn(n, device=DEVICE))
    low, high = leaves(tensors, dtype)
    y = decode_linear(*low, backend="triton", **TILES)
    check_output_and_grads(y, decode_linear_reference(*high), low, high, dtype,
                           ["dx", "dweight", "dbias"][: len(low)])


def test_leading_dims_are_kept_and_every_output_is_written():
    """x [B, 1, K] (a decode step's shape) gives [B, 1, N]; kernel outputs start as NaN in the tests
    (BASED_KERNELS_FILL_NAN), so an unwritten element would fail the comparison."""
    x, w = torch.randn(4, 1, 50, device=DEVICE), torch.randn(70, 50, device=DEVICE)
    y = decode_linear(x, w, backend="triton", **TILES)
    assert y.shape == (4, 1, 70)
    torch.testing.assert_close(y, decode_linear_reference(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("has_bias", [False, True], ids=["no-bias", "bias"])
def test_opcheck(has_bias):
    x = torch.randn(3, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(24, 40, device=DEVICE, requires_grad=True)
    b = torch.randn(24, device=DEVICE, requires_grad=True) if has_bias else None
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
             "test_aot_dispatch_dynamic")
    result = torch.library.opcheck(dl_ops.decode_linear_op, (x, w, b, 16, 32, 2, 4), test_utils=tests)
    assert result == dict.fromkeys(tests, "SUCCESS"), result


def _count_kernel_calls(monkeypatch) -> list:
    calls = []
    real = triton_impl.decode_linear_triton

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_impl, "decode_linear_triton", counting)
    return calls


def test_auto_takes_the_kernel_only_where_the_table_lists_the_shape(monkeypatch):
    """backend "auto": torch's linear without an entry; the kernel with the entry's tiles for half-precision
    inputs up to the entry's max_rows; torch's linear for fp32, for more rows, and for other shapes."""
    calls = _count_kernel_calls(monkeypatch)
    w = torch.randn(48, 64, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(2, 64, device=DEVICE, dtype=torch.bfloat16)
    decode_linear(x, w)
    assert calls == []
    kind = tiles.device_kind(DEVICE)
    entry = {"block_n": 32, "block_k": 64, "num_stages": 2, "num_warps": 4, "max_rows": 4}
    monkeypatch.setitem(tiles.DECODE_LINEAR_TILES, kind, {(64, 48): entry})
    assert triton_applies(x, w, None)
    y = decode_linear(x, w)
    assert len(calls) == 1 and calls[0]["block_n"] == 32 and calls[0]["block_k"] == 64
    torch.testing.assert_close(y.float(), decode_linear_reference(x, w).float(), rtol=2e-2, atol=2e-2)
    decode_linear(torch.randn(5, 64, device=DEVICE, dtype=torch.bfloat16), w)  # 5 rows > max_rows 4
    decode_linear(x.float(), w.float())  # fp32: no entry applies
    decode_linear(torch.randn(2, 48, device=DEVICE, dtype=torch.bfloat16), w.t().contiguous())  # (48, 64)
    assert len(calls) == 1


def test_bad_input_is_named():
    w = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="disagree on K"):
        decode_linear(torch.randn(2, 15, device=DEVICE), w)
    with pytest.raises(ValueError, match=r"bias must be \[N\] = \[8\]"):
        decode_linear(torch.randn(2, 16, device=DEVICE), w, torch.randn(7, device=DEVICE))
    with pytest.raises(ValueError, match="at most 16 rows"):
        decode_linear(torch.randn(17, 16, device=DEVICE), w, backend="triton")
    with pytest.raises(ValueError, match="unknown tile fields"):
        decode_linear(torch.randn(2, 16, device=DEVICE), w, backend="triton", block_m=16)
    with pytest.raises(ValueError, match="backend="):
        decode_linear(torch.randn(2, 16, device=DEVICE), w, backend="cublas")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_swiglu_matches_float64(case, dtype):
    """fc1 [2H, K] and the gate in one kernel against the unfused chain in float64 (H = the case's N; odd K and
    H that no tile divides; x [B, 1, K] keeps its leading dims)."""
    rows, k, hidden, _ = case
    torch.manual_seed(rows + 3 * k + hidden)
    x = torch.randn(rows, 1, k, device=DEVICE).to(dtype)
    w = (torch.randn(2 * hidden, k, device=DEVICE) / k**0.5).to(dtype)
    with torch.no_grad():
        y = decode_swiglu(x, w, **TILES)
    assert y.shape == (rows, 1, hidden) and y.dtype == dtype
    assert_close("y", y, decode_swiglu_reference(x.double(), w.double()), dtype)


def test_swiglu_opcheck_applies_and_errors():
    x, w = torch.randn(3, 40, device=DEVICE), torch.randn(48, 40, device=DEVICE)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic")
    result = torch.library.opcheck(dl_ops.decode_swiglu_op, (x, w, 16, 32, 2, 4), test_utils=tests)
    assert result == dict.fromkeys(tests, "SUCCESS"), result
    half = w.to(torch.bfloat16)
    with torch.no_grad():
        assert swiglu_applies(x.to(torch.bfloat16), half)
        assert not swiglu_applies(x, w)  # fp32: torch's linear and the SwiGLU op
        assert not swiglu_applies(torch.randn(17, 40, device=DEVICE, dtype=torch.bfloat16), half)
        assert not swiglu_applies(x.to(torch.bfloat16), half[:47])
        with pytest.raises(ValueError, match=r"weight \[2H, K\]"):
            decode_swiglu(x, w[:47])
        with pytest.raises(ValueError, match="at most 16 rows"):
            decode_swiglu(torch.randn(17, 40, device=DEVICE), w)
        with pytest.raises(ValueError, match="unknown tile fields"):
            decode_swiglu(x, w, block_m=16)
    with pytest.raises(ValueError, match="no backward"):
        decode_swiglu(x, w.requires_grad_())


def test_swiglu_takes_the_table_tiles_then_its_defaults(monkeypatch):
    """decode_swiglu: the DECODE_SWIGLU_TILES entry of fc1's shape on this device kind, fields it leaves out from
    SWIGLU_TILES, explicit tiles over both; a shape without an entry runs SWIGLU_TILES."""
    calls = []
    real = triton_impl.decode_swiglu_triton
    monkeypatch.setattr(triton_impl, "decode_swiglu_triton", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setitem(tiles.DECODE_SWIGLU_TILES, tiles.device_kind(DEVICE),
                        {(40, 48): {"block_n": 16, "block_k": 32, "num_stages": 2}})
    x, w = torch.randn(3, 40, device=DEVICE), torch.randn(48, 40, device=DEVICE)
    with torch.no_grad():
        decode_swiglu(x, w)
        decode_swiglu(x, w, block_k=64)
        decode_swiglu(x, w[:32])
    table = {"block_n": 16, "block_k": 32, "num_stages": 2, "num_warps": SWIGLU_TILES["num_warps"]}
    assert calls == [table, {**table, "block_k": 64}, SWIGLU_TILES]
