"""Every mixer and whole tiny models: parallel form == recurrent step form, causality, packed documents.

All in float64 with random inputs and lengths that are not powers of two.
"""

import pytest
import torch

from based_layers import build_model
from based_layers.config import (
    AttentionConfig,
    BaseConvConfig,
    LinearAttnConfig,
    MambaConfig,
    ModelConfig,
    SlidingWindowConfig,
)
from based_layers.mixers import MIXER_CLASSES

D = 24
MIXER_CFGS = {
    "base_conv": BaseConvConfig(expand=4, kernel_size=3),
    "linear_attn": LinearAttnConfig(num_heads=3, feature_dim=4, head_dim=8),
    "sliding_window": SlidingWindowConfig(num_heads=3, window=5),
    "attention": AttentionConfig(num_heads=3, rotary_fraction=0.5),
    "mamba": MambaConfig(d_state=4, d_conv=4, expand=2, dt_rank=3),
}
TOL = dict(rtol=1e-9, atol=1e-10)


def _mixer(name):
    torch.manual_seed(0)
    mixer = MIXER_CLASSES[name](D, MIXER_CFGS[name]).double()
    with torch.no_grad():  # non-trivial biases and weights everywhere
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


def _run_steps(mixer, x, resets=None):
    batch, seqlen, _ = x.shape
    state = mixer.init_state(batch, x.device, x.dtype)
    outs = []
    for t in range(seqlen):
        reset = None if resets is None else resets[:, t]
        y, state = mixer.step(x[:, t], state, reset)
        outs.append(y)
    return torch.stack(outs, dim=1), state


@pytest.mark.parametrize("name", sorted(MIXER_CFGS))
def test_parallel_equals_recurrent(name):
    mixer = _mixer(name)
    x = torch.randn(2, 37, D, dtype=torch.float64)
    y_par = mixer(x)
    y_rec, _ = _run_steps(mixer, x)
    torch.testing.assert_close(y_par, y_rec, **TOL)


@pytest.mark.parametrize("name", sorted(MIXER_CFGS))
def test_prefill_state_continues_like_steps(name):
    mixer = _mixer(name)
    x = torch.randn(2, 29, D, dtype=torch.float64)
    y_full = mixer(x)
    _, state = mixer(x[:, :19], return_state=True)
    outs = []
    for t in range(19, 29):
        y, state = mixer.step(x[:, t], state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), y_full[:, 19:], **TOL)


@pytest.mark.parametrize("name", sorted(MIXER_CFGS))
def test_causal(name):
    mixer = _mixer(name)
    x = torch.randn(2, 23, D, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 11] += 1.0
    y, y2 = mixer(x), mixer(x2)
    torch.testing.assert_close(y[:, :11], y2[:, :11], rtol=0, atol=0)
    assert (y[:, 11] - y2[:, 11]).abs().max() > 1e-6


@pytest.mark.parametrize("name", sorted(MIXER_CFGS))
def test_packed_documents_equal_separate(name):
    mixer = _mixer(name)
    lengths = [13, 1, 17]
    x = torch.randn(2, sum(lengths), D, dtype=torch.float64)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).expand(2, -1)
    y_packed = mixer(x, doc_ids=doc_ids)
    start = 0
    for n in lengths:
        torch.testing.assert_close(y_packed[:, start:start + n], mixer(x[:, start:start + n]), **TOL)
        start += n
    resets = torch.zeros_like(doc_ids, dtype=torch.bool)
    resets[:, [13, 14]] = True
    y_steps, _ = _run_steps(mixer, x, resets)
    torch.testing.assert_close(y_packed, y_steps, **TOL)


@pytest.mark.parametrize("name", sorted(MIXER_CFGS))
def test_packed_prefill_state_is_last_document(name):
    mixer = _mixer(name)
    x = torch.randn(1, 30, D, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 12 + [1] * 18])
    _, state_packed = mixer(x, doc_ids=doc_ids, return_state=True)
    _, state_alone = mixer(x[:, 12:], return_state=True)
    nxt = torch.randn(1, D, dtype=torch.float64)
    torch.testing.assert_close(mixer.step(nxt, state_packed)[0], mixer.step(nxt, state_alone)[0], **TOL)


def _tiny_model(mixers: dict[str, list[int]], default: str, mlp: int = 32) -> ModelConfig:
    return ModelConfig(d_model=D, n_layer=5, vocab_size=61, pad_vocab_size_multiple=8, default_mixer=default,
                       mixer_layers=mixers, mlp_hidden=mlp, base_conv=MIXER_CFGS["base_conv"],
                       linear_attn=MIXER_CFGS["linear_attn"], sliding_window=MIXER_CFGS["sliding_window"],
                       attention=MIXER_CFGS["attention"], mamba=MIXER_CFGS["mamba"])


MODELS = {
    "based": _tiny_model({"linear_attn": [1], "sliding_window": [2]}, "base_conv"),
    "attn": _tiny_model({}, "attention"),
    "mamba": _tiny_model({}, "mamba", mlp=0),
}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_model_parallel_equals_recurrent_and_packed(family):
    torch.manual_seed(0)
    model = build_model(MODELS[family]).double()
    ids = torch.randint(0, 61, (2, 27))
    logits = model(ids)
    assert logits.shape == (2, 27, 64)
    state = model.init_state(2, "cpu", torch.float64)
    steps = []
    for t in range(27):
        out, state = model.step(ids[:, t], state)
        steps.append(out)
    torch.testing.assert_close(torch.stack(steps, 1), logits, **TOL)
    doc_ids = torch.tensor([[0] * 10 + [1] * 17] * 2)
    packed = model(ids, doc_ids=doc_ids)
    torch.testing.assert_close(packed[:, 10:], model(ids[:, 10:]), **TOL)
    prefill_logits, _ = model.prefill(ids)
    torch.testing.assert_close(prefill_logits, logits, **TOL)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_model_causal(family):
    torch.manual_seed(0)
    model = build_model(MODELS[family]).double()
    ids = torch.randint(0, 61, (1, 19))
    ids2 = ids.clone()
    ids2[0, 9] = (ids[0, 9] + 1) % 61
    torch.testing.assert_close(model(ids)[:, :9], model(ids2)[:, :9], rtol=0, atol=0)


def test_tied_embeddings_and_init():
    torch.manual_seed(0)
    model = build_model(_tiny_model({"linear_attn": [1]}, "base_conv"))
    assert model.lm_head.weight is model.transformer.embeddings.word_embeddings.weight
    w = model.transformer.layers["0"].mlp.fc2.weight
    assert abs(w.std().item() - 0.02 / (2 * 5) ** 0.5) < 0.003
    assert model.transformer.layers["0"].mixer.in_proj.bias.abs().max() == 0


@pytest.mark.parametrize("seqlen", [4, 6, 15], ids=["T<W", "T=W", "T>W"])
def test_window_state_without_doc_ids_equals_one_document(seqlen):
    """The prefill's ring without doc_ids (index-tensor writes, no host sync) equals the general path's state
    for one document per row (doc_ids all equal)."""
    from based_layers.config import SlidingWindowConfig
    from based_layers.mixers import SlidingWindowAttention

    torch.manual_seed(0)
    mixer = SlidingWindowAttention(16, SlidingWindowConfig(num_heads=2, window=6, backend="reference")).double()
    x = torch.randn(2, seqlen, 16, dtype=torch.float64)
    _, fast = mixer(x, return_state=True)
    _, general = mixer(x, doc_ids=torch.ones(2, seqlen, dtype=torch.long), return_state=True)
    for key in ("k", "v", "pos", "next"):
        torch.testing.assert_close(fast[key], general[key], rtol=0, atol=0)
