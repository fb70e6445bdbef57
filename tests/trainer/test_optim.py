"""Published parameter grouping and the warmup + cosine schedule (timm CosineLRScheduler, warmup_prefix)."""

import math

import pytest
import torch

from based_layers import build_model
from pretrain.config import OptimConfig, ScheduleConfig, load_config
from pretrain.optim import lr_at, param_groups


def test_schedule_matches_published_shape():
    sched = ScheduleConfig(max_steps=20000, warmup_steps=200, warmup_init_lr=1e-6, min_lr=8e-5)
    assert lr_at(0, 8e-4, sched) == pytest.approx(1e-6)
    assert lr_at(100, 8e-4, sched) == pytest.approx(1e-6 + 100 * (8e-4 - 1e-6) / 200)
    assert lr_at(200, 8e-4, sched) == pytest.approx(8e-4)
    mid = 200 + 19800 // 2
    assert lr_at(mid, 8e-4, sched) == pytest.approx(8e-5 + 0.5 * (8e-4 - 8e-5) * (1 + math.cos(math.pi / 2)))
    assert lr_at(20000, 8e-4, sched) == pytest.approx(8e-5)
    assert lr_at(25000, 8e-4, sched) == pytest.approx(8e-5)


@pytest.mark.parametrize("decay_norms", [True, False])
def test_param_groups(decay_norms):
    cfg = load_config("configs/based_tiny.yaml")
    model = build_model(cfg.model)
    decay, no_decay = param_groups(model, OptimConfig(decay_norm_weights=decay_norms))
    decayed = {id(p) for p in decay["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    emb = model.transformer.embeddings.word_embeddings.weight
    assert id(emb) not in decayed  # also the tied lm_head
    assert all(not names[i].endswith(".bias") for i in decayed)
    norm_w = model.transformer.layers["0"].norm1.weight
    assert (id(norm_w) in decayed) == decay_norms
    assert id(model.transformer.layers["0"].mixer.conv.conv.weight) in decayed  # conv weights decayed, as published
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert isinstance(torch.optim.AdamW([decay, no_decay]), torch.optim.AdamW)
