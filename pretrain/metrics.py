"""Metrics: one row per logged step into metrics.jsonl and TensorBoard, plus a console progress bar with ETA.

After a resume at step S, the rows of steps after S (written before the run stopped, and about to be redone)
move from metrics.jsonl to metrics.superseded.jsonl, and TensorBoard hides its events from step S+1 on (a
purge step on the new writer), so each step has one row. Rows are strict JSON: a non-finite number is
written as null.

Throughput and MFU come from the architecture-aware FLOPs model (`pretrain.flops`). The peak is the
device's dense bf16 rate (known GPUs below, or `logging.peak_tflops_per_device`).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

# dense bf16 tensor-core peaks, TFLOP/s, by substring of torch.cuda.get_device_name()
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def device_peak_flops(device: torch.device, override_tflops: float = 0.0) -> float:
    """Peak FLOP/s of one device for MFU; 0 when unknown (MFU is then not reported)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return 0.0


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def progress_line(step: int, total: int, row: dict[str, float]) -> str:
    """`step 10/80 loss 4.1234 lr 1.00e-03 ...` from a logged row (throughput keys when present)."""
    parts = [f"step {step}/{total}", f"loss {row['train/loss']:.4f}"]
    for key, label, spec in (("train/lr", "lr", ".2e"), ("perf/tokens_per_s", "tok/s", ",.0f")):
        if key in row:
            parts.append(f"{label} {row[key]:{spec}}")
    return "  ".join(parts)


class MetricsLogger:
    """Writes rows on rank 0 only; other ranks hold a logger that does nothing."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, total_steps: int, progress_bar: bool,
                 start_step: int = 0) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        supersede_rows_after(run_dir / "metrics.jsonl", start_step)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # hides earlier events of steps >= start_step + 1 (they are redone from here)
            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step + 1)
        # Without a live bar (a job log, a pipe, or progress_bar=false) each logged step prints a plain line.
        self._plain_total = total_steps if not (progress_bar and sys.stdout.isatty()) else None
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, file=sys.stdout,
                             disable=None)

    def set_start(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.last_print_n = step
            self._bar.refresh()

    def log(self, step: int, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **_strict(row)}, allow_nan=False) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                self._tb.add_scalar(key, value, step)
        if self._plain_total is not None and "train/loss" in row:
            print(progress_line(step, self._plain_total, row), flush=True)
        if self._bar is not None and "train/loss" in row:
            self._bar.set_postfix(loss=f"{row['train/loss']:.4f}", lr=f"{row.get('train/lr', 0):.2e}", refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _strict(row: dict) -> dict:
    """The row with non-finite floats as null (JSON has no NaN or Infinity)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def supersede_rows_after(path: Path, step: int) -> None:
    """Move rows of steps after `step` (and unreadable lines) from `path` to metrics.superseded.jsonl.

    The file is rewritten through a temporary file and a rename, so an interruption leaves the old or the
    new one, never half.
    """
    if not path.is_file():
        return
    keep, moved = [], []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            current = isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step
        except ValueError:
            current = False
        (keep if current else moved).append(line)
    if not moved:
        return
    with open(path.with_name("metrics.superseded.jsonl"), "a") as f:
        f.write("".join(line + "\n" for line in moved))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
