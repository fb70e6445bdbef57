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
