"""RoPE's cos/sin tables (based_layers.rotary.Rotary): the same numbers as computing the angles, fp32 on every
device and dtype, rebuilt after meta-device initialisation, never in a checkpoint."""

import pytest
import torch

from based_layers.config import AttentionConfig, SlidingWindowConfig
from based_layers.mixers.attention import CausalSelfAttention
from based_layers.mixers.sliding_window import SlidingWindowAttention
from based_layers.packing import positions_in_doc
from based_layers.rotary import Rotary, apply_rotary


@pytest.mark.parametrize("rotary_dim", [16, 35, 0])
def test_table_path_equals_computed_angles_bit_for_bit(rotary_dim):
    """The parallel forward's table lookup and the decode step's computed angles agree exactly (odd rotary_dim
    rotates ceil(R/2)*2 channels, as flash-attn does; 0 leaves x alone)."""
    torch.manual_seed(0)
    rope = Rotary(rotary_dim, 10000.0)
    x = torch.randn(2, 37, 3, 40)
    doc_ids = torch.tensor([[0] * 20 + [1] * 17, [0] * 5 + [1] * 32])
    positions = positions_in_doc(doc_ids, 2, 37, x.device)
    expected = apply_rotary(x, positions, rotary_dim, 10000.0)
    assert torch.equal(rope(x, positions, in_sequence=True), expected)
    assert torch.equal(rope(x, positions), expected)


def test_positions_past_the_table_are_computed():
    """A decode step's absolute position can pass the table: computed, not read out of bounds; a sequence
    longer than the table computes its angles too."""
    rope = Rotary(8, 500.0, table_positions=16)
    x = torch.randn(1, 1, 2, 8, dtype=torch.float64)
    far = torch.tensor([[1000]])
    assert torch.equal(rope(x, far), apply_rotary(x, far, 8, 500.0))
    long = torch.arange(40).unsqueeze(0)
    x = torch.randn(1, 40, 2, 8)
    assert torch.equal(rope(x, long, in_sequence=True), apply_rotary(x, long, 8, 500.0))


def test_tables_stay_fp32_and_exact_through_casts_and_meta_init():
    fresh = Rotary(32, 10000.0)
    for cast in (torch.nn.Module.double, torch.nn.Module.bfloat16, torch.nn.Module.half):
        moved = cast(Rotary(32, 10000.0))
        assert moved.cos.dtype == torch.float32 and torch.equal(moved.cos, fresh.cos)
        assert torch.equal(moved.sin, fresh.sin)
    with torch.device("meta"):
        meta = Rotary(32, 10000.0)
    assert meta.cos.is_meta
    built = meta.to_empty(device="cpu")
    assert torch.equal(built.cos, fresh.cos) and torch.equal(built.sin, fresh.sin)


@pytest.mark.parametrize("mixer", [
    lambda: CausalSelfAttention(24, AttentionConfig(num_heads=2, rotary_fraction=0.5)),
    lambda: SlidingWindowAttention(24, SlidingWindowConfig(num_heads=2, window=8, backend="reference")),
], ids=["attention", "sliding_window"])
def test_tables_are_not_checkpointed(mixer):
    """The tables are derived state: checkpoints and exported weights keep the published names only."""
    module = mixer()
    assert set(module.state_dict()) == {"Wqkv.weight", "out_proj.weight"}
    assert {name for name, _ in module.named_buffers()} == {"rope.cos", "rope.sin"}
