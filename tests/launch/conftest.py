"""Fixtures for the launcher tests: the tiny corpus, a fake `sbatch`, and a real one-node Slurm cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = Path(__file__).with_name("slurm_cluster.sh")
PACKAGES_UNAVAILABLE = 3
REQUEUE_RELEASE_AFTER_S = 3.0

# Short deterministic CPU runs: 1 process, 16 x 128 tokens per step, no validation, checkpoints every 10 steps.
FAST = [
    "checkpoint.interval=10",
    "logging.val_interval=0",
    "logging.log_interval=1",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "deterministic=true",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("launch_tiny_data")
    subprocess.run(
        [sys.executable, "-m", "data_pipeline.tiny_corpus", "--out", str(out), "--seq-len", "128"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return out


def run_overrides(data: Path, run_dir: Path, max_steps: int) -> list[str]:
    return [
        f"data.path={data}",
        f"run_dir={run_dir}",
        f"schedule.max_steps={max_steps}",
        f"schedule.warmup_steps={min(5, max_steps)}",
        *FAST,
    ]


def last_loss(run_dir: Path) -> tuple[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    row = [r for r in rows if "train/loss" in r][-1]
    return row["step"], row["train/loss"]


def metric_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def launch_env(log_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(
        os.environ, PYTHON=sys.executable, LOG_DIR=str(log_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"
    )
    env.update(extra)
    return env


@pytest.fixture
def fake_slurm(tmp_path) -> tuple[Path, Path]:
    """A folder with stub `sbatch` (records its arguments, prints job id 4242) and `sinfo` (answers).

    Returns (bin folder, record file); put the folder first on PATH."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch_calls.txt"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> "{record}"\necho 4242\n')
    (bin_dir / "sinfo").write_text("#!/bin/sh\necho debug\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir, record


@pytest.fixture
def no_slurm(tmp_path) -> Path:
    """A folder with `sbatch` and `sinfo` stubs that fail like an unconfigured Slurm; put it first on PATH."""
    bin_dir = tmp_path / "noslurm"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ntouch "{tmp_path}/sbatch_called"\nexit 1\n')
    (bin_dir / "sinfo").write_text(
        "#!/bin/sh\necho 'sinfo: fatal: Could not establish a configuration source' >&2\nexit 1\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


@pytest.fixture
def make_venv(tmp_path) -> Path:
    """A VENV for `make` whose python is this interpreter and whose setup is done (no pip install)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (venv / ".installed").touch()
    return venv


def start_cluster(kind: str):
    """Install (apt-get), configure and start the test cluster `kind` (tests/launch/slurm_cluster.sh);
    yields the environment for its Slurm commands (SLURM_CONF, and PATH for twonode's wrappers); stops it
    afterwards. Skips only when the packages cannot be installed."""
    state = os.environ.get("SLURM_TEST_DIR", "/tmp/based-slurm-test")
    env = dict(os.environ, SLURM_TEST_DIR=state)
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "start", kind],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode == PACKAGES_UNAVAILABLE:
        pytest.skip(f"Slurm packages cannot be installed here: {result.stderr.strip()}")
    if result.returncode != 0:
        pytest.fail(f"the {kind} Slurm cluster did not start (exit {result.returncode}):\n{result.stderr}")
    print(f"{kind} Slurm cluster up in {time.monotonic() - started:.1f} s", file=sys.stderr)
    cluster_env = {"SLURM_CONF": f"{state}/{kind}/slurm.conf"}
    if kind == "twonode":
        cluster_env["PATH"] = f"{state}/twonode/bin:{os.environ['PATH']}"
    try:
        yield cluster_env
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", kind], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The one-node proctrack/linuxproc cluster."""
    yield from start_cluster("linuxproc")


class Slurm:
    """Helpers for a job on the test cluster."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(self, *cmd: str, check: bool = True) -> str:
        result = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed: {result.stderr}")
        return result.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id)
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_for(
        self, job_id: str, states: set[str], timeout: float, release_requeued: bool = False, also: tuple = ()
    ) -> dict:
        """Poll until the job reaches one of `states`. Slurm holds a requeued job for about 2 minutes
        (Reason=BeginTime); with `release_requeued` the test starts it (and the jobs in `also`) at once."""
        deadline = time.monotonic() + timeout
        held_since: dict[str, float] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            for job, job_info in ((job_id, info), *((j, self.job(j)) for j in also)):
                held = job_info["JobState"] == "PENDING" and job_info.get("Reason") == "BeginTime"
                since = held_since.setdefault(job, time.monotonic()) if held else held_since.pop(job, None)
                # slurmd refuses ("already killed") a job started within the second its previous run was
                # killed in (credential revocation has 1 s resolution): wait a little before releasing it
                if release_requeued and held and time.monotonic() - since > REQUEUE_RELEASE_AFTER_S:
                    self.run("scontrol", "update", f"jobid={job}", "StartTime=now")
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} did not reach {states} in {timeout} s: {self.job(job_id)}")


@pytest.fixture(scope="session")
def slurm(slurm_cluster) -> Slurm:
    return Slurm(dict(os.environ, **slurm_cluster))


def _cluster_fixture(kind: str):
    @pytest.fixture(scope="session")
    def fixture():
        for env in start_cluster(kind):
            yield Slurm(dict(os.environ, **env))

    return fixture


# proctrack/cgroup + task/cgroup,task/affinity on one node, as most sites run
slurm_cgroup = _cluster_fixture("cgroup")
# two slurmd in their own network and hostname namespaces (hostnames box1/box2, NodeNames n1/n2)
slurm_twonode = _cluster_fixture("twonode")
