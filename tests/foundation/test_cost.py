"""Run cost estimates: pretrain.cost and the cost section of pretrain.describe (make describe)."""

import pytest

from pretrain.config import load_config
from pretrain.cost import CostError, estimate_cost, load_throughput
from pretrain.describe import main
from pretrain.flops import training_flops_per_token

TOKENS_50B = 256 * 2048 * 100_000


def test_given_rate_gives_wall_time_and_gpu_hours():
    cfg = load_config("configs/based_1b_50b.yaml")
    est = estimate_cost(cfg, gpus=32, tokens_per_s=30_000)
    assert est.total_tokens == TOKENS_50B
    assert est.wall_s == pytest.approx(TOKENS_50B / (30_000 * 32))
    assert est.gpu_hours == pytest.approx(TOKENS_50B / 30_000 / 3600)
    with pytest.raises(CostError, match="expected a positive number"):
        estimate_cost(cfg, gpus=8, tokens_per_s=0)


def test_measured_rate_is_used_as_is_or_scaled_by_flops():
    rows = [
        {
            "family": "based",
            "config": "based_1b_50b",
            "device": "H100",
            "tokens_per_s_per_gpu": 30_000.0,
            "date": "d",
            "git": "g",
            "how": "bench",
        }
    ]
    big = load_config("configs/based_1b_10b.yaml")  # same model as based_1b_50b: the rate as measured
    assert estimate_cost(big, gpus=8, device="h100", rows=rows).tokens_per_s_per_gpu == 30_000
    small = load_config("configs/based_360m_10b.yaml")
    ratio = training_flops_per_token(big.model, 2048) / training_flops_per_token(small.model, 2048)
    est = estimate_cost(small, gpus=8, device="H100", rows=rows)
    assert est.tokens_per_s_per_gpu == pytest.approx(30_000 * ratio)
    assert est.basis.startswith(f"scaled by FLOPs per token ({ratio:.2f}x")
    with pytest.raises(CostError, match=r"no measured based throughput on A100 .*measured on: H100"):
        estimate_cost(small, gpus=8, device="A100", rows=rows)


def test_throughput_table_names_real_configs_of_its_family():
    rows = load_throughput()
    assert {(r["family"], r["device"]) for r in rows} >= {("based", "H100"), ("attn", "H100")}
    for row in rows:
        cfg = load_config(f"configs/{row['config']}.yaml")
        assert cfg.model.family == row["family"] and row["tokens_per_s_per_gpu"] > 0


def test_describe_prints_the_cost_of_the_whole_run(capsys):
    assert main(["configs/based_1b_50b.yaml", "--nodes", "4", "--tokens-per-s", "30000"]) == 0
    out = capsys.readouterr().out
    hours = TOKENS_50B / (30_000 * 32) / 3600
    assert "52.43B tokens on 32 GPUs (4 nodes x 8) of H100 at 30,000 tokens/s/GPU" in out
    assert f"wall time               {hours:,.1f} h" in out
    assert f"GPU-hours               {hours * 32:,.0f}" in out
    assert main(["configs/mamba_1b_50b.yaml", "--device", "H100"]) == 0
    assert "not available: no measured mamba throughput on H100" in capsys.readouterr().out
