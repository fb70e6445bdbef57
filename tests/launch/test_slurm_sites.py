"""launch/slurm.sh and launch/submit.py on Slurm as sites run it (tests/launch/slurm_cluster.sh):

- `cgroup`: proctrack/cgroup, task/cgroup,task/affinity. A signal for a job step reaches only its task (the
  relay), never torchrun's workers: without the relay the trainers would never checkpoint.
- `twonode`: two slurmd in their own network and hostname namespaces, hostnames box1/box2 that are not the
  NodeNames n1/n2 and resolve nowhere: rendezvous on the first node's NodeAddr, hosted by node 0 (is_host),
  workers on the interface that reaches it.

Every run is compared with one uninterrupted process on the same config (`reference_loss`).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import common
from launch.submit import submit
from tests.launch.conftest import ROOT, Slurm, last_loss, launch_env, metric_rows, run_overrides

pytestmark = pytest.mark.slurm

MAX_STEPS = 40
JOB_TIMEOUT_S = 240
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


@pytest.fixture(scope="session")
def reference_loss(tiny_data, tmp_path_factory):
    """Losses by step of one process (no Slurm) for a given max_steps, computed once each."""
    cache: dict[int, dict[int, float]] = {}

    def losses(max_steps: int) -> dict[int, float]:
        if max_steps not in cache:
            run_dir = tmp_path_factory.mktemp(f"reference_{max_steps}")
            cmd = [sys.executable, "-m", "pretrain.train", "configs/based_tiny.yaml"]
            cmd += run_overrides(tiny_data, run_dir, max_steps)
            subprocess.run(
                cmd, cwd=ROOT, env=launch_env(run_dir), check=True, capture_output=True, timeout=300
            )
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            cache[max_steps] = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
        return cache[max_steps]

    return losses


def sbatch(slurm: Slurm, log_dir: Path, name: str, *options_and_args: str, cwd: Path = ROOT) -> str:
    """`sbatch [options] ROOT/launch/slurm.sh configs/based_tiny.yaml ...` from `cwd`; returns the job id."""
    options = [a for a in options_and_args if a.startswith("--")]
    args = [a for a in options_and_args if not a.startswith("--")]
    cmd = ["sbatch", "--parsable", f"--job-name={name}", "--oversubscribe", f"--output={log_dir}/%x-%j.log"]
    log_dir.mkdir(parents=True, exist_ok=True)
    env = launch_env(log_dir, **slurm.env)
    env.pop("PYTHON")  # slurm.sh finds the repository's .venv itself
    result = subprocess.run(
        [*cmd, *options, str(ROOT / "launch" / "slurm.sh"), "configs/based_tiny.yaml", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def read_log(path: Path) -> str:
    return path.read_text() if path.is_file() else f"(no log at {path})"


def wait_until(condition, slurm: Slurm, job_id: str, what: str, timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        state = slurm.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job_id} is {state} before {what}"
        assert time.monotonic() < deadline, f"job {job_id}: no {what} in {timeout} s"
        time.sleep(0.2)


def checkpoint_step(log: str) -> int:
    saved = re.search(r"signal received: checkpoint \S+/step_\d+ written at step (\d+)", log)
    assert saved, f"the trainer did not checkpoint on the signal:\n{log}"
    return int(saved.group(1))


def assert_requeued_and_matches(
    slurm: Slurm, job_id: str, run_dir: Path, log_path: Path, reference, also: tuple = ()
) -> str:
    info = slurm.wait_for(job_id, ENDED, JOB_TIMEOUT_S, release_requeued=True, also=also)
    log = read_log(log_path)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert f"requeueing job {job_id}" in log, log
    assert last_loss(run_dir) == (MAX_STEPS, reference(MAX_STEPS)[MAX_STEPS]), log
    return log


@pytest.fixture(scope="module")
def cgroup_jobs(slurm_cgroup, tiny_data, tmp_path_factory) -> dict:
    """Two jobs at once on the cgroup node (both torchrun --standalone: no shared port): one is sent
    SIGUSR1 once it is training, the other while its trainer is still starting (no step done yet)."""
    base = tmp_path_factory.mktemp("cgroup_jobs")
    runs = {name: base / name for name in ("training", "startup")}
    # the second from another folder: slurm.sh finds the repository and its .venv from the script's path
    ids = {
        name: sbatch(
            slurm_cgroup,
            base / "logs",
            name,
            *run_overrides(tiny_data, run, MAX_STEPS),
            cwd=ROOT if name == "training" else base,
        )
        for name, run in runs.items()
    }
    logs = {name: base / "logs" / f"{name}-{ids[name]}.log" for name in runs}
    # start-up: torchrun has started its worker (the relay said so), which has logged no step yet
    wait_until(lambda: "relay on" in read_log(logs["startup"]), slurm_cgroup, ids["startup"], "relay")
    rows_at_signal = metric_rows(runs["startup"])
    slurm_cgroup.run("scancel", "--signal=USR1", "--batch", ids["startup"])
    wait_until(lambda: metric_rows(runs["training"]) >= 5, slurm_cgroup, ids["training"], "step 5")
    slurm_cgroup.run("scancel", "--signal=USR1", "--batch", ids["training"])
    return {"runs": runs, "ids": ids, "logs": logs, "rows_at_signal": rows_at_signal}


def test_cgroup_usr1_reaches_the_trainers_checkpoints_requeues_same_loss(
    slurm_cgroup, cgroup_jobs, reference_loss
):
    job_id, run_dir = cgroup_jobs["ids"]["training"], cgroup_jobs["runs"]["training"]
    log = assert_requeued_and_matches(
        slurm_cgroup,
        job_id,
        run_dir,
        cgroup_jobs["logs"]["training"],
        reference_loss,
        also=(cgroup_jobs["ids"]["startup"],),
    )
    assert "relay: SIGUSR1 -> trainer pid" in log and "resumed from" in log
    assert 5 <= checkpoint_step(log) < MAX_STEPS


def test_cgroup_signal_during_trainer_startup_still_checkpoints(slurm_cgroup, cgroup_jobs, reference_loss):
    job_id, run_dir = cgroup_jobs["ids"]["startup"], cgroup_jobs["runs"]["startup"]
    assert cgroup_jobs["rows_at_signal"] == 0
    log = assert_requeued_and_matches(
        slurm_cgroup, job_id, run_dir, cgroup_jobs["logs"]["startup"], reference_loss
    )
    # the request was kept through the start-up and acted on at the first step boundary, which (nothing
    # trained yet) has nothing to save; a later one checkpoints
    started = re.search(r"signal received before the first step \(at step 0\)", log)
    assert started or checkpoint_step(log) < MAX_STEPS, log
    assert f"repository {ROOT}, python {ROOT / '.venv' / 'bin' / 'python'}" in log


def test_two_node_sbatch_trains_like_one_process(slurm_twonode, tiny_data, tmp_path, reference_loss):
    steps = 10
    run_dir = tmp_path / "run"
    job_id = sbatch(
        slurm_twonode, tmp_path / "logs", "two", "--nodes=2", *run_overrides(tiny_data, run_dir, steps)
    )
    info = slurm_twonode.wait_for(job_id, ENDED, JOB_TIMEOUT_S)
    log = read_log(tmp_path / "logs" / f"two-{job_id}.log")
    assert info["JobState"] == "COMPLETED", log
    assert "relay on box1 (node 0)" in log and "relay on box2 (node 1)" in log, log
    assert "--rdzv-endpoint=10.213.0.11:" in log and "GLOO_SOCKET_IFNAME=eth0" in log, log
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    reference = reference_loss(steps)
    assert sorted(losses) == sorted(reference)
    for step, loss in losses.items():
        # dp=2 averages two half-batch means: the same loss up to float32 summation order
        assert math.isclose(loss, reference[step], rel_tol=1e-5), (step, loss, reference[step])


@pytest.mark.slow
def test_cgroup_time_limit_signal_checkpoints_and_requeues(slurm_cgroup, tiny_data, tmp_path):
    """--time=1 --signal=B:USR1@45: Slurm's own pre-limit signal (checked about every 30 s) reaches the
    trainers under cgroup; the job is requeued before the limit and finishes, not TIMEOUT."""
    steps = 400
    run_dir = tmp_path / "run"
    job_id = sbatch(
        slurm_cgroup,
        tmp_path / "logs",
        "limit",
        "--gpus-per-node=0",
        "--time=1",
        "--signal=B:USR1@45",
        *run_overrides(tiny_data, run_dir, steps),
    )
    info = slurm_cgroup.wait_for(job_id, ENDED, 600, release_requeued=True)
    log = read_log(tmp_path / "logs" / f"limit-{job_id}.log")
    assert "SIGUSR1: asking the trainers to checkpoint, then requeue" in log, log
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, log
    assert last_loss(run_dir)[0] == steps


@pytest.mark.slow
def test_two_node_submitit_job_trains_like_one_process(
    slurm_twonode, tiny_data, tmp_path, monkeypatch, reference_loss
):
    steps = 10
    for name, value in slurm_twonode.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PYTHON", sys.executable)
    monkeypatch.setattr(common, "LOG_DIR", tmp_path / "logs")
    monkeypatch.setattr("launch.submit.LOG_DIR", tmp_path / "logs")
    monkeypatch.chdir(ROOT)
    run_dir = tmp_path / "run"
    job = submit(
        "configs/based_tiny.yaml",
        run_overrides(tiny_data, run_dir, steps),
        nodes=2,
        cluster="slurm",
        time_limit="10",
    )
    slurm_twonode.wait_for(job.job_id, ENDED, JOB_TIMEOUT_S)
    results = job.results()
    assert len(results) == 2 and results[0] == results[1]
    assert results[0]["step"] == steps
    assert math.isclose(results[0]["loss"], reference_loss(steps)[steps], rel_tol=1e-5)
    assert not (tmp_path / "logs" / "submitit" / "%j").exists()


@pytest.mark.slow
def test_two_node_job_requeued_after_node_failure_resumes(slurm_twonode, tiny_data, tmp_path):
    """A node taken down mid-run: Slurm requeues the job (NODE_FAIL), which resumes from the last periodic
    checkpoint once the node is back and finishes."""
    steps = 60
    run_dir = tmp_path / "run"
    job_id = sbatch(
        slurm_twonode, tmp_path / "logs", "fail", "--nodes=2", *run_overrides(tiny_data, run_dir, steps)
    )
    wait_until(
        lambda: (run_dir / "checkpoints" / "step_00000010" / "meta.json").is_file(),
        slurm_twonode,
        job_id,
        "checkpoint at step 10",
    )
    slurm_twonode.run("scontrol", "update", "nodename=n2", "state=down", "reason=test")
    try:
        wait_until(
            lambda: int(slurm_twonode.job(job_id).get("Restarts", "0")) >= 1,
            slurm_twonode,
            job_id,
            "requeue",
            timeout=120,
        )
    finally:
        # n2's slurmd is alive, so with ReturnToService=2 it may already be back (then resume is refused)
        slurm_twonode.run("scontrol", "update", "nodename=n2", "state=resume", check=False)
    info = slurm_twonode.wait_for(job_id, ENDED, JOB_TIMEOUT_S * 2, release_requeued=True)
    log = read_log(tmp_path / "logs" / f"fail-{job_id}.log")
    assert info["JobState"] == "COMPLETED", log
    assert "resumed from" in log, log
    assert last_loss(run_dir)[0] == steps
