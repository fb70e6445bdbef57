"""End to end: `python -m pretrain.train` under pp2 x tp2 (4 gloo processes) trains like one process.

Covers the trainer's step (pipeline schedule, vocab-parallel loss, clipping over all ranks), validation
through the pipeline and checkpoints written by the parallel run. float32: relative 1e-5.
"""

import subprocess
import sys

import pytest

from tests.trainer.conftest import ROOT, read_metrics, run_env, train_cmd

COMMON = ("schedule.max_steps=6", "schedule.warmup_steps=6", "logging.log_interval=1", "logging.val_interval=3",
          "checkpoint.interval=3", "logging.tensorboard=false", "data.val_max_samples=16")


@pytest.mark.dist
def test_pp2_tp2_training_matches_one_process(tiny_data, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    proc = subprocess.run(train_cmd("based_tiny", tiny_data, single, *COMMON), cwd=ROOT, env=run_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    cmd = train_cmd("based_tiny", tiny_data, multi, *COMMON, "parallel.tp=2", "parallel.pp=2")
    proc = subprocess.run(torchrun + cmd[1:], cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for key in ("train/loss", "val/loss", "train/grad_norm"):
        a, b = read_metrics(single, key), read_metrics(multi, key)
        assert sorted(a) == sorted(b) and a, key
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-5), (key, step)
    assert (multi / "checkpoints" / "step_00000006" / "meta.json").is_file()
