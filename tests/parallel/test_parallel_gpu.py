"""The layout equivalence on GPUs (NCCL, bf16 autocast, FSDP with bf16 parameters / fp32 reduction).

`make test-gpu` on a machine with 2 (or 4) GPUs. bf16 tolerance: loss and grad norm within 2% of one GPU,
every gradient within 5% of its parameter's largest gradient (bf16 keeps 8 bits of mantissa; the parallel
run rounds partial sums in another order).
"""

import pytest
import torch

from tests.parallel.harness import launch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_layouts_match_one_gpu_at_bf16(world, tmp_path, monkeypatch):
    if GPUS < world:
        pytest.skip(f"needs {world} GPUs, this machine has {GPUS}")
    monkeypatch.setenv("PARALLEL_TEST_DEVICE", "cuda")
    report = launch("layouts", world, tmp_path / "report.json", "based,attn,mamba", timeout=600)
    for key, r in report.items():
        assert r["loss_rel_err"] <= 2e-2, (key, r["losses"], r["ref_losses"])
        assert r["norm_rel_err"] <= 2e-2, (key, r["norm_rel_err"])
        assert r["grad_rel_err"] <= 5e-2, (key, r["worst_param"], r["grad_rel_err"])
        assert not r["missing"], key
