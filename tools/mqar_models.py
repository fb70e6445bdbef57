"""The two-layer MQAR models: Zoology's exact block structure (the default) or our based_layers blocks.

"zoology" follows zoology/model.py and the Based paper's figure-2 config, with our sequence mixers inside:
- token embedding (no positions), dropout 0.1 on the embedding (layer 0's dropout1);
- Zoology's TransformerBlock with an Identity state mixer: residual += mixer(LayerNorm1(residual)), then the
  block *returns* LayerNorm2(residual) as its hidden states, which the next block (or the final step) adds to
  the residual again;
- layer 0: Zoology's BaseConv with a short filter: depthwise causal Conv1d (kernel 3, bias) of the input
  times a d x d Linear (bias) of the input, plus the input;
- layer 1: our Taylor LinearAttention (1 head, head_dim d, eps 1e-12; the same function as Zoology's Based)
  or our CausalSelfAttention without rotary (Zoology's MHA has biases and 0.1 attention dropout: not here);
- final LayerNorm (eps 1e-5), LM head tied to the embedding;
- init: Linear and Embedding weights N(0, 0.02), biases 0, the conv keeps PyTorch's default; the attention
  out_proj gets std 0.02 / sqrt(2 n_layers) (Zoology's rule matches the name "out_proj", which its Based
  mixer does not use, so the linear-attention out_proj keeps 0.02).

"based_layers" is our published-Based stack: RMSNorm pre-norm blocks without MLPs and the published BaseConv
(in_proj d -> 2d, conv on one half, SiLU gate, out_proj).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from based_layers import build_model
from based_layers.config import AttentionConfig, BaseConvConfig, LinearAttnConfig, ModelConfig
from based_layers.mixers.attention import CausalSelfAttention
from based_layers.mixers.linear_attention import LinearAttention

ARCHES = ("zoology", "based_layers")


class ZoologyBaseConv(nn.Module):
    """y = causal_depthwise_conv_k(u) * Linear(u) + u (Zoology's BaseConv, short filter, no activation)."""

    def __init__(self, d_model: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.projection = nn.Linear(d_model, d_model)
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, padding=kernel_size - 1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        conv = self.conv(u.transpose(1, 2))[..., : u.shape[1]].transpose(1, 2)
        return conv * self.projection(u) + u


class ZoologyBlock(nn.Module):
    """Pre-LN block whose state mixer is Identity: returns (LayerNorm2(residual), residual)."""

    def __init__(self, d_model: int, mixer: nn.Module, dropout: float) -> None:
        super().__init__()
        self.mixer = mixer
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None):
        dropped = self.dropout(hidden)
        residual = dropped if residual is None else dropped + residual
        residual = self.mixer(self.norm1(residual)) + residual
        return self.norm2(residual), residual


class ZoologyLM(nn.Module):
    """Embedding, BaseConv block, sequence-mixer block, final LayerNorm, tied head."""

    def __init__(self, vocab_size: int, d_model: int, mixer: nn.Module, embed_dropout: float = 0.1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList([ZoologyBlock(d_model, ZoologyBaseConv(d_model), embed_dropout),
                                     ZoologyBlock(d_model, mixer, 0.0)])
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights()
        self.lm_head.weight = self.embedding.weight

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, CausalSelfAttention):
                nn.init.normal_(module.out_proj.weight, std=0.02 / math.sqrt(2 * len(self.blocks)))

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embedding(input_ids), None
        for block in self.blocks:
            hidden, residual = block(hidden, residual)
        return self.ln_f(hidden + residual)


class BasedLayersLM(nn.Module):
    """Our LanguageModel behind the same two calls (`hidden`, `lm_head`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.lm_head = model.lm_head

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.model.transformer.embeddings(input_ids)
        for block in self.model.transformer.layers.values():
            h = block(h)
        return self.model.transformer.ln_f(h)


def _mixer_configs(mixer: str, d_model: int, feature_dim: int, la_backend: str) -> dict:
    if mixer == "linear_attn":
        return {"linear_attn": LinearAttnConfig(num_heads=1, feature_dim=feature_dim, head_dim=d_model, eps=1e-12,
                                                backend=la_backend)}
    if mixer == "attention":
        return {"attention": AttentionConfig(num_heads=1, rotary_fraction=0.0)}
    raise ValueError(f"mixer {mixer!r}: expected linear_attn or attention")


def build(arch: str, mixer: str, d_model: int, feature_dim: int, vocab_size: int, la_backend: str) -> nn.Module:
    """The two-layer MQAR model of `arch` with `mixer` ("linear_attn" or "attention") in layer 1."""
    configs = _mixer_configs(mixer, d_model, feature_dim, la_backend)
    if arch == "zoology":
        module = LinearAttention if mixer == "linear_attn" else CausalSelfAttention
        return ZoologyLM(vocab_size, d_model, module(d_model, configs[mixer], layer_idx=1))
    if arch == "based_layers":
        model_cfg = ModelConfig(family="mqar", d_model=d_model, n_layer=2, vocab_size=vocab_size,
                                pad_vocab_size_multiple=1, default_mixer="base_conv", mixer_layers={mixer: [1]},
                                mlp_hidden=0, base_conv=BaseConvConfig(expand=2, kernel_size=3, bias=True),
                                **configs)
        return BasedLayersLM(build_model(model_cfg))
    raise ValueError(f"mqar arch {arch!r}: expected one of {ARCHES}")
