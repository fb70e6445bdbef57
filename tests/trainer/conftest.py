"""Helpers for trainer tests: the training command, its environment, metrics read back."""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
