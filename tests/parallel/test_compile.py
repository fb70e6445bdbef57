"""parallel.compile: auto / true / false resolved per device with a message, config checks, and a compiled
training run (activation checkpointing, the Triton kernels as custom ops) that matches eager."""

import pytest
import torch

from pretrain.config import ConfigError, load_config, validate
from pretrain.parallelize import compile_decision
from tests.parallel.harness import train_config
from tests.trainer.conftest import ROOT, read_metrics, run_env, train_cmd

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _cfg(family: str, compile_choice: str, mamba_backend: str = "reference"):
    cfg = train_config(family)
    cfg.parallel.compile = compile_choice
    cfg.model.mamba.backend = mamba_backend
    return cfg


def test_auto_compiles_on_cuda_and_stays_eager_on_cpu():
    pytest.importorskip("triton")
    on = compile_decision(_cfg("based", "auto"), CUDA)
    assert on.enabled and "parallel.compile=auto on CUDA" in on.message
    off = compile_decision(_cfg("based", "auto"), CPU)
    assert not off.enabled and "runs eager on cpu" in off.message
    # an explicit true compiles on the CPU too; false never compiles
    assert compile_decision(_cfg("based", "true"), CPU).enabled
    assert not compile_decision(_cfg("attn", "false"), CUDA).enabled
    # YAML booleans arrive as "True" / "False"
    assert compile_decision(_cfg("attn", "True"), CPU).enabled


def test_auto_falls_back_with_the_reason_and_true_refuses():
    """The Mamba reference scan is a Python loop over the sequence: auto says why it stays eager and how to
    fix it; an explicit true is a ConfigError with the same reason."""
    pytest.importorskip("triton")
    fallback = compile_decision(_cfg("mamba", "auto"), CUDA)
    assert not fallback.enabled
    assert "falling back to eager" in fallback.message and "model.mamba.backend=mamba_ssm" in fallback.message
    with pytest.raises(ConfigError, match="parallel.compile=true: model.mamba.backend=reference"):
        compile_decision(_cfg("mamba", "true"), CUDA)
    assert compile_decision(_cfg("mamba", "auto", mamba_backend="mamba_ssm"), CUDA).enabled


def test_config_checks_compile_values_and_mamba_resets():
    with pytest.raises(ConfigError, match="parallel.compile: 'sometimes'"):
        load_config(ROOT / "configs/based_tiny.yaml", ["parallel.compile=sometimes"])
    assert load_config(ROOT / "configs/based_tiny.yaml", ["parallel.compile=true"]).parallel.compile == "True"
    assert load_config(ROOT / "configs/based_1b_50b.yaml").parallel.compile == "auto"
    cfg = _cfg("mamba", "auto", mamba_backend="mamba_ssm")
    cfg.data.reset_state_at_doc_boundaries = True
    assert any("mamba-ssm's fused scan cannot reset" in p for p in validate(cfg))


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_data, tmp_path):
    """based_tiny on the Triton kernels (the interpreter on CPU) with activation checkpointing: compiled
    (aot_eager: the same graphs inductor gets, without generating kernels) and eager give the same losses;
    the compile decision and the compile time are logged once."""
    import subprocess

    common = ("schedule.max_steps=3", "schedule.warmup_steps=1", "checkpoint.interval=0", "logging.log_interval=1",
              "logging.val_interval=0", "data.global_batch_size=4", "data.micro_batch_size=2", "data.seq_len=64",
              "parallel.activation_checkpoint=true", "model.base_conv.backend=triton",
              "model.linear_attn.backend=triton", "model.sliding_window.backend=triton")
    losses, logs = {}, {}
    for mode in ("false", "true"):
        run_dir = tmp_path / mode
        cmd = train_cmd("based_tiny", tiny_data, run_dir, *common, f"parallel.compile={mode}",
                        "parallel.compile_backend=aot_eager")
        proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[mode], logs[mode] = read_metrics(run_dir), proc.stdout + proc.stderr
    assert sorted(losses["true"]) == [1, 2, 3]
    for step, value in losses["false"].items():
        assert losses["true"][step] == pytest.approx(value, rel=1e-5, abs=1e-6), step
    assert "torch.compile on for every block (parallel.compile=true" in logs["true"]
    assert logs["true"].count("torch.compile: first step") == 1
    assert "torch.compile off (parallel.compile=false)" in logs["false"]
