"""Resume under another data-parallel size continues at the right sample (2 gloo processes -> 1 process)."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.trainer.conftest import ROOT, read_metrics, run_env, train_cmd

COMMON = ("schedule.max_steps=16", "schedule.warmup_steps=4", "checkpoint.interval=8", "logging.log_interval=1",
          "logging.val_interval=0", "data.global_batch_size=8", "data.micro_batch_size=4")


@pytest.mark.dist
def test_resume_dp2_checkpoint_on_one_process(tiny_data, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(train_cmd("based_tiny", tiny_data, single, *COMMON), cwd=ROOT, env=run_env(), check=True,
                   capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = train_cmd("based_tiny", tiny_data, multi, *COMMON)
    proc = subprocess.run(torchrun + cmd[1:], cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_metrics(single), read_metrics(multi)
    # the same samples in every step: dp2 and dp1 agree up to reduction order
    for step in range(1, 17):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    state = json.loads((multi / "checkpoints" / "step_00000008" / "train_state.json").read_text())
    assert state["loader"]["consumed_samples"] == 8 * 8 and state["world_size"] == 2
    shutil.rmtree(multi / "checkpoints" / "step_00000016")
    (multi / "metrics.jsonl").unlink()
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    c = read_metrics(multi)
    assert sorted(c) == list(range(9, 17))
    for step in range(9, 17):
        assert c[step] == pytest.approx(a[step], rel=1e-5), step
