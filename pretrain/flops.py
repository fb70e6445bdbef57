"""Architecture-aware FLOPs model: forward FLOPs per token, by component, for a sequence length T.

Counted (2 FLOPs per multiply-add) are the products that do the work: every projection, the MLP, the
LM head, the depthwise convolutions, and each mixer's mixing done the efficient way:
- Taylor linear attention, chunked (chunk C): intra-chunk q.k and scores.v over the causal half of a chunk,
  inter-chunk state update and read-out on the 1 + F + F(F+1)/2 symmetric features (153 for F = 16, the
  cheapest exact form), normalizer included;
- sliding-window attention: only the keys inside the window (t - W .. t);
- causal attention: only the causal half;
- Mamba's selective scan: 9 FLOPs per channel and state (discretize, update, read out), as mamba-ssm counts.
Elementwise work (norms, activations, the feature expansion, softmax) is not counted. Training FLOPs are
3x forward (backward = 2x forward), with no recomputation counted.
"""

from __future__ import annotations

import math

from based_layers.config import ModelConfig

LA_CHUNK = 64


def _linear(n_in: int, n_out: int) -> int:
    return 2 * n_in * n_out


def _mean_keys_causal(seq_len: int, window: int | None = None) -> float:
    """Mean number of keys a query sees under a causal (optionally windowed: W previous + self) mask."""
    if window is None or window + 1 >= seq_len:
        return (seq_len + 1) / 2
    full = window + 1
    ramp = sum(range(1, full))  # positions 0..W-1 see 1..W keys
    return (ramp + (seq_len - window) * full) / seq_len


def mixer_flops(cfg: ModelConfig, name: str, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one mixer, split into `proj` (linear layers) and `mix` (the mixing)."""
    d = cfg.d_model
    if name == "base_conv":
        c = cfg.base_conv
        d_inner = c.expand * d // 2
        return {"proj": _linear(d, 2 * d_inner) + _linear(d_inner, d), "mix": 2 * c.kernel_size * d_inner}
    if name == "linear_attn":
        c = cfg.linear_attn
        dv = c.head_dim or d // c.num_heads
        f = c.feature_dim
        n_feat = 1 + f + f * (f + 1) // 2
        intra = 2 * _mean_keys_causal(min(LA_CHUNK, seq_len)) * (f + dv + 1)
        inter = 2 * n_feat * (dv + 1) * 2
        proj = 2 * _linear(d, c.num_heads * f) + _linear(d, c.num_heads * dv) + _linear(c.num_heads * dv, d)
        return {"proj": proj, "mix": c.num_heads * (intra + inter)}
    if name in ("sliding_window", "attention"):
        c = getattr(cfg, name)
        window = cfg.sliding_window.window if name == "sliding_window" else None
        mix = 4 * d * _mean_keys_causal(seq_len, window)
        return {"proj": _linear(d, 3 * d) + _linear(d, d), "mix": mix}
    if name == "mamba":
        c = cfg.mamba
        di = c.expand * d
        rank = c.dt_rank or math.ceil(d / 16)
        proj = _linear(d, 2 * di) + _linear(di, rank + 2 * c.d_state) + _linear(rank, di) + _linear(di, d)
        return {"proj": proj, "mix": 2 * c.d_conv * di + 9 * di * c.d_state}
    raise ValueError(f"unknown mixer {name!r}")


def forward_flops_breakdown(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token: {'mixer_proj', 'mixer_mix', 'mlp', 'lm_head'}."""
    out = {"mixer_proj": 0.0, "mixer_mix": 0.0, "mlp": 0.0, "lm_head": float(_linear(cfg.d_model, cfg.padded_vocab_size))}
    for name in cfg.layer_mixers():
        parts = mixer_flops(cfg, name, seq_len)
        out["mixer_proj"] += parts["proj"]
        out["mixer_mix"] += parts["mix"]
        if cfg.mlp_hidden:
            out["mlp"] += _linear(cfg.d_model, 2 * cfg.mlp_hidden) + _linear(cfg.mlp_hidden, cfg.d_model)
    return out


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token (3x forward)."""
    return 3.0 * sum(forward_flops_breakdown(cfg, seq_len).values())
