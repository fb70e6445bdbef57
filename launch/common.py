"""What every launcher shares: argument checks, the torchrun command, and a torchrun process whose workers
(not torchrun itself) receive the checkpoint signal.

Signals: the trainer checkpoints at the next step boundary on the first SIGUSR1/SIGTERM and exits at once on
a second one. torchrun would turn SIGTERM into SIGTERM-then-SIGKILL-after-30-s for its workers and dies on
SIGUSR1, so torchrun is started with SIGUSR1, SIGUSR2 and SIGTERM ignored and the launchers signal the
workers (torchrun's children) themselves. The workers install their own handlers when training starts.

`python -m launch.common describe CONFIG [key=value ...]` prints `run_dir=...` and `finished=0|1` for
launch/slurm.sh (a config error exits 2 with the message).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from pretrain.config import ConfigError, TrainConfig, derive, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
# Logs of all launches, one file per job: $LOG_DIR/<job name>-<job id>.log, default logs/ (as slurm.sh's
# #SBATCH --output); submitit's in $LOG_DIR/submitit/<job id>/.
LOG_DIR = Path(os.environ.get("LOG_DIR") or "logs")
IGNORED_IN_TORCHRUN = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


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


def torchrun_argv(
    config: str | Path,
    overrides: list[str],
    nnodes: int,
    nproc_per_node: int,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "based",
) -> list[str]:
    """torchrun running the trainer: standalone on one node, else c10d rendezvous at `rdzv_endpoint`."""
    argv = [
        python_executable(),
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc_per_node}",
        "--max-restarts=0",
    ]
    if rdzv_endpoint is None:
        argv += ["--standalone", "--nnodes=1"]
    else:
        argv += [
            f"--nnodes={nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
            f"--rdzv-id={rdzv_id}",
        ]
    return argv + ["-m", "pretrain.train", str(config), *overrides]


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (torchrun's workers), read from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses; fields after the last ')' are fixed
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


def _ignore_checkpoint_signals() -> None:
    for sig in IGNORED_IN_TORCHRUN:
        signal.signal(sig, signal.SIG_IGN)


class Torchrun:
    """A running torchrun; its output goes to `log_path` (when given) and to this process's stdout (`echo`).

    A thread reads the output and reaps the process, so `wait()` is safe to call from a signal handler.
    """

    def __init__(self, argv: list[str], log_path: Path | None = None, echo: bool = True) -> None:
        self.log_path = log_path
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", "1")
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_ignore_checkpoint_signals,
        )
        self._done = threading.Event()
        threading.Thread(target=self._follow, args=(echo,), daemon=True).start()

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
        """Send `sig` to the training processes on this machine; returns how many were signalled."""
        workers = child_pids(self.process.pid)
        for pid in workers:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return len(workers)

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


def print_run_summary(job: str, log_path: Path | str, cfg: TrainConfig) -> None:
    run_dir = cfg.resolved_run_dir
    print(
        f"job:         {job}\nlog:         {log_path}\nrun folder:  {run_dir}\n"
        f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}",
        flush=True,
    )


def _describe(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m launch.common describe CONFIG [key=value ...]", file=sys.stderr)
        return 2
    try:
        cfg = check_config(argv[0], argv[1:])
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"run_dir={cfg.resolved_run_dir}\nfinished={int(run_finished(cfg))}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "describe":
        sys.exit(_describe(sys.argv[2:]))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
