"""What a whole run costs: wall time and GPU-hours from a measured training throughput.

The measured rates are the rows of docs/throughput.csv (one per family and device; docs/PERFORMANCE.md
records how each was measured). A config whose model size differs from the measured one is scaled by the
FLOPs model (`pretrain.flops`: the same MFU at a different FLOPs per token). The per-GPU rate is assumed
constant over any number of GPUs: multi-GPU scaling is not measured yet, so a real multi-node run is slower
by its scaling loss. Validation and checkpoint time are not counted.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import TrainConfig, load_config
from pretrain.flops import training_flops_per_token

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT_TABLE = ROOT / "docs" / "throughput.csv"
SAME_SIZE = 1.1  # FLOPs per token within this factor: the measured rate is used as it is


class CostError(ValueError):
    """No estimate possible; the message says what to pass instead."""


@dataclass(frozen=True)
class CostEstimate:
    total_tokens: int
    gpus: int
    tokens_per_s_per_gpu: float
    wall_s: float
    gpu_hours: float
    basis: str


def load_throughput(path: Path = THROUGHPUT_TABLE) -> list[dict]:
    """Rows of the throughput table; CostError naming the file and line when a row is malformed."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for line, row in enumerate(rows, 2):
        try:
            row["tokens_per_s_per_gpu"] = float(row["tokens_per_s_per_gpu"])
        except (KeyError, TypeError, ValueError):
            raise CostError(f"{path}:{line}: tokens_per_s_per_gpu is not a number: {row}") from None
    return rows


@functools.cache
def _config_flops(config: str) -> float:
    cfg = load_config(ROOT / "configs" / f"{config}.yaml")
    return training_flops_per_token(cfg.model, cfg.data.seq_len)


def measured_rate(cfg: TrainConfig, device: str, rows: list[dict]) -> tuple[float, str]:
    """(tokens/s/GPU, where it comes from) for this config's family on `device`."""
    family = cfg.model.family
    matching = [r for r in rows if r["family"] == family and r["device"].lower() == device.lower()]
    if not matching:
        have = sorted({r["device"] for r in rows if r["family"] == family})
        raise CostError(
            f"no measured {family} throughput on {device} in {THROUGHPUT_TABLE.relative_to(ROOT)} "
            f"(measured on: {', '.join(have) or 'none'}); pass --device one of those or "
            "--tokens-per-s N (tokens/s per GPU)"
        )
    flops = training_flops_per_token(cfg.model, cfg.data.seq_len)
    row = min(
        matching,
        key=lambda r: max(flops, _config_flops(r["config"])) / min(flops, _config_flops(r["config"])),
    )
    ratio = _config_flops(row["config"]) / flops
    where = f"{row['config']} on {row['device']}, {row['date']}, git {row['git']}: {row['how']}"
    if max(ratio, 1 / ratio) <= SAME_SIZE:
        return row["tokens_per_s_per_gpu"], f"measured, {where}"
    return (
        row["tokens_per_s_per_gpu"] * ratio,
        f"scaled by FLOPs per token ({ratio:.2f}x, same MFU) from {row['tokens_per_s_per_gpu']:,.0f} "
        f"tokens/s/GPU measured for {where}",
    )


def estimate_cost(
    cfg: TrainConfig,
    gpus: int,
    device: str = "H100",
    tokens_per_s: float | None = None,
    rows: list[dict] | None = None,
) -> CostEstimate:
    """Wall time and GPU-hours of `schedule.max_steps` steps on `gpus` GPUs."""
    if gpus < 1:
        raise CostError(f"{gpus} GPUs: expected at least one")
    if tokens_per_s is not None:
        if tokens_per_s <= 0:
            raise CostError(f"--tokens-per-s {tokens_per_s}: expected a positive number (tokens/s per GPU)")
        rate, basis = tokens_per_s, "given with --tokens-per-s"
    else:
        rate, basis = measured_rate(cfg, device, load_throughput() if rows is None else rows)
    total = cfg.data.global_batch_size * cfg.data.seq_len * cfg.schedule.max_steps
    wall = total / (rate * gpus)
    return CostEstimate(
        total_tokens=total,
        gpus=gpus,
        tokens_per_s_per_gpu=rate,
        wall_s=wall,
        gpu_hours=wall * gpus / 3600,
        basis=basis,
    )
