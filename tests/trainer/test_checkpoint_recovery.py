"""Checkpoints that are never silently wrong: verification, fallback, pruning, async publication, resume that
validates before it writes, one metrics row per step after a resume, bounded non-finite skipping.

The trainer runs in this process (tiny Transformer++, a few steps) so that each test takes seconds.
"""

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import Checkpointer, CheckpointError, load_model_for_export, verify_checkpoint
from pretrain.config import CheckpointConfig, load_config
from tests.trainer.conftest import ROOT

SHORT = ("schedule.warmup_steps=1", "logging.val_interval=0", "logging.progress_bar=false", "logging.log_interval=1",
         "logging.tensorboard=false", "data.global_batch_size=8", "data.micro_batch_size=4", "checkpoint.interval=2")


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    """Trainer.fit installs SIGTERM/SIGUSR1 handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def trainer(data: Path, run: Path, *overrides: str):
    from pretrain.distributed import DistInfo
    from pretrain.trainer import Trainer

    cfg = load_config(ROOT / "configs/attn_tiny.yaml", [f"data.path={data}", f"run_dir={run}", *SHORT, *overrides])
    return Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def fit(data: Path, run: Path, steps: int, *overrides: str) -> int:
    return trainer(data, run, f"schedule.max_steps={steps}", *overrides).fit()


def rows(run: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON (NaN / Infinity are refused)."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def truncate_shard(folder: Path) -> None:
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run4(tiny_data, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    run = tmp_path_factory.mktemp("recovery") / "run"
    assert fit(tiny_data, run, 4) == 0
    assert Checkpointer(run, CheckpointConfig()).complete_steps() == [2, 4]
    return run


def _copy(run4: Path, tmp_path: Path) -> Path:
    shutil.copytree(run4, tmp_path / "run")
    return tmp_path / "run"


# item 2
def test_all_checkpoints_corrupt_stops_with_each_reason(run4, tiny_data, tmp_path):
    run = _copy(run4, tmp_path)
    for step in (2, 4):
        truncate_shard(run / "checkpoints" / f"step_0000000{step}")
    before = snapshot(run)
    with pytest.raises(CheckpointError) as err:
        fit(tiny_data, run, 6)
    message = str(err.value)
    assert "no usable checkpoint" in message
    assert "step_00000002" in message and "step_00000004" in message and message.count("bytes, meta.json says") == 2
    assert snapshot(run) == before  # no restart from step 0, nothing appended
    # an explicit start-over is still possible
    assert fit(tiny_data, run, 2, "checkpoint.resume=none") == 0


# item 3
def test_pruning_counts_only_verified_checkpoints(tmp_path):
    from tests.tools.conftest import save_checkpoint, tiny_model

    run = tmp_path / "run"
    model = tiny_model("attn")
    for step in (1, 2, 3):
        save_checkpoint(model, run, step=step)  # keep_last=0: nothing pruned
    for step in (2, 3):
        truncate_shard(Checkpointer(run, CheckpointConfig()).folder(step))
    from pretrain.config import TrainConfig, to_yaml

    ckpt = Checkpointer(run, CheckpointConfig(keep_last=2))
    state = {"step": 4, "tokens_seen": 0, "skipped_steps": 0, "loader": {}, "world_size": 1}
    ckpt.save(4, model, torch.optim.AdamW(model.parameters()), state, to_yaml(TrainConfig(model=model.cfg)))
    assert ckpt.complete_steps() == [1, 4]  # the two newest verified ones; the corrupt ones are gone
    assert all(verify_checkpoint(ckpt.folder(s)) is None for s in (1, 4))


# item 4
def test_explicit_resume_path_is_verified(run4, tiny_data, tmp_path):
    run = _copy(run4, tmp_path)
    folder = run / "checkpoints" / "step_00000004"
    shard = next(folder.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit inside a weight, same size
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step_00000004.*sha256"):
        fit(tiny_data, run, 6, f"checkpoint.resume={folder}")


@pytest.mark.parametrize("change", ["empty_files", "unlisted_file", "missing_required"])
def test_meta_json_must_list_every_file(change, run4, tmp_path):
    folder = _copy(run4, tmp_path) / "checkpoints" / "step_00000004"
    meta = json.loads((folder / "meta.json").read_text())
    if change == "empty_files":
        meta["files"] = {}
    elif change == "unlisted_file":
        del meta["files"]["__0_0.distcp"]
    else:
        del meta["files"][".metadata"]
    (folder / "meta.json").write_text(json.dumps(meta))
    assert verify_checkpoint(folder) is not None
    with pytest.raises(CheckpointError, match="step_00000004"):
        load_model_for_export(folder)


# item 5
def test_load_failure_after_verification_falls_back(run4, tiny_data, tmp_path, capsys):
    from tests.trainer.test_checkpoint_security import rehash

    run = _copy(run4, tmp_path)
    newest = run / "checkpoints" / "step_00000004"
    (newest / ".metadata").write_bytes(b"not a pickle at all")
    rehash(newest)  # meta.json matches: only the load itself fails
    assert verify_checkpoint(newest) is None
    assert fit(tiny_data, run, 6) == 0
    out = capsys.readouterr()
    assert "resumed from" in out.out and "step_00000002 at step 2" in out.out
    assert [r["step"] for r in rows(run) if "train/loss" in r] == list(range(1, 7))


# item 6
def test_async_checkpoint_is_published_when_its_write_completes(tmp_path):
    from pretrain.config import TrainConfig, to_yaml
    from tests.tools.conftest import tiny_model

    model = tiny_model("attn")
    ckpt = Checkpointer(tmp_path / "run", CheckpointConfig(keep_last=2))
    state = {"step": 1, "tokens_seen": 0, "skipped_steps": 0, "loader": {}, "world_size": 1}
    folder = ckpt.save(1, model, torch.optim.AdamW(model.parameters()), state, to_yaml(TrainConfig(model=model.cfg)),
                       async_save=True)
    deadline = time.time() + 30
    while not (folder / "meta.json").is_file():  # no further call into the checkpointer: no next save
        assert time.time() < deadline, "the async checkpoint was not published after its write completed"
        time.sleep(0.05)
    ckpt.finalize_pending()
    assert verify_checkpoint(folder) is None


def test_async_save_run_resumes(run4, tiny_data, tmp_path):
    run = tmp_path / "run"
    assert fit(tiny_data, run, 4, "checkpoint.async_save=true") == 0
    assert Checkpointer(run, CheckpointConfig()).complete_steps() == [2, 4]
    assert all(verify_checkpoint(run / "checkpoints" / f"step_0000000{s}") is None for s in (2, 4))
    a = {r["step"]: r["train/loss"] for r in rows(run4) if "train/loss" in r}
    b = {r["step"]: r["train/loss"] for r in rows(run) if "train/loss" in r}
    assert a == b


# item 7
def test_failed_resume_writes_nothing(run4, tiny_data, tmp_path):
    run = _copy(run4, tmp_path)
    before = snapshot(run)
    with pytest.raises(CheckpointError, match="(?i)size mismatch"):
        fit(tiny_data, run, 6, "model.mlp_hidden=128", "logging.tensorboard=true")
    assert snapshot(run) == before  # config.yaml, metrics.jsonl untouched, no TensorBoard file


# item 8
def test_resume_supersedes_rows_of_redone_steps(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert fit(tiny_data, run, 6, "logging.tensorboard=true") == 0
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # as if killed before the step-6 checkpoint
    assert fit(tiny_data, run, 6, "logging.tensorboard=true") == 0
    steps = [r["step"] for r in rows(run) if "train/loss" in r]
    assert steps == list(range(1, 7))
    superseded = [json.loads(line)["step"] for line in (run / "metrics.superseded.jsonl").read_text().splitlines()]
    assert superseded == [5, 6]
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))


def test_skipped_steps_not_overcounted_after_stop_and_resume(tiny_data, tmp_path):
    from pretrain.trainer import NonFiniteError

    run = tmp_path / "run"
    with pytest.raises(NonFiniteError):
        fit(tiny_data, run, 4, "nonfinite_policy=stop", "debug.nan_loss_at_steps=[2]")
    assert json.loads((run / "checkpoints" / "step_00000002" / "train_state.json").read_text())["skipped_steps"] == 0
    assert fit(tiny_data, run, 4, "nonfinite_policy=skip") == 0  # resumed at step 2, step 3 now finite
    assert rows(run)[-1]["train/skipped_steps"] == 0


def test_metrics_are_strict_json(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert fit(tiny_data, run, 3, "debug.nan_loss_at_steps=[1]", "checkpoint.interval=0") == 0
    by_step = {r["step"]: r for r in rows(run) if "train/loss" in r}
    assert by_step[2]["train/loss"] is None and by_step[2]["train/skipped_steps"] == 1
    assert isinstance(by_step[3]["train/loss"], float)


# item 9
def test_consecutive_skips_are_bounded(tiny_data, tmp_path):
    from pretrain.trainer import NonFiniteError

    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="nonfinite_skip_limit=2"):
        fit(tiny_data, run, 8, "nonfinite_skip_limit=2", "debug.nan_loss_at_steps=[3,4,5,6]", "checkpoint.interval=0")
    state = json.loads((run / "checkpoints" / "step_00000005" / "train_state.json").read_text())
    assert state["failed_step"] == 5 and state["skipped_steps"] == 2
    # skips that are not consecutive never reach the limit
    assert fit(tiny_data, tmp_path / "b", 8, "nonfinite_skip_limit=2", "debug.nan_loss_at_steps=[1,2,4,5]",
               "checkpoint.interval=0") == 0


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in rows(run) if r.get("train/loss") is not None}


def test_checkpoint_before_the_first_update_resumes_exactly(tiny_data, tmp_path):
    """A non-finite first step under nonfinite_policy=stop saves the state before any update (step 0); resumed
    from it, the run gives the fresh run's losses bit for bit (AdamW's step count starts at 0, not 1)."""
    from pretrain.trainer import NonFiniteError

    fresh, run = tmp_path / "fresh", tmp_path / "run"
    assert fit(tiny_data, fresh, 6, "checkpoint.interval=0", "deterministic=true") == 0
    with pytest.raises(NonFiniteError, match="step_00000000"):
        fit(tiny_data, run, 6, "checkpoint.interval=0", "deterministic=true", "nonfinite_policy=stop",
            "debug.nan_loss_at_steps=[0]")
    assert fit(tiny_data, run, 6, "checkpoint.interval=0", "deterministic=true") == 0
    assert _losses(run) == _losses(fresh)


def test_saving_before_the_first_update_changes_nothing(tiny_data, tmp_path):
    """Steps 0 and 1 skipped (non-finite), a checkpoint at step 2 before any update: the run goes on as the run
    that saved nothing, and a resume from that checkpoint gives the same losses."""
    skip = ("deterministic=true", "debug.nan_loss_at_steps=[0,1]")
    plain, saving, resumed = tmp_path / "plain", tmp_path / "saving", tmp_path / "resumed"
    assert fit(tiny_data, plain, 6, "checkpoint.interval=0", *skip) == 0
    assert fit(tiny_data, saving, 6, "checkpoint.interval=2", *skip) == 0
    assert _losses(saving) == _losses(plain) and sorted(_losses(plain)) == [3, 4, 5, 6]
    ckpt = saving / "checkpoints" / "step_00000002"
    assert fit(tiny_data, resumed, 6, "checkpoint.interval=0", f"checkpoint.resume={ckpt}", *skip) == 0
    assert _losses(resumed) == _losses(plain)
