"""AdamW with the published parameter grouping, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups: decayed, and not decayed (biases, embeddings, Mamba's A_log/D, and norms if configured).

    Published quirk (default `decay_norm_weights: true`): the published grouping blacklists torch's own norm
    classes only, so the RMSNorm weights are decayed; `false` is the clean choice.
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            is_norm = type(module).__name__ == "RMSNorm"
            if (name == "bias" or isinstance(module, nn.Embedding) or name in ("A_log", "D")
                    or (is_norm and not cfg.decay_norm_weights)):
                no_decay_ids.add(id(param))
    # a tied head is the embedding matrix; a pipeline's last stage holds it without the Embedding module
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False) and getattr(model, "lm_head", None) is not None:
        no_decay_ids.add(id(model.lm_head.weight))
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if id(param) in no_decay_ids else decay).append(param)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda" if cfg.fused == "auto" else cfg.fused == "true"
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def lr_at(step: int, peak_lr: float, sched: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based), as timm's CosineLRScheduler with warmup_prefix.

    Warmup rises linearly from `warmup_init_lr` over `warmup_steps`; then cosine from the peak to `min_lr`
    over the remaining `max_steps - warmup_steps` steps; after that it stays at `min_lr`.
    """
    if step < sched.warmup_steps:
        return sched.warmup_init_lr + step * (peak_lr - sched.warmup_init_lr) / sched.warmup_steps
    t = step - sched.warmup_steps
    t_total = sched.max_steps - sched.warmup_steps
    if t >= t_total:
        return sched.min_lr
    return sched.min_lr + 0.5 * (peak_lr - sched.min_lr) * (1 + math.cos(math.pi * t / t_total))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
