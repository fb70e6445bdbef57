"""Fused head + cross-entropy (chunked over tokens) against the plain fp32-logits loss: loss and both gradients."""

import pytest
import torch
from kernel_checks import DEVICE, assert_close

from kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

F32, BF16 = torch.float32, torch.bfloat16
# (tokens N, D, vocab V, chunk): odd token counts, a chunk of one token, chunks that do not divide N, one chunk,
# a vocabulary over several blocks of the row kernels (8192)
CASES = [
    (1, 8, 24, 4),
    (37, 24, 101, 1),
    (37, 24, 101, 5),
    (100, 40, 250, 32),
    (100, 40, 250, 4096),
    (5, 8, 20000, 2),
]


def case_id(case) -> str:
    n, d, v, c = case
    return f"N{n}-D{d}-V{v}-chunk{c}"


def _inputs(n: int, d: int, v: int, dtype: torch.dtype, ignored: int = 0):
    hidden = torch.randn(n, d, device=DEVICE)
    weight = torch.randn(v, d, device=DEVICE) / d**0.5
    labels = torch.randint(0, v, (n,), device=DEVICE)
    labels[torch.randperm(n)[:ignored]] = -100
    low = [t.to(dtype).requires_grad_() for t in (hidden, weight)]
    high = [t.detach().double().requires_grad_() for t in low]
    return low, high, labels


def _loss_and_grads(fn, hidden, weight, labels, **kw):
    loss = fn(hidden, weight, labels, **kw)
    # a scale other than 1 checks that backward multiplies by the incoming gradient
    return (loss, *torch.autograd.grad(loss * 3.0, (hidden, weight)))


@pytest.mark.parametrize("rows_impl", ["triton", "torch"])
@pytest.mark.parametrize("ignored", [0, 3], ids=["all-valid", "ignore-index"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_chunked_matches_float64(case, dtype, ignored, rows_impl):
    n, d, v, chunk = case
    (h, w), (h64, w64), labels = _inputs(n, d, v, dtype, min(ignored, n - 1))
    got = _loss_and_grads(
        linear_cross_entropy, h, w, labels, chunk_size=chunk, backend="chunked", rows_impl=rows_impl
    )
    want = _loss_and_grads(linear_cross_entropy_reference, h64, w64, labels)
    assert got[0].dtype == F32
    for name, g, g_ref, leaf in zip(["loss", "dhidden", "dweight"], got, want, [None, h, w], strict=True):
        if leaf is not None:
            assert g.dtype == leaf.dtype, f"{name}: dtype {g.dtype} != {leaf.dtype}"
        assert_close(name, g.reshape(-1), g_ref.reshape(-1), dtype)


@pytest.mark.parametrize("rows_impl", ["triton", "torch"])
def test_chunked_equals_plain_under_autocast(rows_impl):
    """Under bf16 autocast both run the matmuls in bf16 on fp32 leaves; they agree to bf16 rounding."""
    (h, w), _, labels = _inputs(50, 32, 120, F32, ignored=2)
    with torch.autocast(DEVICE, dtype=BF16):
        got = _loss_and_grads(linear_cross_entropy, h, w, labels, chunk_size=16, rows_impl=rows_impl)
        want = _loss_and_grads(linear_cross_entropy, h, w, labels, backend="reference")
    for name, g, g_ref in zip(["loss", "dhidden", "dweight"], got, want, strict=True):
        assert g.dtype == g_ref.dtype == F32, name
        assert_close(name, g.reshape(-1), g_ref.reshape(-1), BF16, scale=0.2)


def test_all_tokens_ignored_gives_nan_like_the_plain_loss():
    (h, w), _, labels = _inputs(6, 8, 16, F32)
    labels[:] = -100
    assert torch.isnan(linear_cross_entropy(h, w, labels, chunk_size=4))
    assert torch.isnan(linear_cross_entropy_reference(h, w, labels))


def test_no_grad_computes_the_loss_only():
    (h, w), _, labels = _inputs(9, 8, 16, F32)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, labels, chunk_size=4)
    assert not loss.requires_grad
    assert torch.allclose(loss, linear_cross_entropy_reference(h, w, labels), rtol=1e-6)


def test_bad_input_is_a_clear_error():
    (h, w), _, labels = _inputs(9, 8, 16, F32)
    with pytest.raises(ValueError, match=r"hidden \[N, D\] and weight \[V, D\]"):
        linear_cross_entropy(h, w[:, :4], labels)
    with pytest.raises(ValueError, match="labels must be integer"):
        linear_cross_entropy(h, w, labels.float())
    with pytest.raises(ValueError, match="backend="):
        linear_cross_entropy(h, w, labels, backend="fast")
    with pytest.raises(ValueError, match="vocab-parallel"):
        linear_cross_entropy(h, w, labels, backend="reference", process_group=object())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="liger-kernel runs on CUDA")
def test_liger_backend_matches_plain_under_autocast():
    pytest.importorskip("liger_kernel")
    (h, w), _, labels = _inputs(300, 64, 1000, F32, ignored=5)
    with torch.autocast("cuda", dtype=BF16):
        got = _loss_and_grads(linear_cross_entropy, h, w, labels, backend="liger")
        want = _loss_and_grads(linear_cross_entropy, h, w, labels, backend="reference")
    for name, g, g_ref in zip(["loss", "dhidden", "dweight"], got, want, strict=True):
        assert_close(name, g.reshape(-1).float(), g_ref.reshape(-1), BF16, scale=0.2)
