"""The FLOPs model against torch.utils.flop_counter on tiny models.

Linear layers (every projection, the MLP and the LM head) must agree exactly: both count 2 FLOPs per
multiply-add of the same matmuls. The mixing itself cannot agree exactly and is not meant to: the flop
counter sees what the plain-PyTorch reference executes (a dense masked T x T product for attention and the
window, einsums in feature space for linear attention, none of the elementwise shift-and-add convolution),
while the model counts the efficient algorithm (causal half, window-bounded keys, chunked state passing);
and the counter does not see CPU SDPA at all. On the tiny configs at T = 128 the mixing is at most ~12% of
the total (attention, where the counter sees none of it), so the totals agree to 15%; the mixing formulas
are checked in closed form below.
"""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from based_layers import build_model
from pretrain.config import load_config
from pretrain.flops import forward_flops_breakdown

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _counted(model: nn.Module, tokens: torch.Tensor) -> tuple[int, int]:
    """(FLOPs in nn.Linear modules, all FLOPs) of one forward pass, by torch's flop counter."""
    linear_names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    with FlopCounterMode(display=False) as counter:
        model(tokens)
    per_module = counter.get_flop_counts()
    linear = sum(sum(ops.values()) for name, ops in per_module.items() if name.removeprefix("LanguageModel.") in linear_names)
    return linear, counter.get_total_flops()


@pytest.mark.parametrize("name", ["based_tiny", "attn_tiny", "mamba_tiny"])
def test_flops_model_matches_flop_counter(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    batch, seq_len = 2, cfg.data.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq_len))
    linear, total = _counted(model, tokens)
    parts = forward_flops_breakdown(cfg.model, seq_len)
    n_tok = batch * seq_len
    expected_linear = n_tok * (parts["mixer_proj"] + parts["mlp"] + parts["lm_head"])
    assert linear == pytest.approx(expected_linear, rel=1e-9)
    assert total == pytest.approx(n_tok * sum(parts.values()), rel=0.15)


def test_mean_keys_closed_form():
    from pretrain.flops import _mean_keys_causal

    assert _mean_keys_causal(5) == 3.0  # (1 + 2 + 3 + 4 + 5) / 5
    assert _mean_keys_causal(5, window=1) == (1 + 2 + 2 + 2 + 2) / 5
    assert _mean_keys_causal(5, window=10) == _mean_keys_causal(5)


def test_based_mixing_is_tiny_share_at_published_shape():
    cfg = load_config(CONFIGS / "based_1b_50b.yaml")
    parts = forward_flops_breakdown(cfg.model, 2048)
    assert parts["mixer_mix"] / sum(parts.values()) < 0.01
    assert 3 * sum(parts.values()) == pytest.approx(8.14e9, rel=0.01)
