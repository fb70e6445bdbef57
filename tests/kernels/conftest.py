"""Kernel tests: Triton's CPU interpreter when there is no GPU, and NaN-filled kernel outputs."""

import importlib
import sys

import pytest
import torch

import kernels._common

# kernels._pdl first: the kernel modules import its jit helpers by name, so a reload must find them interpreted
TRITON_MODULES = ("kernels._pdl", "kernels.taylor_linear_attn.triton_impl", "kernels.taylor_linear_attn.fused_impl",
                  "kernels.sliding_window.triton_impl", "kernels.short_conv.triton_impl",
                  "kernels.fused_norm.triton_impl", "kernels.linear_cross_entropy.triton_impl",
                  "kernels.swiglu.triton_impl", "kernels.decode_linear.triton_impl",
                  "kernels.decode_attention.triton_impl")


def _decorate_for_interpreter() -> None:
    """(Re)import the Triton modules so that their @triton.jit functions are interpreted ones.

    triton.jit picks the interpreter when the decorator runs, so a module imported earlier in this
    process without TRITON_INTERPRET=1 must be reloaded.
    """
    from triton.runtime.interpreter import InterpretedFunction

    names = ("_fwd_kernel", "_fused_fwd_kernel", "_rms_norm_fwd_kernel", "_ce_stats_kernel", "_swiglu_fwd_kernel",
             "release", "_decode_linear_kernel", "_split_kernel")
    reloaded = False
    for name in TRITON_MODULES:
        module = sys.modules.get(name) or importlib.import_module(name)
        kernel = next(getattr(module, k) for k in names if hasattr(module, k))
        # after one reload, every later module too: it may hold the reloaded module's old jit helpers
        if reloaded or not isinstance(kernel, InterpretedFunction):
            importlib.reload(module)
            reloaded = True


@pytest.fixture(autouse=True)
def kernel_test_env(monkeypatch):
    """Every kernel output starts as NaN (unwritten elements fail); no GPU -> TRITON_INTERPRET=1."""
    monkeypatch.setattr(kernels._common, "FILL_OUTPUTS_WITH_NAN", True)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        _decorate_for_interpreter()
    torch.manual_seed(0)
    yield
