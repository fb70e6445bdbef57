"""MQAR: the generator's contract, the two-layer model, and the reduced CPU run learning recall."""

import pytest
import torch

from tools.mqar import PRESETS, MQARConfig, build_mqar_model, make_mqar, train


@pytest.mark.parametrize("seq_len,num_kv", [(24, 4), (64, 16), (256, 64)])
def test_generator_contract(seq_len, num_kv):
    vocab = 8192
    inputs, labels = make_mqar(50, seq_len, num_kv, vocab, seed=1)
    assert inputs.shape == labels.shape == (50, seq_len)
    assert ((labels != -100).sum(1) == num_kv).all()
    for row in range(50):
        keys, values = inputs[row, 0:2 * num_kv:2], inputs[row, 1:2 * num_kv:2]
        assert len(set(keys.tolist())) == num_kv and len(set(values.tolist())) == num_kv
        assert ((keys >= 1) & (keys < vocab // 2)).all() and (values >= vocab // 2).all()
        for pos in (labels[row] != -100).nonzero().flatten().tolist():
            assert pos >= 2 * num_kv and (pos - 2 * num_kv) % 2 == 0  # queries at even offsets
            slot = (keys == inputs[row, pos]).nonzero().flatten()
            assert len(slot) == 1 and values[slot[0]] == labels[row, pos]
    again = make_mqar(50, seq_len, num_kv, vocab, seed=1)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


def test_two_layer_models():
    based = build_mqar_model(MQARConfig(**PRESETS["based-d64-f16"]))
    assert [type(b.mixer).__name__ for b in based.blocks] == ["ZoologyBaseConv", "LinearAttention"]
    la = based.blocks[1].mixer
    assert la.proj_q.out_features == 16 and la.head_dim == 64
    assert based.lm_head.weight is based.embedding.weight
    attn = build_mqar_model(MQARConfig(**PRESETS["attention-d64"]))
    assert [type(b.mixer).__name__ for b in attn.blocks] == ["ZoologyBaseConv", "CausalSelfAttention"]
    ours = build_mqar_model(MQARConfig(**{**PRESETS["based-d64-f16"], "arch": "based_layers"})).model
    assert [type(b.mixer).__name__ for b in ours.transformer.layers.values()] == ["BaseConv", "LinearAttention"]
    assert all(b.mlp is None for b in ours.transformer.layers.values())


def test_zoology_block_structure():
    """Zoology's block with an Identity state mixer: each block hands LayerNorm2(residual) on, and the
    next block (or the final norm) adds it to the residual again; BaseConv is conv(u) * Linear(u) + u."""
    torch.manual_seed(0)
    model = build_mqar_model(MQARConfig(**{**PRESETS["based-d64-f16"], "vocab_size": 50})).eval()
    ids = torch.randint(0, 50, (2, 9))
    conv = model.blocks[0].mixer
    u = torch.randn(2, 9, 64)
    taps = conv.conv.weight[:, 0]  # [d, 3]; output t sees u[t-2], u[t-1], u[t]
    padded = torch.cat([torch.zeros(2, 2, 64), u], 1)
    manual = sum(padded[:, i: i + 9] * taps[:, i] for i in range(3)) + conv.conv.bias
    assert torch.allclose(conv(u), manual * conv.projection(u) + u, atol=1e-5)
    h = model.embedding(ids)
    r1 = h + model.blocks[0].mixer(model.blocks[0].norm1(h))
    h1 = model.blocks[0].norm2(r1)
    r2 = (h1 + r1) + model.blocks[1].mixer(model.blocks[1].norm1(h1 + r1))
    expected = model.ln_f(model.blocks[1].norm2(r2) + r2)
    assert torch.allclose(model.hidden(ids), expected, atol=1e-5)
    causal = model.hidden(torch.cat([ids[:, :5], torch.randint(0, 50, (2, 4))], 1))[:, :5]
    assert torch.allclose(causal, expected[:, :5], atol=1e-5)


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="arch 'zoo'"):
        MQARConfig(arch="zoo")
    with pytest.raises(ValueError, match="precision 'fp16'"):
        MQARConfig(precision="fp16")


def test_cpu_run_learns_recall():
    """The reduced preset: Based (d 48, f 8) on 32-value MQAR; chance is 1/32 (1/6 picking an in-context value)."""
    torch.set_num_threads(1)
    result = train(MQARConfig(**PRESETS["cpu-tiny"]), device="cpu", log=lambda *_: None)
    assert result["accuracy"] > 0.6, result["history"]
    assert min(result["segments"].values()) > 0.5
