"""The training loop: one Trainer for all three architectures.

A step reads `grad_accum` micro-batches of the fixed global order, runs forward/backward (bf16 autocast
over fp32 weights on GPU), clips, checks for non-finite values, applies AdamW at the scheduled learning
rate, and logs. Checkpoints hold everything needed for an exact resume (model, optimizer, step, tokens,
loader position, every rank's RNG).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from based_layers import build_model
from data_pipeline.loader import GlobalOrderLoader, ValidationLoader
from pretrain.checkpoint import Checkpointer, CheckpointError, load_checkpoint, load_newest
from pretrain.config import TrainConfig, derive, to_yaml
from pretrain.data_check import check_data_matches_config
from pretrain.distributed import DistInfo, all_reduce_max, all_reduce_mean, seed_everything
from pretrain.flops import training_flops_per_token
from pretrain.metrics import MetricsLogger, device_peak_flops, peak_memory_bytes
from pretrain.optim import build_optimizer, lr_at, set_lr
from pretrain.parallelize import batch_to_device, check_layout, compile_seconds, parallelize, unwrap
from pretrain.signals import SignalFlag

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Raised under `nonfinite_policy: stop`, or after `nonfinite_skip_limit` consecutive skipped steps under
    `skip`, once the last good state was checkpointed."""


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    # skipped steps in a row up to now; `nonfinite_skip_limit` of them stop the run
    consecutive_skips: int = 0
    extra: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, cfg: TrainConfig, dist_info: DistInfo) -> None:
        # wall-clock origin of this process's session: rows carry time/elapsed_s, from which tools/report.py
        # adds up wall time and GPU-hours over sessions (the value restarts at 0 after a resume)
        self._started = time.monotonic()
        self.cfg = cfg
        self.dist = dist_info
        self.derived = derive(cfg, dist_info.world_size)
        self.run_dir = cfg.resolved_run_dir
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        seed_everything(cfg.seed)
        check_layout(cfg, self.derived)
        check_data_matches_config(cfg)
        model = build_model(cfg.model).to(dist_info.device)
        self.model = parallelize(model, cfg, self.derived, dist_info)
        self.optimizer = build_optimizer(unwrap(self.model), cfg.optim, dist_info.device)
        self.loader = self._train_loader()
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint)
        self.state = TrainState()
        self.signals = SignalFlag()
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = device_peak_flops(dist_info.device, cfg.logging.peak_tflops_per_device)
        # opened by fit() only after the resume succeeded: a failed resume writes nothing into the run folder
        self.metrics: MetricsLogger | None = None
        self._compile_logged = not self.model.compile_info.enabled

    def _train_loader(self) -> GlobalOrderLoader:
        d = self.cfg.data
        return GlobalOrderLoader(d.path, split="train", global_batch_size=d.global_batch_size,
                                 micro_batch_size=d.micro_batch_size, dp_rank=self.model.dp_rank,
                                 dp_size=self.derived.dp, seed=d.seed, num_workers=d.num_workers)

    def _autocast(self):
        if self.cfg.precision == "bf16" and self.dist.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_loss(self, batch: dict) -> torch.Tensor:
        """Mean loss of one batch (forward only; every rank gets the value under any layout)."""
        on_device = batch_to_device(batch, self.dist.device, self.cfg.data.reset_state_at_doc_boundaries)
        return self.model.loss(on_device, autocast=self._autocast)

    def resume(self) -> Path | None:
        """Load the checkpoint that `checkpoint.resume` names; returns its folder (None: a fresh start).

        auto: the newest checkpoint of the run folder that verifies and loads, falling back past broken ones;
        when the run folder has checkpoints and none is usable this raises CheckpointError listing each (start
        over explicitly with checkpoint.resume=none or a new run_dir). PATH: that checkpoint, verified.
        """
        choice = self.cfg.checkpoint.resume
        if choice == "none":
            return None
        model = unwrap(self.model)
        if choice == "auto":
            candidates = self.checkpointer.candidates()
            if not candidates:
                return None
            try:
                folder, ts = load_newest(candidates, model, self.optimizer, where=self.checkpointer.root)
            except CheckpointError as err:
                raise CheckpointError(f"{err}\nNothing was changed in {self.run_dir}. Restore or remove these "
                                      "checkpoints, or start over with checkpoint.resume=none or a new "
                                      "run_dir.") from None
        else:
            folder = Path(choice)
            ts = load_checkpoint(folder, model, self.optimizer)
        try:
            self.state = TrainState(ts["step"], ts["tokens_seen"], ts["skipped_steps"],
                                    ts.get("consecutive_skips", 0))
            self.loader.load_state_dict(ts["loader"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{folder / 'train_state.json'}: not a train state this trainer wrote "
                                  f"({err!r})") from None
        return folder

    def _open_run_folder(self) -> None:
        """config.yaml and the metrics writers, once the resume succeeded (rows after the resumed step go)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        log_cfg = self.cfg.logging
        self.metrics = MetricsLogger(self.run_dir, self.dist.is_main, log_cfg.tensorboard, self.cfg.schedule.max_steps,
                                     log_cfg.progress_bar, start_step=self.state.step)

    def save(self, loader_state: dict | None = None, failed_step: int | None = None) -> Path:
        train_state = {"step": self.state.step, "tokens_seen": self.state.tokens_seen,
                       "skipped_steps": self.state.skipped_steps, "consecutive_skips": self.state.consecutive_skips,
                       "loader": loader_state or self.loader.state_dict(), "world_size": self.dist.world_size}
        if failed_step is not None:
            train_state["failed_step"] = failed_step
        return self.checkpointer.save(self.state.step, unwrap(self.model), self.optimizer, train_state,
                                      to_yaml(self.cfg), async_save=self.cfg.checkpoint.async_save)

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches; returns the step's metrics."""
        accum = self.derived.grad_accum
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(accum)]
        t1 = time.perf_counter()
        docs = self.cfg.data.reset_state_at_doc_boundaries
        on_device = [batch_to_device(b, self.dist.device, docs) for b in micro]
        poison = self.state.step in self.cfg.debug.nan_loss_at_steps
        total = self.model.forward_backward(on_device, autocast=self._autocast, poison=poison)
        t2 = time.perf_counter()
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = self.model.clip_grad_norm_(max_norm)
        loss_value = float(all_reduce_mean(total))
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        lr = lr_at(self.state.step, self.cfg.optim.lr, self.cfg.schedule)
        if finite:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return {"loss": loss_value, "grad_norm": grad_norm, "lr": lr, "finite": finite,
                "time_data": t1 - t0, "time_fwd_bwd": t2 - t1, "time_optim": t3 - t2}

    def _step_row(self, out: dict) -> dict[str, float]:
        step_time = out["time_data"] + out["time_fwd_bwd"] + out["time_optim"]
        tokens_per_s = self.derived.tokens_per_step / step_time
        row = {"train/loss": out["loss"], "train/lr": out["lr"], "train/grad_norm": out["grad_norm"],
               "perf/tokens_per_s": tokens_per_s, "perf/tokens_per_s_per_device": tokens_per_s / self.dist.world_size,
               "perf/time_data_s": out["time_data"], "perf/time_fwd_bwd_s": out["time_fwd_bwd"],
               "perf/time_optim_s": out["time_optim"], "perf/peak_memory_bytes": peak_memory_bytes(self.dist.device),
               "train/skipped_steps": self.state.skipped_steps, "train/tokens_seen": self.state.tokens_seen,
               "time/elapsed_s": time.monotonic() - self._started}
        if self.peak_flops > 0:
            row["perf/mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * self.dist.world_size)
        return row

    @torch.no_grad()
    def validate(self) -> float:
        d = self.cfg.data
        loader = ValidationLoader(d.path, batch_size=self.derived.val_batch_size, dp_rank=self.model.dp_rank,
                                  dp_size=self.derived.dp, max_samples=d.val_max_samples)
        self.model.eval()
        total, count = torch.zeros((), device=self.dist.device), 0
        for batch in loader:
            total += self._forward_loss(batch)
            count += 1
        self.model.train()
        mean = total / max(count, 1)
        return float(all_reduce_mean(mean))

    def fit(self) -> int:
        """Train to `schedule.max_steps`. Returns the process exit code (0 also after a signal)."""
        self.signals.install()
        resumed = self.resume()
        self._open_run_folder()
        self.metrics.message(self.model.compile_info.message)
        if resumed is not None:
            self.metrics.message(f"resumed from {resumed} at step {self.state.step}")
        self.metrics.set_start(self.state.step)
        batches = iter(self.loader)
        try:
            code = self._loop(batches)
        finally:
            self.checkpointer.finalize_pending()
            self.metrics.close()
        return code

    def _loop(self, batches) -> int:
        cfg = self.cfg
        while self.state.step < cfg.schedule.max_steps:
            if all_reduce_max(float(self.signals.received is not None), self.dist.device) > 0:
                return self._stop_on_signal()
            loader_before = self.loader.state_dict()
            started = time.perf_counter()
            out = self.train_step(batches)
            if not self._compile_logged:
                # once per process: the first step compiles every block's graphs (forward and backward)
                self._compile_logged = True
                self.metrics.message(f"torch.compile: first step {time.perf_counter() - started:.1f} s, of which "
                                     f"{compile_seconds():.1f} s compiling; later steps reuse the graphs")
            if not out["finite"]:
                self._non_finite(out, loader_before)
            else:
                self.state.consecutive_skips = 0
            self.state.step += 1
            self.state.tokens_seen += self.derived.tokens_per_step
            self._after_step(out)
        self.metrics.message(f"finished {self.state.step} steps, {self.state.tokens_seen:,} tokens")
        if not self.checkpointer.folder(self.state.step).exists():
            self.save()
        return 0

    def _stop_on_signal(self) -> int:
        """Checkpoint and exit 0. Nothing new to save when this step's checkpoint exists (a periodic save just
        wrote it, or the run resumed from it) or before the first step of a fresh run (start-up)."""
        step = self.state.step
        if step == 0:
            self.metrics.message("signal received before the first step (at step 0): nothing new to save; exiting")
            return 0
        folder = self.checkpointer.folder(step)
        if folder.exists():
            self.metrics.message(f"signal received: checkpoint {folder} written at step {step} (already there); "
                                 "exiting")
            return 0
        folder = self.save()
        self.metrics.message(f"signal received: checkpoint {folder} written at step {step}; exiting")
        return 0

    def _non_finite(self, out: dict, loader_before: dict) -> None:
        """Skip the step (no update), or stop: under `stop`, or after `nonfinite_skip_limit` skips in a row.

        A stop saves the state before this step with `failed_step`; the step is not counted as skipped,
        since a resume from that checkpoint runs it again.
        """
        what = f"non-finite loss {out['loss']} / grad norm {out['grad_norm']} at step {self.state.step}"
        limit = self.cfg.nonfinite_skip_limit
        if self.cfg.nonfinite_policy == "stop":
            why = "nonfinite_policy=stop"
        elif self.state.consecutive_skips >= limit:
            why = f"{limit} steps in a row were already skipped, nonfinite_skip_limit={limit}"
        else:
            self.state.skipped_steps += 1
            self.state.consecutive_skips += 1
            self.metrics.message(f"{what}: step skipped (no update; {self.state.skipped_steps} skipped so far, "
                                 f"{self.state.consecutive_skips} in a row)")
            return
        folder = self.save(loader_state=loader_before, failed_step=self.state.step)
        raise NonFiniteError(f"{what}: stopped ({why}); the last good state is in {folder} (no update was applied). "
                             "Resume from it with a lower optim.lr, or set nonfinite_policy=skip (and "
                             "nonfinite_skip_limit) to skip such steps.")

    def _after_step(self, out: dict) -> None:
        cfg, step = self.cfg, self.state.step
        self.metrics.advance()
        if step % cfg.logging.log_interval == 0 or step == cfg.schedule.max_steps:
            self.metrics.log(step, self._step_row(out))
        if cfg.logging.val_interval > 0 and (step % cfg.logging.val_interval == 0 or step == cfg.schedule.max_steps):
            val = self.validate()
            self.metrics.log(step, {"val/loss": val, "time/elapsed_s": time.monotonic() - self._started})
            self.metrics.message(f"step {step}: val loss {val:.4f}")
        if cfg.checkpoint.interval > 0 and step % cfg.checkpoint.interval == 0:
            self.save()
