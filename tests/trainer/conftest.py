"""Fixtures for trainer tests: the tiny generated corpus (made once per session) and a run helper."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_data")
    subprocess.run([sys.executable, "-m", "data_pipeline.tiny_corpus", "--out", str(out), "--seq-len", "128"],
                   cwd=ROOT, check=True, capture_output=True)
    return out


def train_cmd(config: str, data: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pretrain.train", f"configs/{config}.yaml", f"data.path={data}",
            f"run_dir={run_dir}", "logging.progress_bar=false", "deterministic=true", *overrides]


def run_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def read_metrics(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}
