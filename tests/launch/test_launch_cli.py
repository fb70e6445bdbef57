"""`make pretrain` and launch/pretrain.py without a real Slurm: local runs, submission commands, bad invocations."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import common, pretrain
from launch.common import LaunchError
from launch.submit import parse_minutes, submit
from tests.launch.conftest import ROOT, last_loss, launch_env, metric_rows, run_overrides


def make_pretrain(venv: Path, env: dict, *variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "pretrain", f"VENV={venv}", *variables],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_make_pretrain_without_slurm_trains_locally(tmp_path, tiny_data, no_slurm, make_venv):
    run_dir = tmp_path / "run"
    env = launch_env(tmp_path / "logs", PATH=f"{no_slurm}:{os.environ['PATH']}")
    env.pop("SLURM_JOB_ID", None)
    args = shlex.join(run_overrides(tiny_data, run_dir, max_steps=4))
    result = make_pretrain(make_venv, env, "NODES=1", f"TINY_DATA={tiny_data}", f"ARGS={args}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "job:         local" in result.stdout
    assert f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}" in result.stdout
    assert last_loss(run_dir)[0] == 4
    logs = list((tmp_path / "logs").glob("based_tiny-local-*.log"))
    assert len(logs) == 1 and "finished 4 steps" in logs[0].read_text()
    assert not (tmp_path / "sbatch_called").exists()


def test_local_run_checkpoints_and_stops_on_sigusr1(tmp_path, tiny_data, no_slurm):
    """SIGUSR1 to the launcher reaches the trainer (not torchrun, which would die of it) exactly once."""
    run_dir = tmp_path / "run"
    env = launch_env(tmp_path / "logs", PATH=f"{no_slurm}:{os.environ['PATH']}")
    cmd = [
        sys.executable,
        "-m",
        "launch.pretrain",
        "--config",
        "configs/based_tiny.yaml",
        "--nodes",
        "1",
        "--launcher",
        "local",
        "--",
        *run_overrides(tiny_data, run_dir, max_steps=300),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 300
    while metric_rows(run_dir) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    saved = re.search(r"signal received: checkpoint \S+ written at step (\d+)", output)
    assert saved, output
    step = int(saved.group(1))
    assert 3 <= step < 300 and (run_dir / "checkpoints" / f"step_{step:08d}" / "meta.json").is_file()


def test_make_pretrain_with_slurm_submits_slurm_sh(tmp_path, tiny_data, fake_slurm, make_venv):
    bin_dir, record = fake_slurm
    env = launch_env(tmp_path / "logs", PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("SLURM_JOB_ID", None)
    overrides = run_overrides(tiny_data, tmp_path / "run", max_steps=4)
    result = make_pretrain(
        make_venv,
        env,
        "NODES=2",
        "GPUS_PER_NODE=0",
        f"TINY_DATA={tiny_data}",
        f"ARGS={shlex.join(overrides)}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sbatch_args = record.read_text().splitlines()
    assert "--nodes=2" in sbatch_args and "--gpus-per-node=0" in sbatch_args
    assert "--signal=B:USR1@300" in sbatch_args and "--job-name=based_tiny" in sbatch_args
    script = sbatch_args.index(str(ROOT / "launch" / "slurm.sh"))
    assert sbatch_args[script + 1 :] == ["configs/based_tiny.yaml", *overrides]
    assert "job:         Slurm job 4242" in result.stdout
    assert f"log:         {tmp_path / 'logs' / 'based_tiny-4242.log'}" in result.stdout
    assert "tensorboard --logdir" in result.stdout


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (["CONFIG=configs/no_such_config.yaml"], "CONFIG=configs/no_such_config.yaml: no such file"),
        (["NODES=four"], "NODES='four' is not a number"),
        (["NODES=0"], "NODES=0: expected an integer >= 1"),
        (["GPUS_PER_NODE=x", "NODES=2"], "GPUS_PER_NODE='x' is not a number"),
        (["ARGS=optim.lrr=1"], "unknown key 'optim.lrr'"),
        (
            ["NODES=3", "GPUS_PER_NODE=0"],
            "data.global_batch_size 16 is not a multiple of micro_batch_size x dp = 8 x 3",
        ),
    ],
    ids=[
        "unknown-config",
        "nodes-not-a-number",
        "nodes-zero",
        "gpus-not-a-number",
        "bad-override",
        "bad-batch",
    ],
)
def test_bad_invocations_stop_before_submitting(
    tmp_path, tiny_data, fake_slurm, make_venv, variables, message
):
    bin_dir, record = fake_slurm
    env = launch_env(tmp_path / "logs", PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = make_pretrain(make_venv, env, f"TINY_DATA={tiny_data}", *variables)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert not record.exists(), "sbatch was called"


def test_nodes_above_one_need_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(common.shutil, "which", lambda name: None)
    assert pretrain.choose_launcher("auto", 1) == "local"
    with pytest.raises(LaunchError, match="NODES=2 needs Slurm, but sbatch is not installed"):
        pretrain.choose_launcher("auto", 2)
    with pytest.raises(LaunchError, match="LAUNCHER='pbs'"):
        pretrain.choose_launcher("pbs", 1)


def test_inside_an_allocation_runs_slurm_sh_in_place(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    assert pretrain.choose_launcher("auto", 1) == "allocation"
    assert pretrain.choose_launcher("local", 1) == "local"


def test_slurm_sh_refuses_to_run_outside_slurm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", "launch/slurm.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "sbatch launch/slurm.sh" in result.stderr


def test_parse_minutes():
    assert parse_minutes("90") == 90
    assert parse_minutes("24:00:00") == 1440
    assert parse_minutes("1-00:30:00") == 1470
    assert parse_minutes("00:00:30") == 1
    with pytest.raises(LaunchError, match="expected minutes"):
        parse_minutes("soon")


def test_submitit_local_executor_runs_and_returns_the_result(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(common, "LOG_DIR", tmp_path / "logs")
    monkeypatch.setattr("launch.submit.LOG_DIR", tmp_path / "logs")
    monkeypatch.setenv("PYTHON", sys.executable)
    run_dir = tmp_path / "run"
    job = submit(
        "configs/based_tiny.yaml",
        run_overrides(tiny_data, run_dir, max_steps=3),
        cluster="local",
        time_limit="10",
    )
    result = job.result()
    assert result == {"run_dir": str(run_dir), "step": 3, "loss": last_loss(run_dir)[1]}
