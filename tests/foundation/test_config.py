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


def test_yaml_syntax_error_is_a_config_error_with_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [64\ndata:\n  seq_len: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(bad) in str(err.value) and "not valid YAML" in str(err.value) and "line 2" in str(err.value)
    with pytest.raises(ConfigError, match=r"override 'optim.betas=\[0.9': the value is not valid YAML"):
        load_config(CONFIGS / "based_tiny.yaml", ["optim.betas=[0.9"])


@pytest.mark.parametrize(
    "override",
    ["optim.lr=-1", "optim.lr=0", "schedule.min_lr=-1e-5", "optim.betas=[0.9,1.5]", "logging.log_interval=0"],
)
def test_out_of_range_numbers_are_config_errors(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "based_tiny.yaml", [override])
    assert key in str(err.value) and f"(set by override '{override}')" in str(err.value)


def test_error_in_an_override_names_the_override_not_the_file():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "based_tiny.yaml", ["optim.lr=0.01", "data.seq_len=-3"])
    message = str(err.value)
    assert "data.seq_len: -3; expected a positive number (set by override 'data.seq_len=-3')" in message
    assert "with overrides" in message
    with pytest.raises(ConfigError, match="^override 'data.seq_len=abc': key 'data.seq_len'"):
        load_config(CONFIGS / "based_tiny.yaml", ["optim.lr=0.01", "data.seq_len=abc"])
    with pytest.raises(ConfigError, match="^override 'optim.lr': expected key.sub=value"):
        load_config(CONFIGS / "based_tiny.yaml", ["optim.lr"])


def test_float_for_an_integer_key_is_refused(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^override 'schedule.max_steps=2.5': key 'schedule.max_steps': 2.5 is not "
        r"a whole number",
    ):
        load_config(CONFIGS / "based_tiny.yaml", ["schedule.max_steps=2.5"])
    yaml_file = tmp_path / "steps.yaml"
    yaml_file.write_text("schedule:\n  max_steps: 2.5\nmodel:\n  mixer_layers:\n    linear_attn: [1.0]\n")
    with pytest.raises(ConfigError) as err:
        load_config(yaml_file)
    assert str(err.value).startswith(f"{yaml_file}: key 'schedule.max_steps': 2.5 is not a whole number")
    assert "model.mixer_layers.linear_attn[0]" in str(err.value)


def test_missing_data_path_is_a_config_error_for_training_and_the_launcher(tmp_path, capsys):
    from launch.common import LaunchError, check_config
    from pretrain.train import main as train_main

    missing = tmp_path / "nope"
    overrides = [f"data.path={missing}", f"run_dir={tmp_path / 'run'}", "device=cpu"]
    # the tools load a run's config without its data folder
    assert load_config(CONFIGS / "based_tiny.yaml", overrides).data.path == str(missing)
    with pytest.raises(
        ConfigError, match=f"data.path: '{missing}' does not exist.*set by override 'data.path="
    ):
        load_config(CONFIGS / "based_tiny.yaml", overrides, for_training=True)
    (missing).mkdir()
    with pytest.raises(ConfigError, match="has no manifest.json"):
        load_config(CONFIGS / "based_tiny.yaml", overrides, for_training=True)
    with pytest.raises(LaunchError, match="config error: .*data.path"):
        check_config(CONFIGS / "based_tiny.yaml", overrides, world_size=1)
    assert train_main([str(CONFIGS / "based_tiny.yaml"), *overrides]) == 2
    assert "config error:" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_negative_lr_stops_the_launcher_pre_check():
    from launch.common import LaunchError, check_config

    with pytest.raises(LaunchError, match="optim.lr: -0.001; expected a positive learning rate"):
        check_config(CONFIGS / "based_tiny.yaml", ["optim.lr=-1e-3"])
