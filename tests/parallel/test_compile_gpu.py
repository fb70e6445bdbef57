"""parallel.compile on a CUDA GPU through the trainer: `pytest -m gpu tests/parallel/test_compile_gpu.py`.

50 steps of the tiny configs of the three families on the GPU in bf16 with activation checkpointing: parallel.compile=auto
compiles every block with inductor (Based runs its Triton kernels as custom ops inside the graphs, Mamba its
mamba-ssm kernels as one eager call per mixer) and the losses stay within bf16 noise of the eager run.
"""

import importlib.util
import subprocess

import pytest
import torch

from tests.trainer.conftest import ROOT, read_metrics, run_env, train_cmd

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
COMMON = ("device=cuda", "precision=bf16", "schedule.max_steps=50", "schedule.warmup_steps=5",
          "checkpoint.interval=0", "logging.log_interval=1", "logging.val_interval=0",
          "parallel.activation_checkpoint=true")


def _run(config: str, data, run_dir, *overrides: str) -> tuple[dict, str]:
    proc = subprocess.run(train_cmd(config, data, run_dir, *COMMON, *overrides), cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(run_dir), proc.stdout + proc.stderr


@pytest.mark.parametrize("config", ["based_tiny", "attn_tiny", "mamba_tiny"])
def test_compiled_training_on_gpu_matches_eager(config, tiny_data, tmp_path):
    extra = ()
    if config == "mamba_tiny":
        if importlib.util.find_spec("mamba_ssm") is None:
            pytest.skip("mamba-ssm is not installed (wheels for the H200 machine in ../shared/wheels)")
        extra = ("model.mamba.backend=mamba_ssm",)
    eager, _ = _run(config, tiny_data, tmp_path / "eager", "parallel.compile=false", *extra)
    compiled, log = _run(config, tiny_data, tmp_path / "compiled", "parallel.compile=auto", *extra)
    assert "torch.compile on for every block (parallel.compile=auto on CUDA)" in log
    assert log.count("torch.compile: first step") == 1
    assert sorted(compiled) == sorted(eager) == list(range(1, 51))
    for step, loss in eager.items():
        # bf16 autocast: fused and unfused elementwise glue round differently
        assert compiled[step] == pytest.approx(loss, rel=2e-2), step
