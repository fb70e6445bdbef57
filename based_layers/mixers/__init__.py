"""Sequence mixers. Each maps [B, T, D] -> [B, T, D] and has a recurrent `step` form (docs/DESIGN.md)."""

from based_layers.mixers.attention import CausalSelfAttention
from based_layers.mixers.base_conv import BaseConv
from based_layers.mixers.linear_attention import LinearAttention, taylor_feature_map
from based_layers.mixers.mamba import Mamba
from based_layers.mixers.sliding_window import SlidingWindowAttention

MIXER_CLASSES = {
    "base_conv": BaseConv,
    "linear_attn": LinearAttention,
    "sliding_window": SlidingWindowAttention,
    "attention": CausalSelfAttention,
    "mamba": Mamba,
}

__all__ = ["MIXER_CLASSES", "BaseConv", "CausalSelfAttention", "LinearAttention", "Mamba",
           "SlidingWindowAttention", "taylor_feature_map"]
