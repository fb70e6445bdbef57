"""The signal path without Slurm: the relay's pending requests, the trainer's start-up handler, workers of a
dead torchrun, rendezvous ports, the torchrun command, and the checks that refuse doomed submissions."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch import common, relay
from launch.common import LaunchError, check_partition
from pretrain.metrics import progress_line
from pretrain.signals import SignalFlag
from tests.launch.conftest import ROOT, launch_env, metric_rows, run_overrides

# A process that ignores SIGUSR1 (as a worker inherits from torchrun), installs a handler after `delay` s
# (its start-up), then prints which signals it got.
LATE_HANDLER = textwrap.dedent(
    """
    import signal, sys, time
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    time.sleep(float(sys.argv[1]))
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    print("ready", flush=True)
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    print("got", got, flush=True)
    """
)


def test_a_request_before_the_worker_handles_it_is_delivered_once_it_does():
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; subprocess.run(sys.argv[1:])",
            sys.executable,
            "-c",
            LATE_HANDLER,
            "1.0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    workers = relay.WorkerSignals(parent.pid, say=lambda text: None)
    deadline = time.monotonic() + 2
    while not relay.child_pids(parent.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    workers.request(signal.SIGUSR1)
    assert workers.deliver() == 0  # still starting: SIGUSR1 ignored, so not sent (it would be lost)
    while parent.poll() is None:
        workers.deliver()
        time.sleep(0.05)
    out = parent.stdout.read()
    assert "got [10]" in out, out
    assert list(workers.delivered.values()) == [1]


def test_startup_handler_remembers_a_request_and_the_trainer_flag_takes_it_over():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        early = SignalFlag()
        early.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert early.received == signal.SIGUSR1
        trainer_flag = SignalFlag()
        trainer_flag.install()
        assert trainer_flag.received == signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) == trainer_flag._handle
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_hand_started_torchrun_killed_by_sigusr1_its_worker_checkpoints_and_stops(tmp_path, tiny_data):
    """SIGUSR1 kills a torchrun started by hand (not through our launchers); its worker, orphaned, notices
    and checkpoints instead of training on."""
    run_dir = tmp_path / "run"
    argv = relay.torchrun_argv(
        sys.executable, "configs/based_tiny.yaml", run_overrides(tiny_data, run_dir, 400), 1, 1
    )
    torchrun = subprocess.Popen(
        argv, cwd=ROOT, env=launch_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    while metric_rows(run_dir) < 3 and time.monotonic() < deadline:
        assert torchrun.poll() is None, torchrun.stdout.read()
        time.sleep(0.1)
    worker = relay.child_pids(torchrun.pid)[0]
    torchrun.send_signal(signal.SIGUSR1)
    assert torchrun.wait(timeout=30) == -signal.SIGUSR1
    deadline = time.monotonic() + 60
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{worker}").exists(), "the orphaned worker trains on"
    out = torchrun.stdout.read()
    saved = re.search(r"signal received: checkpoint \S+ written at step (\d+)", out)
    assert "the torchrun agent" in out and saved, out
    step = int(saved.group(1))
    assert 3 <= step < 400 and (run_dir / "checkpoints" / f"step_{step:08d}" / "meta.json").is_file()


def test_rendezvous_port_is_below_the_ephemeral_range_and_skips_ports_in_use():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {relay.pick_port(str(job)) for job in range(0, 100000, 997)}
    assert all(relay.PORT_BASE <= p < relay.PORT_BASE + relay.PORT_SPAN <= low for p in ports)
    first = relay.pick_port("123")
    import socket

    with socket.socket() as busy:
        busy.bind(("", first))
        busy.listen()
        assert relay.pick_port("123") == first + 1


def test_torchrun_command_standalone_on_one_node_is_host_and_local_addr_on_several():
    one = relay.torchrun_argv("py", "c.yaml", ["a=1"], 1, 2, "n1:20001", "7", is_host=True)
    assert "--standalone" in one and not any(a.startswith("--rdzv-endpoint") for a in one)
    two = relay.torchrun_argv(
        "py", "c.yaml", [], 2, 1, "10.0.0.1:20001", "7", is_host=False, local_addr="10.0.0.2"
    )
    assert "--rdzv-endpoint=10.0.0.1:20001" in two and "--rdzv-conf=is_host=false" in two
    assert "--local-addr=10.0.0.2" in two and two[-3:] == ["-m", "pretrain.train", "c.yaml"]


def test_agent_env_sets_nccl_defaults_unless_given_and_drops_torchruns_sigterm_handler():
    env = relay.agent_env("127.0.0.1", base={"NCCL_NVLS_ENABLE": "1"})
    assert env["NCCL_NVLS_ENABLE"] == "1"  # the user's value wins
    assert relay.agent_env(None, base={})["NCCL_NVLS_ENABLE"] == "0"
    assert "SIGTERM" not in env["TORCHELASTIC_SIGNALS_TO_HANDLE"] and env["GLOO_SOCKET_IFNAME"] == "lo"


def test_missing_data_path_is_refused_before_submitting(tmp_path, fake_slurm):
    bin_dir, record = fake_slurm
    env = launch_env(tmp_path / "logs", PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("SLURM_JOB_ID", None)
    cmd = [sys.executable, "-m", "launch.pretrain", "--config", "configs/based_tiny.yaml", "--nodes", "2"]
    cmd += ["--gpus-per-node", "0", "--", f"data.path={tmp_path / 'nothing'}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    # refused by the config check (the same data check the trainer makes), naming the key and the folder
    assert result.returncode == 2, result.stderr
    assert "data.path" in result.stderr and "does not exist" in result.stderr
    assert str(tmp_path / "nothing") in result.stderr
    assert not record.exists(), "sbatch was called"


def fake_sinfo(monkeypatch, tmp_path, lines: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text(f"#!/bin/sh\nprintf '{lines}'\n")
    (bin_dir / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_more_nodes_than_the_partition_or_gpus_on_a_cpu_partition_are_refused(monkeypatch, tmp_path):
    fake_sinfo(monkeypatch, tmp_path, "cpu*|2|(null)\\ngpu|3|gpu:h100:8\\ngpu|1|gpu:h100:4\\n")
    check_partition(2, 0)
    check_partition(4, 8, "gpu")
    with pytest.raises(LaunchError, match="NODES=3 but partition cpu has 2 node"):
        check_partition(3, 0)
    with pytest.raises(LaunchError, match="GPUS_PER_NODE=8 but partition cpu has no GPUs.*GPUS_PER_NODE=0"):
        check_partition(1, 8)


def test_launch_nodes_from_the_config_is_used_when_nodes_is_not_given(tmp_path, tiny_data, fake_slurm):
    bin_dir, record = fake_slurm
    env = launch_env(tmp_path / "logs", PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("SLURM_JOB_ID", None)
    cmd = [
        sys.executable,
        "-m",
        "launch.pretrain",
        "--config",
        "configs/based_tiny.yaml",
        "--gpus-per-node",
        "0",
        "--",
        f"data.path={tiny_data}",
        "launch.nodes=2",
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--nodes=2" in record.read_text().splitlines()
    # the venv's tensorboard (PYTHON is this interpreter), not a bare `tensorboard` that needs the venv active
    assert f"TensorBoard: {common.tensorboard_command()} --logdir" in result.stdout


def test_plain_progress_line():
    line = progress_line(10, 80, {"train/loss": 4.12345, "train/lr": 1e-3, "perf/tokens_per_s": 12345.6})
    assert line == "step 10/80  loss 4.1235  lr 1.00e-03  tok/s 12,346"


def test_submitit_requeues_past_three_time_outs(tmp_path, monkeypatch):
    from launch.submit import MAX_TIMEOUT_REQUEUES, make_executor

    monkeypatch.setattr("launch.submit.LOG_DIR", tmp_path / "logs")
    # submitit's SlurmExecutor only looks for an `srun` on PATH; a stub keeps the test off the machine's Slurm
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    executor = make_executor("slurm", 1, 0, "x", "10", 60)
    assert executor.max_num_timeout == MAX_TIMEOUT_REQUEUES >= 100


def test_a_signal_while_the_trainer_starts_is_kept_until_the_first_step(tmp_path, tiny_data):
    """SIGUSR1 right after the trainer process starts (imports, model build): it exits 0 at the first step
    boundary instead of dying of the signal; with nothing trained, nothing is saved."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "pretrain.train",
        "configs/based_tiny.yaml",
        *run_overrides(tiny_data, run_dir, 40),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=launch_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 30
    while not relay.catches(proc.pid, signal.SIGUSR1) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "torch" not in Path(f"/proc/{proc.pid}/maps").read_text(), "the handler came after torch's import"
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "signal received before the first step (at step 0): nothing new to save" in out, out
    assert metric_rows(run_dir) == 0
