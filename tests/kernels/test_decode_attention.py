"""Split-K decode attention (kernels.decode_attention) against the float64 reference: padded head dims, masked
slots (left padding), a limit below the capacity, one and many splits; and the argument checks."""

import pytest
import torch
from kernel_checks import DEVICE, assert_close

from kernels.decode_attention import decode_attention, decode_attention_reference
from kernels.decode_attention.triton_impl import BLOCK_N

# (B, C, H, D, Dc, limit): Dc > D is the static cache's padded head dim (70 -> 72); limits not multiples of 64
CASES = [(1, 64, 1, 16, 16, 1), (2, 200, 3, 70, 72, 137), (3, 300, 2, 8, 8, 300), (1, 1000, 2, 48, 48, 999)]
DTYPES = [torch.float32, torch.bfloat16]


def case_id(case) -> str:
    return "B{}-C{}-H{}-D{}-Dc{}-L{}".format(*case)


def make_inputs(b, c, h, d, dc, dtype, limit, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(b, h, d, device=DEVICE, generator=g).to(dtype)
    k, v = (torch.randn(b, c, h, dc, device=DEVICE, generator=g).to(dtype) for _ in range(2))
    valid = torch.rand(b, c, device=DEVICE, generator=g) > 0.3
    valid[0, : limit // 3] = False  # a left-padded row
    valid[:, limit - 1] = True  # the decode step's own token, just written
    return q, k, v, valid


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_float64_reference(case, dtype):
    b, c, h, d, dc, limit = case
    q, k, v, valid = make_inputs(b, c, h, d, dc, dtype, limit)
    expected = decode_attention_reference(q.double(), k.double(), v.double(), valid, limit, d**-0.5)
    out = decode_attention(q, k, v, valid, limit, d**-0.5, backend="triton")
    assert out.dtype == dtype
    assert_close("o", out, expected, dtype)


def test_many_splits_equal_one(monkeypatch):
    """The partial softmaxes combine to the same result whatever the number of splits (1 vs one per block)."""
    from kernels.decode_attention import triton_impl

    limit = 5 * BLOCK_N + 3
    q, k, v, valid = make_inputs(1, limit, 1, 16, 16, torch.float32, limit)
    monkeypatch.setattr(triton_impl, "PROGRAMS_PER_SM", 10_000)  # as many splits as blocks
    many = decode_attention(q, k, v, valid, limit, 0.25)
    monkeypatch.setattr(triton_impl, "PROGRAMS_PER_SM", 0)  # max(1, ...): one split
    one = decode_attention(q, k, v, valid, limit, 0.25)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)


def test_argument_errors():
    q, k, v, valid = make_inputs(2, 64, 2, 16, 16, torch.float32, 64)
    with pytest.raises(ValueError, match="limit"):
        decode_attention(q, k, v, valid, 65, 1.0)
    with pytest.raises(ValueError, match="caches must be"):
        decode_attention(q, k[:, :, :1], v[:, :, :1], valid, 8, 1.0)
    with pytest.raises(ValueError, match="backend"):
        decode_attention(q, k, v, valid, 8, 1.0, backend="cuda")
