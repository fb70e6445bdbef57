"""A whole tiny Based model with every mixer on the Triton backend equals the reference backend.

Forward logits and every parameter gradient, float32 (the interpreter on CPU, the GPU where there is one).
"""

import dataclasses

import torch

from based_layers import build_model
from based_layers.config import BaseConvConfig, LinearAttnConfig, ModelConfig, SlidingWindowConfig


def _config(backend: str) -> ModelConfig:
    return ModelConfig(d_model=32, n_layer=3, vocab_size=50, pad_vocab_size_multiple=8, default_mixer="base_conv",
                       mixer_layers={"linear_attn": [1], "sliding_window": [2]}, mlp_hidden=48,
                       base_conv=BaseConvConfig(backend=backend),
                       linear_attn=LinearAttnConfig(num_heads=2, feature_dim=8, head_dim=16, backend=backend),
                       sliding_window=SlidingWindowConfig(num_heads=2, window=7, backend=backend))


def test_triton_backends_match_reference_in_a_model():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ref = build_model(_config("reference")).to(device)
    tri = build_model(dataclasses.replace(_config("triton"))).to(device)
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 50, (2, 21), device=device)
    doc_ids = torch.tensor([[0] * 8 + [1] * 13, [0] * 21], device=device)
    outs = []
    for model in (ref, tri):
        logits = model(ids, doc_ids=doc_ids)
        logits.square().mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=2e-4, atol=2e-5)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=2e-3, atol=2e-6, msg=name)


def test_triton_backend_is_what_runs(monkeypatch):
    import kernels.short_conv.ops as conv_impl
    import kernels.sliding_window.ops as swa_impl
    import kernels.taylor_linear_attn.ops as la_impl

    calls = []
    for module, name in ((la_impl, "taylor_linear_attention_triton"), (swa_impl, "sliding_window_attention_triton"),
                         (conv_impl, "short_conv_gated_triton")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    model = build_model(_config("triton"))
    model(torch.randint(0, 50, (1, 9)))
    assert sorted(set(calls)) == ["short_conv_gated_triton", "sliding_window_attention_triton",
                                  "taylor_linear_attention_triton"]
