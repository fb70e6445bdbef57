"""Regenerate tests/trainer/golden_based_tiny.json (only when a change is meant to move the curve).

    python tools/make_golden.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data, run = Path(tmp) / "data", Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "data_pipeline.tiny_corpus", "--out", str(data), "--seq-len", "128"],
                       cwd=ROOT, check=True)
        subprocess.run([sys.executable, "-m", "pretrain.train", "configs/based_tiny.yaml", f"data.path={data}",
                        f"run_dir={run}", "deterministic=true", "logging.progress_bar=false", "schedule.max_steps=30",
                        "logging.log_interval=1", "logging.val_interval=0", "checkpoint.interval=0"],
                       cwd=ROOT, check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        curve = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    out = ROOT / "tests" / "trainer" / "golden_based_tiny.json"
    out.write_text(json.dumps({"config": "configs/based_tiny.yaml, 30 steps, deterministic, OMP_NUM_THREADS=1",
                               "train/loss": curve}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
