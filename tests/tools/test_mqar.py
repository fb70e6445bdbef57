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
    based = build_mqar_model(MQARConfig(**{**PRESETS["based-d64-f16"]}))
    kinds = [type(b.mixer).__name__ for b in based.transformer.layers.values()]
    assert kinds == ["BaseConv", "LinearAttention"]
    assert all(b.mlp is None for b in based.transformer.layers.values())
    la = based.transformer.layers["1"].mixer
    assert la.proj_q.out_features == 16 and la.head_dim == 64
    attn = build_mqar_model(MQARConfig(**PRESETS["attention-d64"]))
    assert [type(b.mixer).__name__ for b in attn.transformer.layers.values()] == ["BaseConv", "CausalSelfAttention"]


def test_cpu_run_learns_recall():
    """The reduced preset: Based (d 48, f 8) on 32-value MQAR; chance is 1/32 (1/6 picking an in-context value)."""
    torch.set_num_threads(1)
    result = train(MQARConfig(**PRESETS["cpu-tiny"]), device="cpu", log=lambda *_: None)
    assert result["accuracy"] > 0.6, result["history"]
    assert min(result["segments"].values()) > 0.5
