"""Pipeline parallelism: split the layer stack into stages and run them with torch.distributed.pipelining.

A model of `n_layer` blocks is cut into `pp * virtual_stages` contiguous stages. Stage `s` runs on pipeline
rank `s % pp` (the looped placement of interleaved 1F1B), so with `virtual_stages: 2` and `pp: 2` rank 0 holds
stages 0 and 2. Stage sizes come from the FLOPs model (`balanced_stage_sizes`: the largest stage, the LM head
counted on the last one, is as small as possible) or from an explicit list of layers per stage.

A stage is a `LanguageModel` that holds only its own blocks (plus the embedding on the first stage and the
final norm and head on the last), sharing the submodules of the model it was cut from, so parameter names stay
those of the whole model (`transformer.layers.{i}...`) and checkpoints do not depend on the split.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    _PipelineSchedule,
)

from based_layers.config import ModelConfig
from based_layers.loss import LinearCrossEntropy
from based_layers.model import Backbone, LanguageModel
from pretrain.flops import mixer_flops

SINGLE_STAGE_SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}
MULTI_STAGE_SCHEDULES = {"interleaved_1f1b": ScheduleInterleaved1F1B, "zero_bubble": ScheduleInterleavedZeroBubble}


def layer_flops(cfg: ModelConfig, seq_len: int) -> list[float]:
    """Forward FLOPs per token of every layer (mixer + MLP), from the FLOPs model of pretrain/flops.py."""
    mlp = 2 * 3 * cfg.d_model * cfg.mlp_hidden
    return [sum(mixer_flops(cfg, name, seq_len).values()) + mlp for name in cfg.layer_mixers()]


def balanced_stage_sizes(costs: list[float], n_stages: int, last_stage_extra: float = 0.0) -> list[int]:
    """Layers per stage (contiguous, at least one each) minimising the most expensive stage.

    `last_stage_extra` is work only the last stage does (the LM head). Exact dynamic programme, O(S n^2).
    """
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot split {n} layers into {n_stages} stages of at least one layer")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the smallest possible maximum stage cost when the first i layers form s stages
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        extra = last_stage_extra if s == n_stages else 0.0
        for i in range(s, n - (n_stages - s) + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j] + extra)
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    sizes, i = [], n
    for s in range(n_stages, 0, -1):
        j = cut[s][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def stage_sizes(cfg: ModelConfig, seq_len: int, n_stages: int, explicit: list[int] | None = None) -> list[int]:
    """Layers per stage: `explicit` when given, else balanced by the FLOPs model."""
    if explicit:
        return list(explicit)
    head = 2 * cfg.d_model * cfg.padded_vocab_size
    return balanced_stage_sizes(layer_flops(cfg, seq_len), n_stages, last_stage_extra=head)


def local_stage_ids(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """The stages that pipeline rank `pp_rank` runs (looped placement: stage s on rank s % pp)."""
    return [pp_rank + v * pp for v in range(virtual_stages)]


def assemble(cfg: ModelConfig, embeddings: nn.Module | None, layers: dict[str, nn.Module], ln_f: nn.Module | None,
             lm_head: nn.Module | None, decay: nn.Module | None = None) -> LanguageModel:
    """A LanguageModel made of the given submodules (shared, not copied), named as in the whole model."""
    part = LanguageModel.__new__(LanguageModel)
    nn.Module.__init__(part)
    part.cfg = cfg
    backbone = Backbone.__new__(Backbone)
    nn.Module.__init__(backbone)
    backbone.embeddings = embeddings
    backbone.layers = nn.ModuleDict(sorted(layers.items(), key=lambda item: int(item[0])))
    backbone.ln_f = ln_f
    if decay is not None:
        backbone.decay = decay
    part.transformer = backbone
    part.lm_head = lm_head
    part.loss_head = LinearCrossEntropy(cfg.loss_impl, cfg.loss_chunk_size)
    return part


def cut_model(model: LanguageModel, layer_ids: list[int], first: bool, last: bool) -> LanguageModel:
    """The part of `model` with only `layer_ids` (and the embedding / final norm + head if `first` / `last`)."""
    src = model.transformer
    return assemble(model.cfg, src.embeddings if first else None, {str(i): src.layers[str(i)] for i in layer_ids},
                    src.ln_f if last else None, model.lm_head if last else None,
                    getattr(src, "decay", None) if first else None)


def join_parts(parts: list[LanguageModel]) -> LanguageModel:
    """One LanguageModel over several stages of one rank (for the optimizer and checkpoints)."""
    first = next((p for p in parts if p.transformer.embeddings is not None), None)
    last = next((p for p in parts if p.lm_head is not None), None)
    layers = {k: v for p in parts for k, v in p.transformer.layers.items()}
    return assemble(parts[0].cfg, first.transformer.embeddings if first else None, layers,
                    last.transformer.ln_f if last else None, last.lm_head if last else None,
                    getattr(first.transformer, "decay", None) if first else None)


def stage_layer_ids(sizes: list[int]) -> list[list[int]]:
    """The layer indices of every stage, from the number of layers per stage."""
    out, start = [], 0
    for size in sizes:
        out.append(list(range(start, start + size)))
        start += size
    return out


def build_schedule(name: str, stage_modules: list[nn.Module], stage_ids: list[int], n_stages: int,
                   n_microbatches: int, loss_fn, device: torch.device, group,
                   eval_only: bool = False) -> _PipelineSchedule:
    """The pipeline schedule `name` over this rank's stages (`stage_ids[k]` is the index of `stage_modules[k]`)."""
    stages = [PipelineStage(module, idx, n_stages, device, group=group)
              for module, idx in zip(stage_modules, stage_ids, strict=True)]
    if eval_only:
        if len(stages) == 1:
            return ScheduleGPipe(stages[0], n_microbatches, loss_fn=loss_fn)
        return ScheduleLoopedBFS(stages, n_microbatches, loss_fn=loss_fn)
    if name in SINGLE_STAGE_SCHEDULES:
        return SINGLE_STAGE_SCHEDULES[name](stages[0], n_microbatches, loss_fn=loss_fn)
    return MULTI_STAGE_SCHEDULES[name](stages, n_microbatches, loss_fn=loss_fn)
