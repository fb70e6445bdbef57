"""A checkpoint written under one layout loads under another and training continues with the same loss.

tp2 x pp2 (4 processes, async save) -> dp4 with FSDP (4 processes) -> one process, in both orders of hops:
the saved run, the dp4 run resumed from its checkpoint, and one process resumed from either checkpoint see
the same loss at every later step (float32, relative 1e-5: reduction order only). The global batch is the
same in every layout (4 micro-batches per step).
"""

import pytest

from tests.parallel import harness


@pytest.mark.dist
def test_checkpoint_reshards_tp2pp2_to_dp4_to_one_process(tmp_path):
    from pretrain.checkpoint import Checkpointer, load_checkpoint
    from pretrain.parallelize import unwrap
    from tests.parallel.worker import RESHARD_MICRO

    report = harness.launch("reshard", 4, tmp_path / "report.json", str(tmp_path))
    saved, loaded = report["saved"], report["loaded"]
    # tp2 x pp2 saved after step 0; dp4 resumed at step 1
    assert loaded == pytest.approx(saved[1:], rel=1e-5)

    cfg = harness.train_config("based", accum=RESHARD_MICRO)
    model, opt = harness.build(cfg, seed=777)
    load_checkpoint(Checkpointer(tmp_path / "a", cfg.checkpoint).folder(1), unwrap(model), opt)
    assert harness.train_steps(model, opt, cfg, range(1, 3)) == pytest.approx(saved[1:], rel=1e-5)

    model, opt = harness.build(cfg, seed=778)
    load_checkpoint(Checkpointer(tmp_path / "b", cfg.checkpoint).folder(2), unwrap(model), opt)
    assert harness.train_steps(model, opt, cfg, range(2, 3)) == pytest.approx(saved[2:], rel=1e-5)


def test_one_process_checkpoint_of_fused_layers_is_the_published_layout(tmp_path):
    """On one process nothing is reordered: the checkpoint holds the model's own tensors."""
    import torch

    from pretrain.checkpoint import Checkpointer, load_model_for_export
    from pretrain.config import to_yaml
    from pretrain.parallelize import unwrap

    cfg = harness.train_config("attn")
    model, opt = harness.build(cfg)
    folder = Checkpointer(tmp_path, cfg.checkpoint).save(0, unwrap(model), opt, {"step": 0, "tokens_seen": 0},
                                                          to_yaml(cfg))
    _, exported = load_model_for_export(folder)
    for name, value in unwrap(model).state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name
