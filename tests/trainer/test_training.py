"""Trainer behaviour: golden curve, checkpoint fallback, non-finite policy, signals, TensorBoard scalars."""

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import ROOT, read_metrics, run_env, train_cmd

GOLDEN = Path(__file__).with_name("golden_based_tiny.json")
SHORT = ("schedule.max_steps=12", "schedule.warmup_steps=3", "checkpoint.interval=4", "logging.log_interval=1",
         "logging.val_interval=6", "data.global_batch_size=8", "data.micro_batch_size=4")


def _train(config, data, run_dir, *overrides, check=True):
    proc = subprocess.run(train_cmd(config, data, run_dir, *overrides), cwd=ROOT, env=run_env(), capture_output=True,
                          text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_golden_loss_curve(tiny_data, tmp_path):
    """The tiny Based model on the generated corpus reproduces the stored curve (regenerate: see golden file)."""
    _train("based_tiny", tiny_data, tmp_path, "schedule.max_steps=30", "logging.log_interval=1",
           "logging.val_interval=0", "checkpoint.interval=0")
    losses = read_metrics(tmp_path)
    golden = {int(k): v for k, v in json.loads(GOLDEN.read_text())["train/loss"].items()}
    assert sorted(losses) == sorted(golden)
    for step, value in golden.items():
        assert losses[step] == pytest.approx(value, rel=1e-4, abs=1e-5), step
    assert losses[30] < losses[1] - 1.0  # the curve visibly falls


def _all_checkpoint_tensors_finite(run_dir: Path) -> None:
    from pretrain.checkpoint import load_model_for_export

    for folder in sorted((run_dir / "checkpoints").glob("step_*")):
        _, model = load_model_for_export(folder)
        for name, value in model.state_dict().items():
            assert torch.isfinite(value).all(), (folder, name)


def test_skip_policy_skips_the_step_and_saves_no_nan(tiny_data, tmp_path):
    _train("attn_tiny", tiny_data, tmp_path, *SHORT, "debug.nan_loss_at_steps=[5]", "nonfinite_policy=skip")
    skipped = read_metrics(tmp_path, "train/skipped_steps")
    assert skipped[5] == 0 and skipped[6] == 1 and skipped[12] == 1
    assert all(math.isfinite(v) for s, v in read_metrics(tmp_path).items() if s != 6)
    _all_checkpoint_tensors_finite(tmp_path)


def test_stop_policy_checkpoints_last_good_state(tiny_data, tmp_path):
    proc = _train("attn_tiny", tiny_data, tmp_path, *SHORT, "debug.nan_loss_at_steps=[6]", "nonfinite_policy=stop",
                  check=False)
    assert proc.returncode == 1
    assert "non-finite loss" in proc.stderr and "step_00000006" in proc.stderr
    state = json.loads((tmp_path / "checkpoints" / "step_00000006" / "train_state.json").read_text())
    assert state["failed_step"] == 6 and state["step"] == 6
    _all_checkpoint_tensors_finite(tmp_path)


def test_corrupted_newest_checkpoint_falls_back(tiny_data, tmp_path):
    _train("attn_tiny", tiny_data, tmp_path, *SHORT, "schedule.max_steps=8")
    newest = tmp_path / "checkpoints" / "step_00000008"
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    proc = _train("attn_tiny", tiny_data, tmp_path, *SHORT)
    assert "step_00000008 is unusable" in proc.stderr
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout


def test_sigusr1_checkpoints_exits_zero_and_resume_continues(tiny_data, tmp_path):
    full, sig = tmp_path / "full", tmp_path / "sig"
    overrides = (*SHORT, "schedule.max_steps=40", "checkpoint.interval=0", "logging.val_interval=0")
    _train("attn_tiny", tiny_data, full, *overrides)
    proc = subprocess.Popen(train_cmd("attn_tiny", tiny_data, sig, *overrides), cwd=ROOT, env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (sig / "metrics.jsonl").exists() or len(read_metrics(sig)) < 5:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "signal received" in out
    stopped_at = max(int(p.name[5:]) for p in (sig / "checkpoints").glob("step_*"))
    assert 5 <= stopped_at < 40
    _train("attn_tiny", tiny_data, sig, *overrides)
    a, b = read_metrics(full), read_metrics(sig)
    assert all(b[s] == a[s] for s in range(stopped_at + 1, 41))


def test_tensorboard_has_every_scalar(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train("based_tiny", tiny_data, tmp_path, *SHORT, "logging.peak_tflops_per_device=0.1")
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    expected = {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/tokens_per_s_per_device",
                "perf/mfu", "perf/time_data_s", "perf/time_fwd_bwd_s", "perf/time_optim_s", "perf/peak_memory_bytes",
                "train/skipped_steps", "val/loss"}
    assert expected <= set(acc.Tags()["scalars"])
    assert len(acc.Scalars("train/loss")) == 12
