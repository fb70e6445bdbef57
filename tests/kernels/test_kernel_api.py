"""Argument checks and backend errors of the public kernel functions."""

import sys

import pytest
import torch

from kernels.short_conv import short_conv_gated
from kernels.sliding_window import sliding_window_attention
from kernels.taylor_linear_attn import taylor_linear_attention


def _la_inputs():
    return torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 32)


def test_shape_and_dtype_errors_name_the_argument():
    q, k, v = _la_inputs()
    with pytest.raises(ValueError, match="q and k"):
        taylor_linear_attention(q, k[..., :8], v, backend="reference")
    with pytest.raises(ValueError, match="one dtype"):
        taylor_linear_attention(q, k.double(), v, backend="reference")
    with pytest.raises(ValueError, match="doc_ids"):
        taylor_linear_attention(q, k, v, doc_ids=torch.zeros(1, 7, dtype=torch.long), backend="reference")
    with pytest.raises(ValueError, match="initial_state"):
        taylor_linear_attention(q, k, v, initial_state=(torch.zeros(1, 2, 5, 32), torch.zeros(1, 2, 5)),
                                backend="reference")
    with pytest.raises(ValueError, match="backend"):
        taylor_linear_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, k, q, window=-1, backend="reference")
    with pytest.raises(ValueError, match="weight"):
        short_conv_gated(v[0], v[0], torch.zeros(5, 3), backend="reference")


def test_triton_without_gpu_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _la_inputs()
    if torch.cuda.is_available():
        pytest.skip("needs a CPU tensor without the interpreter; this machine has a GPU")
    with pytest.raises(RuntimeError, match="backend='reference'"):
        taylor_linear_attention(q, k, v, backend="triton")
    with pytest.raises(RuntimeError, match="CUDA"):
        sliding_window_attention(q, k, q, window=4, backend="triton")


def test_missing_triton_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    q, k, v = _la_inputs()
    with pytest.raises(RuntimeError, match=r"pip install"):
        taylor_linear_attention(q, k, v, backend="triton")
    with pytest.raises(RuntimeError, match=r"pip install"):
        short_conv_gated(v[0], v[0], torch.zeros(32, 3), backend="triton")


def test_reference_backend_runs_anywhere_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    q, k, v = _la_inputs()
    assert taylor_linear_attention(q, k, v, backend="reference").shape == v.shape
