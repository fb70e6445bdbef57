"""Submit training with submitit: Slurm, or a local executor for debugging on one machine.

    python -m launch.submit --config configs/based_1b_50b.yaml --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 48:00:00 [--cluster auto|slurm|local] [--wait] -- key=value ...

Each node runs one submitit task, which starts torchrun (c10d rendezvous on the first node). On preemption
or near the time limit Slurm sends SIGUSR2 (`slurm_signal_delay_s` = the config's
`launch.signal_seconds_before_end`); submitit calls `TrainJob.checkpoint()`, which asks the trainers to
checkpoint (SIGUSR1), waits for them to exit, and hands submitit a fresh `TrainJob` to requeue; the requeued
job resumes from the newest checkpoint (`checkpoint.resume: auto`). Logs: logs/submitit/<job id>/.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from launch import relay
from launch.common import (
    LOG_DIR,
    LaunchError,
    Torchrun,
    check_config,
    check_data_path,
    check_partition,
    parse_count,
    print_run_summary,
    slurm_controller_reachable,
    torchrun_argv,
)

# A SIGTERM this recent means Slurm signalled every process of the job, the trainers included (preemption):
# they are already checkpointing, and a second signal would make them exit without a checkpoint.
RECENT_SIGTERM_S = 120.0
# submitit's default is 3: the 4th time-out would end the run unfinished. Preemptions are not counted.
MAX_TIMEOUT_REQUEUES = 1000


def parse_minutes(limit: str) -> int:
    """Slurm time limit ("MM", "HH:MM:SS", "D-HH:MM:SS") in whole minutes."""
    try:
        days, _, clock = limit.rpartition("-")
        parts = [int(p) for p in clock.split(":")]
        if len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        else:
            hours, minutes, seconds = ([0] * (3 - len(parts)) + parts)[-3:]
        total = (int(days or 0) * 24 + hours) * 60 + minutes + (1 if seconds else 0)
    except ValueError:
        raise LaunchError(f"time limit {limit!r}: expected minutes, HH:MM:SS or D-HH:MM:SS") from None
    if total <= 0:
        raise LaunchError(f"time limit {limit!r}: must be positive")
    return total


def last_train_loss(run_dir: Path) -> tuple[int, float] | None:
    """(step, loss) of the last `train/loss` row in the run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            last = (int(row["step"]), float(row["train/loss"]))
    return last


def job_port(job_id: str) -> int:
    """The rendezvous port of a submitit job: from its id, below the ephemeral port range."""
    digits = int("".join(c for c in str(job_id) if c.isdigit()) or 0)
    return relay.PORT_BASE + digits % relay.PORT_SPAN


def node_address(node: str) -> str:
    """The address Slurm reaches `node` at (NodeAddr), else the name itself."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", "--oneliner", node], capture_output=True, text=True, timeout=30
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return node
    found = re.search(r"\bNodeAddr=(\S+)", out)
    return found.group(1) if found else node


@dataclass
class TrainJob:
    """The callable submitit runs on every node: torchrun of the trainer; checkpointable for requeue."""

    config: str
    overrides: list[str] = field(default_factory=list)
    nproc_per_node: int = 1

    def __post_init__(self) -> None:
        self._run: Torchrun | None = None
        self._last_sigterm = float("-inf")

    def __getstate__(self) -> dict:
        return {"config": self.config, "overrides": self.overrides, "nproc_per_node": self.nproc_per_node}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        self._note_sigterm()
        host = None
        if env.num_nodes > 1:
            # Every node computes the same port (no channel to agree on a free one); node 0 hosts the store
            # at its Slurm address, whatever its hostname.
            host = node_address(env.hostnames[0])
            route = relay.local_route(host)
            argv = torchrun_argv(
                self.config,
                self.overrides,
                env.num_nodes,
                self.nproc_per_node,
                rdzv_endpoint=f"{host}:{job_port(env.job_id)}",
                rdzv_id=env.job_id,
                is_host=env.node == 0,
                local_addr=route[1] if route else None,
            )
        else:
            argv = torchrun_argv(self.config, self.overrides, 1, self.nproc_per_node)
        print(f"node {env.node}/{env.num_nodes} of job {env.job_id}: {' '.join(argv)}", flush=True)
        self._run = Torchrun(argv, rdzv_host=host)
        code = self._run.wait()
        if code != 0:
            raise RuntimeError(f"training exited with status {code} on node {env.node} (see this job's log)")
        cfg = check_config(self.config, self.overrides)
        step_loss = last_train_loss(cfg.resolved_run_dir)
        return {
            "run_dir": str(cfg.resolved_run_dir),
            "step": step_loss[0] if step_loss else None,
            "loss": step_loss[1] if step_loss else None,
        }

    def _note_sigterm(self) -> None:
        """Remember SIGTERMs, then let submitit's own handler log them as before."""
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum, frame):
            self._last_sigterm = time.monotonic()
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, handler)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the first node at preemption / time-out: save, then requeue a fresh job."""
        run = self._run
        if run is not None and run.running():
            if time.monotonic() - self._last_sigterm > RECENT_SIGTERM_S:
                count = run.signal_workers(signal.SIGUSR1)
                print(f"asked {count} trainer(s) to checkpoint", flush=True)
            code = run.wait()
            print(f"trainers exited with status {code}; requeueing", flush=True)
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.config, list(self.overrides), self.nproc_per_node)
        )


def make_executor(
    cluster: str,
    nodes: int,
    gpus: int,
    run_name: str,
    time_limit: str,
    signal_seconds: int,
    partition: str = "",
    account: str = "",
    cpus_per_task: int | None = None,
) -> submitit.Executor:
    """A Slurm or local executor with one task per node."""
    folder = LOG_DIR / "submitit" / "%j"
    minutes = parse_minutes(time_limit)
    if cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(
            timeout_min=minutes, tasks_per_node=1, gpus_per_node=gpus, signal_delay_s=signal_seconds
        )
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUT_REQUEUES)
    params: dict = {
        "job_name": run_name,
        "nodes": nodes,
        "ntasks_per_node": 1,
        "time": minutes,
        "signal_delay_s": signal_seconds,
        "additional_parameters": {"requeue": True},
    }
    if gpus > 0:
        params["gpus_per_node"] = gpus
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    if partition:
        params["partition"] = partition
    if account:
        params["account"] = account
    executor.update_parameters(**params)
    return executor


def submit(
    config: str,
    overrides: list[str] | None = None,
    nodes: int = 1,
    gpus_per_node: int = 0,
    cluster: str = "auto",
    partition: str | None = None,
    account: str | None = None,
    time_limit: str | None = None,
    cpus_per_task: int | None = None,
) -> submitit.Job:
    """Check the config, then submit it; returns the submitit job (`job.results()[0]` waits for the result
    dict; `job.result()` works for one node only)."""
    overrides = list(overrides or [])
    nproc = max(gpus_per_node, 1)
    cfg = check_config(config, overrides, world_size=nodes * nproc)
    check_data_path(cfg)
    if cluster == "auto":
        reachable, why = slurm_controller_reachable()
        cluster = "slurm" if reachable else "local"
        if not reachable and nodes > 1:
            raise LaunchError(f"--nodes {nodes} needs Slurm, but {why}; use --cluster local with --nodes 1")
    if cluster not in ("slurm", "local"):
        raise LaunchError(f"--cluster {cluster!r}: expected auto, slurm or local")
    if cluster == "local" and nodes > 1:
        raise LaunchError(f"--nodes {nodes} with --cluster local: the local executor uses this machine only")
    launch = cfg.launch
    if cluster == "slurm":
        check_partition(nodes, gpus_per_node, partition if partition is not None else launch.partition)
    executor = make_executor(
        cluster,
        nodes,
        gpus_per_node,
        cfg.run_name,
        time_limit or launch.time_limit,
        launch.signal_seconds_before_end,
        partition if partition is not None else launch.partition,
        account if account is not None else launch.account,
        cpus_per_task,
    )
    job = executor.submit(TrainJob(config, overrides, nproc))
    remove_unexpanded_folder(LOG_DIR / "submitit" / "%j")
    return job


def remove_unexpanded_folder(folder: Path) -> None:
    """submitit creates its folder pattern literally (logs/submitit/%j) before any job exists: drop it when
    empty, so that only the jobs' own folders remain."""
    try:
        folder.rmdir()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.submit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--nodes", default="1")
    parser.add_argument("--gpus-per-node", default="0", help="GPUs (processes) per node; 0 = one CPU process")
    parser.add_argument("--cpus-per-task", default=None, help="CPUs per node task (Slurm default otherwise)")
    parser.add_argument(
        "--cluster", default="auto", help="auto (Slurm when a controller answers), slurm, local"
    )
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 (default: launch.time_limit)")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value (after --)")
    args = parser.parse_args(argv)
    try:
        nodes = parse_count(args.nodes, "NODES")
        gpus = parse_count(args.gpus_per_node, "GPUS_PER_NODE", minimum=0)
        cpus = parse_count(args.cpus_per_task, "--cpus-per-task") if args.cpus_per_task else None
        job = submit(
            args.config,
            args.overrides,
            nodes,
            gpus,
            args.cluster,
            args.partition,
            args.account,
            args.time,
            cpus,
        )
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = check_config(args.config, args.overrides)
    print_run_summary(f"submitit {type(job).__name__} {job.job_id}", job.paths.stdout, cfg)
    if args.wait:
        # one result per node task (results(): result() fails for several tasks); they agree
        print(f"result: {job.results()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
