"""What every launcher shares: argument checks, the torchrun command, and a torchrun process whose workers
(not torchrun itself) receive the checkpoint signal.

Signals: the trainer checkpoints at the next step boundary on the first SIGUSR1/SIGTERM and exits at once on
a second one. torchrun dies on SIGUSR1 and would turn SIGTERM into SIGTERM-then-SIGKILL-after-30-s for its
workers, so `Torchrun` starts it with SIGUSR1, SIGUSR2 and SIGTERM ignored and without its SIGTERM handler,
and passes requests to the workers (torchrun's children) itself, holding them for a worker that is still
starting (launch/relay.py, which slurm.sh runs on every node, does the same).

`python -m launch.common describe CONFIG [key=value ...]` prints `run_dir=`, `finished=0|1`, `device=`,
`nodes=` (launch.nodes) and `tensorboard=` for launch/slurm.sh (a config error exits 2 with the message).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from launch import relay
from pretrain.config import ConfigError, TrainConfig, derive, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
# Logs of all launches, one file per job: $LOG_DIR/<job name>-<job id>.log, default logs/ (as slurm.sh's
# #SBATCH --output); submitit's in $LOG_DIR/submitit/<job id>/.
LOG_DIR = Path(os.environ.get("LOG_DIR") or "logs")


class LaunchError(ValueError):
    """A launch that cannot work; the message says what is wrong and what to do. Raised before submitting."""


def parse_count(value: str | int, name: str, minimum: int = 1) -> int:
    """`value` as an integer >= minimum, or a LaunchError naming the variable."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise LaunchError(
            f"{name}={value!r} is not a number; give an integer >= {minimum}, e.g. {name}=2"
        ) from None
    if number < minimum:
        raise LaunchError(f"{name}={number}: expected an integer >= {minimum}")
    return number


def check_config(config: str | Path, overrides: list[str], world_size: int | None = None) -> TrainConfig:
    """Load and validate the config (and its batch arithmetic for `world_size` processes) before launching."""
    if not Path(config).is_file():
        known = ", ".join(sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml")))
        raise LaunchError(f"CONFIG={config}: no such file (configs here: {known})")
    try:
        cfg = load_config(config, overrides)
        if world_size is not None:
            derive(cfg, world_size)
            # what the trainer will read beyond the config (the data folder), checked as it will check it
            load_config(config, overrides, for_training=True)
    except ConfigError as err:
        raise LaunchError(f"config error: {err}") from None
    return cfg


def check_data_path(cfg: TrainConfig) -> None:
    """Refuse a run whose `data.path` does not exist (it would fail on the nodes after queueing)."""
    data = Path(cfg.data.path)
    if not data.exists():
        where = "" if data.is_absolute() else f" (relative to {Path.cwd()})"
        raise LaunchError(
            f"data.path={cfg.data.path}: no such folder{where}; prepare the data (README.md, "
            "`make tiny-data` for the tiny corpus) or set data.path=... before submitting"
        )


def run_finished(cfg: TrainConfig) -> bool:
    """Whether the run folder holds a complete checkpoint at `schedule.max_steps`."""
    folder = cfg.resolved_run_dir / "checkpoints" / f"step_{cfg.schedule.max_steps:08d}"
    return (folder / "meta.json").is_file()


def local_gpu_count() -> int:
    """GPUs torch sees here (0 on a CPU-only machine)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def python_executable() -> str:
    """The interpreter the trainer runs with: $PYTHON, else the one running this launcher."""
    return os.environ.get("PYTHON") or sys.executable


def torchrun_argv(config: str | Path, overrides: list[str], *args, **kwargs) -> list[str]:
    """torchrun running the trainer with `python_executable()`; the other arguments (nnodes, nproc_per_node,
    rdzv_endpoint, ...) are those of `launch.relay.torchrun_argv`."""
    return relay.torchrun_argv(python_executable(), str(config), overrides, *args, **kwargs)


class Torchrun:
    """A running torchrun; its output goes to `log_path` (when given) and to this process's stdout (`echo`).

    A thread reads the output and reaps the process, so `wait()` is safe to call from a signal handler.
    """

    def __init__(
        self, argv: list[str], log_path: Path | None = None, echo: bool = True, rdzv_host: str | None = None
    ) -> None:
        self.log_path = log_path
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            argv,
            env=relay.agent_env(rdzv_host),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=relay.ignore_checkpoint_signals,
        )
        self.workers = relay.WorkerSignals(self.process.pid, say=self._say)
        self._done = threading.Event()
        threading.Thread(target=self._follow, args=(echo,), daemon=True).start()
        threading.Thread(target=self._relay, daemon=True).start()

    def _say(self, text: str) -> None:
        print(text, flush=True)

    def _relay(self) -> None:
        """Deliver pending signal requests, also to workers that install their handler later."""
        while not self._done.wait(relay.POLL_S):
            self.workers.deliver()

    def _follow(self, echo: bool) -> None:
        log = open(self.log_path, "ab") if self.log_path is not None else None
        try:
            for line in iter(self.process.stdout.readline, b""):
                if log is not None:
                    log.write(line)
                    log.flush()
                if echo:
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
        finally:
            if log is not None:
                log.close()
            self.process.wait()
            self._done.set()

    def signal_workers(self, sig: int = signal.SIGUSR1) -> int:
        """Ask the training processes on this machine for `sig` (workers still starting get it once they
        handle it); returns how many workers there are now."""
        self.workers.request(sig)
        return len(relay.child_pids(self.process.pid))

    def running(self) -> bool:
        return not self._done.is_set()

    def wait(self) -> int:
        while not self._done.wait(0.5):
            pass
        return self.process.returncode


def slurm_controller_reachable() -> tuple[bool, str]:
    """(True, '') when sbatch is installed and a Slurm controller answers; else (False, why not)."""
    if shutil.which("sbatch") is None:
        return False, "sbatch is not installed"
    try:
        subprocess.run(
            ["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=20, check=True
        )
    except subprocess.TimeoutExpired:
        return False, "sinfo did not answer within 20 s"
    except (subprocess.CalledProcessError, OSError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        return False, f"sinfo failed: {detail.strip().splitlines()[-1] if detail.strip() else err}"
    return True, ""


def partition_resources(partition: str = "") -> tuple[str, int, set[str]] | None:
    """(name, node count, GRES strings) of `partition` (default: the cluster's default one) from sinfo;
    None when sinfo does not say."""
    try:
        out = subprocess.run(
            ["sinfo", "--noheader", "--format=%P|%D|%G"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 2]
    if not partition:
        partition = next((name.rstrip("*") for name, _, _ in rows if name.endswith("*")), "")
    mine = [
        (int(count), gres) for name, count, gres in rows if name.rstrip("*") == partition and count.isdigit()
    ]
    if not mine:
        return None
    return partition, sum(count for count, _ in mine), {gres for _, gres in mine}


def check_partition(nodes: int, gpus: int, partition: str = "") -> None:
    """Refuse a submission that Slurm would reject or leave pending forever: more nodes than the partition
    has, or GPUs asked on a partition without GPUs."""
    found = partition_resources(partition)
    if found is None:
        return
    name, count, gres = found
    if nodes > count:
        raise LaunchError(
            f"NODES={nodes} but partition {name} has {count} node(s): the job would pend forever; "
            f"use NODES<={count} or another partition"
        )
    if gpus > 0 and not any("gpu" in g for g in gres):
        raise LaunchError(
            f"GPUS_PER_NODE={gpus} but partition {name} has no GPUs (GRES: {', '.join(sorted(gres))}); "
            "for CPU processes use GPUS_PER_NODE=0 (make pretrain) or --gpus-per-node 0 (launch.submit), "
            "or choose a GPU partition"
        )


def tensorboard_command() -> str:
    """`tensorboard` beside the trainer's interpreter (the venv's bin/, not on PATH unless it is active)."""
    beside = Path(python_executable()).parent / "tensorboard"
    return str(beside) if beside.is_file() else "tensorboard"


def print_run_summary(job: str, log_path: Path | str, cfg: TrainConfig) -> None:
    run_dir = cfg.resolved_run_dir
    print(
        f"job:         {job}\nlog:         {log_path}\nrun folder:  {run_dir}\n"
        f"TensorBoard: {tensorboard_command()} --logdir {run_dir / 'tb'}",
        flush=True,
    )


def _describe(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m launch.common describe CONFIG [key=value ...]", file=sys.stderr)
        return 2
    try:
        cfg = check_config(argv[0], argv[1:])
        check_data_path(cfg)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"run_dir={cfg.resolved_run_dir}\nfinished={int(run_finished(cfg))}\ndevice={cfg.device}\n"
        f"nodes={cfg.launch.nodes}\ntensorboard={tensorboard_command()}"
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "describe":
        sys.exit(_describe(sys.argv[2:]))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
