"""Apply parallelism to a built model (based_layers stays free of distributed code).

This module owns every distributed wrapper of the model. Data parallelism by replication (DDP) is
implemented here; tensor, pipeline and sharded data parallelism are validated up front.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.config import ConfigError, Derived, TrainConfig
from pretrain.distributed import DistInfo


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for key, block in list(model.transformer.layers.items()):
        model.transformer.layers[key] = checkpoint_wrapper(block)


def parallelize(model: nn.Module, cfg: TrainConfig, derived: Derived, dist_info: DistInfo) -> nn.Module:
    """Wrap `model` (already on its device) for the layout of `cfg.parallel`; returns the module to train."""
    par = cfg.parallel
    if par.tp > 1 or par.pp > 1 or par.fsdp:
        raise ConfigError("parallel.tp/pp/fsdp: tensor, pipeline and sharded data parallelism are not available "
                          "in this build; use parallel.tp=1 parallel.pp=1 parallel.fsdp=false (replicated data "
                          "parallelism over all processes)")
    if par.activation_checkpoint:
        apply_activation_checkpointing(model)
    if par.compile:
        for key, block in list(model.transformer.layers.items()):
            model.transformer.layers[key] = torch.compile(block)
    if derived.dp > 1:
        device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The LanguageModel inside any wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model
