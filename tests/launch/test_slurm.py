"""launch/slurm.sh and launch/submit.py against a real one-node Slurm (Debian's slurmctld + slurmd, CPU only).

The cluster is installed and started by tests/launch/slurm_cluster.sh (fixture `slurm_cluster`). The tiny
config trains 40 steps on one CPU process per job; an uninterrupted job is the reference for the final loss
of a job that is sent SIGUSR1, checkpoints, is requeued and resumes.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from launch import common
from launch.submit import submit
from tests.launch.conftest import ROOT, Slurm, last_loss, launch_env, metric_rows, run_overrides

pytestmark = pytest.mark.slurm

MAX_STEPS = 40
# Signal once the job has logged this many steps (of MAX_STEPS), so that training is surely under way.
SIGNAL_AFTER_ROWS = 5
JOB_TIMEOUT_S = 240


def sbatch(slurm: Slurm, log_dir: Path, name: str, *script_args: str) -> str:
    """`sbatch launch/slurm.sh ...` from the repository root, on CPU; returns the job id."""
    cmd = [
        "sbatch",
        "--parsable",
        f"--job-name={name}",
        "--gpus-per-node=0",
        "--oversubscribe",
        f"--output={log_dir}/%x-%j.log",
        "launch/slurm.sh",
        *script_args,
    ]
    log_dir.mkdir(parents=True, exist_ok=True)
    env = launch_env(log_dir, **slurm.env)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def read_log(path: Path) -> str:
    return path.read_text() if path.is_file() else f"(no log at {path})"


def wait_for_rows(
    run_dir: Path, rows: int, slurm: Slurm, job_id: str, timeout: float = JOB_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    while metric_rows(run_dir) < rows:
        state = slurm.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job_id} is {state} before step {rows}"
        assert time.monotonic() < deadline, f"job {job_id} did not reach step {rows} in {timeout} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def jobs(slurm, tiny_data, tmp_path_factory) -> dict:
    """Submit the reference job and the job to interrupt together (the cluster runs both at once), and send
    the second one SIGUSR1 once it is training: `scancel --signal=USR1 --batch` signals the batch script
    only, as `--signal=B:USR1@300` does before the time limit."""
    base = tmp_path_factory.mktemp("slurm_jobs")
    runs = {name: base / name for name in ("reference", "requeued")}
    ids = {
        name: sbatch(
            slurm,
            base / "logs",
            name,
            "configs/based_tiny.yaml",
            *run_overrides(tiny_data, run_dir, MAX_STEPS),
        )
        for name, run_dir in runs.items()
    }
    wait_for_rows(runs["requeued"], SIGNAL_AFTER_ROWS, slurm, ids["requeued"])
    slurm.run("scancel", "--signal=USR1", "--batch", ids["requeued"])
    return {"runs": runs, "ids": ids, "logs": base / "logs"}


def test_sbatch_slurm_sh_trains_tiny_config_to_completion(slurm, jobs):
    job_id, run_dir = jobs["ids"]["reference"], jobs["runs"]["reference"]
    info = slurm.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, JOB_TIMEOUT_S)
    log = read_log(jobs["logs"] / f"reference-{job_id}.log")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert f"finished {MAX_STEPS} steps" in log
    assert last_loss(run_dir)[0] == MAX_STEPS
    assert (run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}" / "meta.json").is_file()


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_loss(slurm, jobs):
    job_id, run_dir = jobs["ids"]["requeued"], jobs["runs"]["requeued"]
    info = slurm.wait_for(
        job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, JOB_TIMEOUT_S, release_requeued=True
    )
    log = read_log(jobs["logs"] / f"requeued-{job_id}.log")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    saved = re.search(r"signal received: checkpoint \S+/(step_\d+) written at step (\d+)", log)
    assert saved, f"the trainer did not checkpoint on SIGUSR1:\n{log}"
    assert int(saved.group(2)) < MAX_STEPS
    assert f"requeueing job {job_id}" in log
    assert f"resumed from {run_dir / 'checkpoints' / saved.group(1)}" in log
    reference = last_loss(jobs["runs"]["reference"])
    assert last_loss(run_dir) == reference == (MAX_STEPS, reference[1])


@pytest.mark.slow  # the longest of tests/launch (about 110 s on 2 busy cores): make test-slow
def test_submitit_job_on_slurm_is_checkpointed_requeued_and_returns_its_result(
    slurm, jobs, tiny_data, tmp_path, monkeypatch
):
    for name, value in slurm.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PYTHON", launch_env(tmp_path)["PYTHON"])
    monkeypatch.setattr(common, "LOG_DIR", tmp_path / "logs")
    monkeypatch.setattr("launch.submit.LOG_DIR", tmp_path / "logs")
    monkeypatch.chdir(ROOT)
    run_dir = tmp_path / "run"
    job = submit(
        "configs/based_tiny.yaml",
        run_overrides(tiny_data, run_dir, MAX_STEPS),
        cluster="slurm",
        time_limit="30",
    )
    wait_for_rows(run_dir, SIGNAL_AFTER_ROWS, slurm, job.job_id)
    # what Slurm does near the time limit: SIGUSR2 to the job's processes (submitit's signal)
    job._interrupt(timeout=True)
    slurm.wait_for(job.job_id, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT_S, release_requeued=True)
    result = job.result()
    log = read_log(Path(job.paths.stdout))
    assert "asked 1 trainer(s) to checkpoint" in log and "resumed from" in log, log
    reference = last_loss(jobs["runs"]["reference"])
    assert result == {"run_dir": str(run_dir), "step": MAX_STEPS, "loss": reference[1]}


def test_make_pretrain_inside_an_allocation_trains_on_it(slurm, tiny_data, tmp_path, make_venv):
    run_dir = tmp_path / "run"
    args = shlex.join(run_overrides(tiny_data, run_dir, max_steps=5))
    make = [
        "make",
        "--no-print-directory",
        "pretrain",
        f"VENV={make_venv}",
        "NODES=1",
        f"TINY_DATA={tiny_data}",
        f"ARGS={args}",
    ]
    env = launch_env(tmp_path / "logs", **slurm.env)
    result = subprocess.run(
        ["salloc", "--nodes=1", "--oversubscribe", *make],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(in the foreground)" in result.stdout and "training step ended with status 0" in result.stdout
    assert last_loss(run_dir)[0] == 5
