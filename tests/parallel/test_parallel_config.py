"""Invalid layouts fail before any work with a message saying what to change; pipeline stage balancing."""

import pytest
import torch

from pretrain.config import ConfigError, derive
from pretrain.distributed import DistInfo
from pretrain.parallelize import check_layout, layout_problems
from pretrain.pipeline import balanced_stage_sizes, stage_sizes
from tests.parallel.harness import model_config, train_config


@pytest.mark.parametrize(("family", "layout", "world", "expected"), [
    ("based", dict(tp=3), 3, "parallel.tp=3 does not divide model.linear_attn.num_heads (4); choose a tp"),
    ("attn", dict(tp=8), 8, "parallel.tp=8 does not divide model.attention.num_heads (4)"),
    ("mamba", dict(tp=3), 3, "parallel.tp=3 does not divide the Mamba channels"),
    ("based", dict(pp=8), 8, "8 stages but the model has 4 layers (model.n_layer)"),
    ("based", dict(pp=2, virtual=3, schedule="interleaved_1f1b"), 2, "6 stages but the model has 4 layers"),
    ("based", dict(pp=2, virtual=2, schedule="1f1b"), 2, "use pp_schedule=interleaved_1f1b or zero_bubble"),
    ("based", dict(tp=2, dp=2), 2, "dp*tp*pp = 2*2*1 = 4 processes, but the world size is 2; launch 4"),
], ids=["tp-heads", "tp-attn-heads", "tp-mamba", "pp-layers", "virtual-layers", "1f1b-virtual", "world-size"])
def test_invalid_layout_names_the_fix(family, layout, world, expected):
    cfg = train_config(family, **layout)
    problems = layout_problems(cfg, world)
    assert any(expected in p for p in problems), problems


def test_world_size_mismatch_fails_in_derive_and_pipeline_needs_micro_batches():
    cfg = train_config("based", tp=2, pp=2)
    with pytest.raises(ConfigError, match="world size 6 is not divisible by tp\\*pp = 4"):
        derive(cfg, 6)
    cfg = train_config("based", pp=4, accum=2)
    with pytest.raises(ConfigError, match="1f1b needs at least pp=4 micro-batches per step"):
        check_layout(cfg, derive(cfg, 4))


def test_trainer_rejects_layout_before_building_the_model(monkeypatch):
    import pretrain.trainer as trainer

    def no_build(_):
        raise AssertionError("the model was built before the layout was checked")

    monkeypatch.setattr(trainer, "build_model", no_build)
    cfg = train_config("based", tp=3)
    with pytest.raises(ConfigError, match="parallel.tp=3 does not divide"):
        trainer.Trainer(cfg, DistInfo(rank=0, world_size=3, local_rank=0, device=torch.device("cpu")))


def test_stage_balance_by_flops():
    assert balanced_stage_sizes([1, 1, 1, 1], 2) == [2, 2]
    # the head's work on the last stage leaves it one layer; the other five split 3 + 2 (cost 3 at most)
    sizes = balanced_stage_sizes([1, 1, 1, 1, 1, 1], 3, last_stage_extra=2)
    assert sizes[-1] == 1 and sorted(sizes[:2]) == [2, 3]
    assert balanced_stage_sizes([5, 1, 1, 1, 1, 1], 2) == [1, 5]
    cfg = model_config("based")
    assert sum(stage_sizes(cfg, 16, 4)) == cfg.n_layer and min(stage_sizes(cfg, 16, 4)) == 1
    assert stage_sizes(cfg, 16, 2, explicit=[3, 1]) == [3, 1]
