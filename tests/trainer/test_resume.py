"""Exact resume: 2N steps == N steps, SIGKILL, resume, N more steps (deterministic CPU), for all families."""

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.trainer.conftest import ROOT, read_metrics, run_env, train_cmd

COMMON = ("schedule.max_steps=16", "schedule.warmup_steps=4", "checkpoint.interval=8", "logging.log_interval=1",
          "logging.val_interval=0", "data.global_batch_size=8", "data.micro_batch_size=4")


def _run_until_checkpoint_then_kill(cmd: list[str], ckpt: Path, timeout: float = 120) -> None:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not (ckpt / "meta.json").exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {ckpt} appeared: {proc.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{ckpt} did not appear in {timeout}s")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("config", ["based_tiny", "attn_tiny", "mamba_tiny"])
def test_kill_and_resume_gives_identical_losses(config, tiny_data, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(train_cmd(config, tiny_data, full, *COMMON), cwd=ROOT, env=run_env(), check=True,
                   capture_output=True)
    _run_until_checkpoint_then_kill(train_cmd(config, tiny_data, killed, *COMMON),
                                    killed / "checkpoints" / "step_00000008")
    resumed = subprocess.run(train_cmd(config, tiny_data, killed, *COMMON), cwd=ROOT, env=run_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = read_metrics(full), read_metrics(killed)
    assert sorted(a) == list(range(1, 17))
    for step in range(9, 17):
        assert b[step] == a[step], (step, a[step], b[step])
