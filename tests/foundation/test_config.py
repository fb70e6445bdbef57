"""Configs: published parameter counts, schema errors that name the key and file, derived batch arithmetic."""

from pathlib import Path

import pytest
import torch

from based_layers import build_model
from pretrain.config import ConfigError, derive, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Based counts are exact (reference §1.8); attention and Mamba from the reference table (§2.2), to 1%.
EXPECTED = {
    "based_360m_10b": (362_620_928, 0.0),
    "based_1b_10b": (1_349_453_056, 0.0),
    "based_1b_50b": (1_349_453_056, 0.0),
    "attn_360m_10b": (359.8e6, 0.01),
    "attn_1b_10b": (1.304e9, 0.01),
    "attn_1b_50b": (1.304e9, 0.01),
    "mamba_360m_10b": (358.2e6, 0.01),
    "mamba_1b_10b": (1.319e9, 0.01),
    "mamba_1b_50b": (1.319e9, 0.01),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_parameter_counts(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    with torch.device("meta"):
        model = build_model(cfg.model)
    expected, rel = EXPECTED[name]
    assert abs(model.num_parameters() - expected) <= rel * expected, model.num_parameters()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_recipe(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert (cfg.optim.lr, cfg.schedule.min_lr, cfg.schedule.warmup_init_lr) == (8e-4, 8e-5, 1e-6)
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.1 and cfg.optim.grad_clip == 1.0
    d = derive(cfg, world_size=8)
    assert d.tokens_per_step == 256 * 2048
    steps = 100_000 if name.endswith("50b") else 20_000
    assert d.total_tokens == 524_288 * steps
    assert cfg.seed == 1111


def test_based_layer_pattern_and_quirks():
    cfg = load_config(CONFIGS / "based_1b_10b.yaml")
    layers = cfg.model.layer_mixers()
    assert [i for i, m in enumerate(layers) if m == "linear_attn"] == [1, 6, 11, 16, 21, 27, 33]
    assert [i for i, m in enumerate(layers) if m == "sliding_window"] == [2, 7, 12, 17, 22, 28, 34]
    assert layers.count("base_conv") == 22
    with torch.device("meta"):
        model = build_model(cfg.model)
    sd = model.state_dict()
    assert "transformer.decay.decay" in sd and sd["transformer.decay.decay"].shape == (16,)
    assert sd["transformer.layers.0.mixer.conv.conv.weight"].shape == (3584, 1, 3)
    assert sd["transformer.layers.1.mixer.proj_q.weight"].shape == (256, 1792)
    assert sd["transformer.layers.2.mixer.Wqkv.weight"].shape == (5376, 1792)
    assert sd["lm_head.weight"].shape == (50264, 1792)
    assert cfg.model.sliding_window.window == 128


def test_misspelled_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "model.d_modle" in str(err.value) and str(bad) in str(err.value)


def test_wrong_type_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  seq_len: long\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "data.seq_len" in str(err.value) and str(bad) in str(err.value)


def test_override_and_bad_override():
    cfg = load_config(CONFIGS / "based_tiny.yaml", ["optim.lr=0.01", "model.n_layer=3"])
    assert cfg.optim.lr == 0.01 and cfg.model.n_layer == 3
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(CONFIGS / "based_tiny.yaml", ["optim.lrr=0.01"])


def test_semantic_errors():
    with pytest.raises(ConfigError, match="mixer_layers.linear_attn: layer 9"):
        load_config(CONFIGS / "based_tiny.yaml", ["model.mixer_layers.linear_attn=[9]"])
    with pytest.raises(ConfigError, match="unknown mixer"):
        load_config(CONFIGS / "based_tiny.yaml", ["model.default_mixer=lstm"])
    with pytest.raises(ConfigError, match="num_heads"):
        load_config(CONFIGS / "based_tiny.yaml", ["model.sliding_window.num_heads=5"])


def test_derive_batch_arithmetic():
    cfg = load_config(CONFIGS / "based_360m_10b.yaml")
    assert derive(cfg, 8).grad_accum == 4 and derive(cfg, 1).grad_accum == 32
    with pytest.raises(ConfigError, match="global_batch_size"):
        derive(load_config(CONFIGS / "based_360m_10b.yaml", ["data.micro_batch_size=3"]), 8)
    with pytest.raises(ConfigError, match="tp\\*pp"):
        derive(load_config(CONFIGS / "based_360m_10b.yaml", ["parallel.tp=3"]), 8)
    with pytest.raises(ConfigError, match="world size"):
        derive(load_config(CONFIGS / "based_360m_10b.yaml", ["parallel.dp=4"]), 8)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(CONFIGS / "nope.yaml")
