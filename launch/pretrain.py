"""`make pretrain CONFIG=... NODES=n [GPUS_PER_NODE=g] [ARGS="key=value ..."]`: check, then train here or submit.

    python -m launch.pretrain --config configs/based_tiny.yaml --nodes 1 [--gpus-per-node G] [--launcher L] -- key=value ...

Run it from the repository root (as make does). Where it runs (`--launcher`, or the LAUNCHER variable; default auto):
- inside a Slurm allocation (salloc, or a batch script): launch/slurm.sh in the foreground on its nodes;
- else where a Slurm controller answers (a login node): `sbatch launch/slurm.sh` (any NODES);
- else NODES must be 1: torchrun on this machine with all its GPUs (one CPU process when it has none).
`--launcher submitit` submits through launch/submit.py instead. The config (and its batch arithmetic for the
chosen number of processes) is checked before anything starts or is submitted.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from launch.common import (
    LOG_DIR,
    REPO_ROOT,
    LaunchError,
    Torchrun,
    check_config,
    check_data_path,
    check_partition,
    local_gpu_count,
    parse_count,
    print_run_summary,
    slurm_controller_reachable,
    torchrun_argv,
)
from pretrain.config import TrainConfig

LAUNCHERS = ("auto", "local", "slurm", "submitit")
SLURM_SCRIPT = REPO_ROOT / "launch" / "slurm.sh"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/based_1b_50b.yaml")
    parser.add_argument("--nodes", default=None, help="number of nodes (default: the config's launch.nodes)")
    parser.add_argument(
        "--gpus-per-node",
        default=None,
        help="GPUs (processes) per node; default: all of this machine's, or the config's "
        "launch.gpus_per_node on Slurm; 0 = CPU",
    )
    parser.add_argument(
        "--launcher",
        default=os.environ.get("LAUNCHER") or "auto",
        help=f"one of {', '.join(LAUNCHERS)} (default: $LAUNCHER or auto)",
    )
    parser.add_argument(
        "--partition", default=None, help="Slurm partition (default: the config's launch.partition)"
    )
    parser.add_argument(
        "--account", default=None, help="Slurm account (default: the config's launch.account)"
    )
    parser.add_argument(
        "--time", default=None, help="Slurm time limit (default: the config's launch.time_limit)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value (after --)")
    return parser.parse_args(argv)


def choose_launcher(requested: str, nodes: int) -> str:
    """local, allocation (slurm.sh in the foreground), slurm (sbatch) or submitit."""
    if requested not in LAUNCHERS:
        raise LaunchError(f"LAUNCHER={requested!r}: expected one of {', '.join(LAUNCHERS)}")
    if requested == "local":
        if nodes > 1:
            raise LaunchError(
                f"NODES={nodes} with LAUNCHER=local: a local run uses this machine only; use NODES=1"
            )
        return "local"
    if requested == "submitit":
        return "submitit"
    if os.environ.get("SLURM_JOB_ID"):
        return "allocation"
    reachable, why = slurm_controller_reachable()
    if reachable:
        return "slurm"
    if requested == "slurm" or nodes > 1:
        raise LaunchError(
            f"NODES={nodes} needs Slurm, but {why}. Run this on a Slurm login node, "
            "or use NODES=1 to train on this machine."
        )
    return "local"


def gpus_per_node(arg: str | None, cfg: TrainConfig, launcher: str) -> int:
    """GPUs (= processes) per node: the argument; else 0 for `device: cpu`; else this machine's GPUs (local),
    the allocation's (inside one), or the config's `launch.gpus_per_node` (submissions)."""
    if arg not in (None, ""):
        return parse_count(arg, "GPUS_PER_NODE", minimum=0)
    if cfg.device == "cpu":
        return 0
    if launcher == "local":
        return local_gpu_count()
    allocated = os.environ.get("SLURM_GPUS_ON_NODE") if launcher == "allocation" else None
    return int(allocated) if allocated and allocated.isdigit() else cfg.launch.gpus_per_node


def run_local(config: str, overrides: list[str], gpus: int, cfg: TrainConfig) -> int:
    """torchrun on this machine in the foreground; SIGTERM/SIGUSR1 to this process reach the trainers."""
    nproc = max(gpus, 1)
    log_path = LOG_DIR / f"{cfg.run_name}-local-{time.strftime('%Y%m%d-%H%M%S')}.log"
    print_run_summary(
        f"local, pid {os.getpid()}, {nproc} process(es) on {'GPU' if gpus else 'CPU'}", log_path, cfg
    )
    run = Torchrun(torchrun_argv(config, overrides, nnodes=1, nproc_per_node=nproc), log_path)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: run.signal_workers(signum))
    while True:
        try:
            return run.wait()
        except KeyboardInterrupt:
            continue


def sbatch_command(
    config: str, overrides: list[str], nodes: int, gpus: int, args: argparse.Namespace, cfg: TrainConfig
) -> list[str]:
    launch = cfg.launch
    cmd = [
        "sbatch",
        "--parsable",
        f"--nodes={nodes}",
        f"--gpus-per-node={gpus}",
        f"--job-name={cfg.run_name}",
        f"--time={args.time or launch.time_limit}",
        f"--signal=B:USR1@{launch.signal_seconds_before_end}",
        f"--output={LOG_DIR.resolve()}/%x-%j.log",
        f"--export=ALL,PYTHON={sys.executable}",
    ]
    partition = args.partition if args.partition is not None else launch.partition
    account = args.account if args.account is not None else launch.account
    if partition:
        cmd.append(f"--partition={partition}")
    if account:
        cmd.append(f"--account={account}")
    return cmd + [str(SLURM_SCRIPT), config, *overrides]


def submit_sbatch(cmd: list[str], cfg: TrainConfig) -> int:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        print(
            f"error: sbatch failed ({result.returncode}): {result.stderr.strip()}\n  command: {' '.join(cmd)}",
            file=sys.stderr,
        )
        return 1
    job_id = result.stdout.strip().split(";")[0]
    print_run_summary(f"Slurm job {job_id}", LOG_DIR / f"{cfg.run_name}-{job_id}.log", cfg)
    print(
        f"follow:      tail -f {LOG_DIR / f'{cfg.run_name}-{job_id}.log'}\n"
        f"checkpoint and requeue: scancel --signal=USR1 --batch {job_id}   stop: scancel {job_id}"
    )
    return 0


def run_in_allocation(config: str, overrides: list[str], nodes: int, gpus: int, cfg: TrainConfig) -> int:
    allocated = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    if nodes > allocated:
        raise LaunchError(f"NODES={nodes} but this Slurm allocation has {allocated} node(s)")
    job_id = os.environ["SLURM_JOB_ID"]
    print_run_summary(f"Slurm allocation {job_id} (in the foreground)", "this terminal", cfg)
    env = dict(
        os.environ, NODES=str(nodes), GPUS_PER_NODE=str(gpus), PYTHON=sys.executable, REPO_DIR=os.getcwd()
    )
    return subprocess.call(["bash", str(SLURM_SCRIPT), config, *overrides], env=env)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        given = args.nodes not in (None, "")
        nodes = parse_count(args.nodes, "NODES") if given else None
        cfg = check_config(args.config, args.overrides)
        nodes = nodes if given else parse_count(cfg.launch.nodes, "launch.nodes")
        launcher = choose_launcher(args.launcher, nodes)
        gpus = gpus_per_node(args.gpus_per_node, cfg, launcher)
        world_size = nodes * (gpus or 1)
        cfg = check_config(args.config, args.overrides, world_size=world_size)
        check_data_path(cfg)
        if launcher == "local":
            return run_local(args.config, args.overrides, gpus, cfg)
        if launcher == "allocation":
            return run_in_allocation(args.config, args.overrides, nodes, gpus, cfg)
        if launcher == "slurm":
            check_partition(
                nodes, gpus, args.partition if args.partition is not None else cfg.launch.partition
            )
            return submit_sbatch(sbatch_command(args.config, args.overrides, nodes, gpus, args, cfg), cfg)
        from launch.submit import main as submit_main

        extra = [
            f"--{k}={v}"
            for k, v in (("partition", args.partition), ("account", args.account), ("time", args.time))
            if v
        ]
        return submit_main(
            [
                "--config",
                args.config,
                "--nodes",
                str(nodes),
                "--gpus-per-node",
                str(gpus),
                *extra,
                "--",
                *args.overrides,
            ]
        )
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
