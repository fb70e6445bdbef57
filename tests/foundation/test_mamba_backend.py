"""backend=mamba_ssm without mamba-ssm says what to install; on the CPU the reference scan serves the
settings mamba-ssm lacks (document resets, a given state). The GPU comparison: test_mamba_ssm_gpu.py."""

import importlib.util
import sys

import pytest
import torch

from based_layers.config import MambaConfig
from based_layers.mixers.mamba import Mamba


def _mixers():
    torch.manual_seed(0)
    cfg = MambaConfig(d_state=4, d_conv=4, expand=2)
    ref = Mamba(16, cfg)
    fused = Mamba(16, MambaConfig(d_state=4, d_conv=4, expand=2, backend="mamba_ssm"))
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def test_missing_mamba_ssm_names_the_install(monkeypatch):
    if importlib.util.find_spec("mamba_ssm") is not None:
        monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    _, fused = _mixers()
    x = torch.randn(1, 6, 16)
    with pytest.raises(RuntimeError, match="pip install mamba-ssm"):
        fused(x)
    with pytest.raises(RuntimeError, match="pip install mamba-ssm"):
        fused(x, return_state=True)


def test_cpu_document_resets_run_the_reference_scan():
    ref, fused = _mixers()
    x = torch.randn(2, 9, 16)
    doc_ids = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    torch.testing.assert_close(fused(x, doc_ids=doc_ids), ref(x, doc_ids=doc_ids))


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_in_proj_for_mamba_inner_fn_is_channels_first_without_a_copy(bias):
    """The in_proj output handed to mamba_inner_fn: in_proj(x) as [B, 2 d_inner, L] with L contiguous (the
    layout mamba_inner_fn reads as is), the same values and gradients as in_proj(x).transpose(1, 2)."""
    from based_layers.mixers.mamba import _in_proj_channels_first

    torch.manual_seed(0)
    proj = torch.nn.Linear(12, 40, bias=bias).double()
    x = torch.randn(3, 7, 12, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 40, 7, dtype=torch.float64)
    outs = []
    for fn in (lambda: proj(x).transpose(1, 2), lambda: _in_proj_channels_first(proj, x)):
        y = fn()
        grads = torch.autograd.grad((y * dy).sum(), [x, *proj.parameters()])
        outs.append((y, grads))
    (ref, ref_grads), (got, got_grads) = outs
    assert got.shape == (3, 40, 7) and got.stride() == (7, 21, 1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
