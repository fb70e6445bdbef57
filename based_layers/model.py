"""The language model: embeddings -> blocks (one mixer each, per `ModelConfig.layer_mixers()`) -> RMSNorm -> tied head.

Parameter names follow the published Based / flash-attn GPT checkpoints (`transformer.embeddings.word_embeddings`,
`transformer.layers.{i}.{norm1,mixer,norm2,mlp}`, `transformer.ln_f`, `lm_head`). Layers live in a ModuleDict keyed
by their index so that a pipeline stage holding a subset of layers keeps the same names.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from based_layers.block import Block
from based_layers.config import ModelConfig
from based_layers.loss import LinearCrossEntropy
from based_layers.mixers import MIXER_CLASSES
from based_layers.norm import RMSNorm


class Embeddings(nn.Module):
    def __init__(self, vocab: int, d_model: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d_model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class DecayBuffer(nn.Module):
    """The published based-1b buffer `transformer.decay.decay` [n_head]: log(1 - 2^(-3-h)); it changes no output."""

    def __init__(self, n_head: int = 16) -> None:
        super().__init__()
        h = torch.arange(n_head, dtype=torch.float32)
        self.register_buffer("decay", torch.log(1 - 2.0 ** (-3 - h)), persistent=True)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict()
        for i, name in enumerate(cfg.layer_mixers()):
            mixer = MIXER_CLASSES[name](cfg.d_model, getattr(cfg, name), i)
            self.layers[str(i)] = Block(cfg.d_model, mixer, cfg.mlp_hidden, cfg.norm_eps, cfg.residual_in_fp32,
                                        cfg.norm_backend, cfg.mlp_backend)
        self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_backend)
        if cfg.decay_buffer:
            self.decay = DecayBuffer(cfg.linear_attn.num_heads)


class LanguageModel(nn.Module):
    """forward(input_ids [B, T], doc_ids [B, T] | None) -> logits [B, T, V_padded];
    forward(..., labels=[B, T]) -> the mean cross-entropy, by `cfg.loss_impl` (`loss_head`), without logits.

    Pipeline stages may drop `transformer.embeddings` (the input is then hidden states [B, T, D]) or
    `transformer.ln_f`/`lm_head` (the output is then hidden states).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        errors = cfg.validate()
        if errors:
            raise ValueError("invalid model config:\n  " + "\n  ".join(errors))
        self.cfg = cfg
        self.transformer = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.loss_head = LinearCrossEntropy(cfg.loss_impl, cfg.loss_chunk_size)
        init_weights(self, cfg)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.embeddings.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.transformer.embeddings(input_ids) if self.transformer.embeddings is not None else input_ids
        for block in self.transformer.layers.values():
            h = block(h, doc_ids=doc_ids)
        if labels is None:
            return self._head(h)
        if self.lm_head is None or self.transformer.ln_f is None:
            raise ValueError("forward(labels=...) needs the final norm and the head (the last pipeline stage)")
        return self.loss_head(self.transformer.ln_f(h), self.lm_head.weight, labels)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        if self.transformer.ln_f is not None:
            h = self.transformer.ln_f(h)
        if self.lm_head is not None:
            h = self.lm_head(h)
        return h

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[dict]:
        """Empty recurrent state of every layer (constant size except the attention KV cache)."""
        return [blk.mixer.init_state(batch_size, torch.device(device), dtype) for blk in self.transformer.layers.values()]

    def prefill(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None):
        """Parallel form over a prompt: -> (logits [B, T, V], state after the last token)."""
        h = self.transformer.embeddings(input_ids)
        states = []
        for block in self.transformer.layers.values():
            h, state = block(h, doc_ids=doc_ids, return_state=True)
            states.append(state)
        return self._head(h), states

    def step(self, input_ids: torch.Tensor, state: list[dict], reset: torch.Tensor | None = None):
        """Recurrent form, one token per row: input_ids [B] -> (logits [B, V], new state).

        `reset` [B] bool starts a new document at this token (state cleared first).
        """
        h = self.transformer.embeddings(input_ids)
        new_state = []
        for block, layer_state in zip(self.transformer.layers.values(), state, strict=True):
            h, layer_state = block.step(h, layer_state, reset)
            new_state.append(layer_state)
        return self._head(h), new_state

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied matrix counted once)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.transformer.embeddings.word_embeddings.weight.numel()
            if not self.cfg.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total


@torch.no_grad()
def init_weights(model: LanguageModel, cfg: ModelConfig) -> None:
    """Weight init by `cfg.init_scheme`.

    published / small_init: N(0, std) for Linear and Embedding weights, zero biases, `out_proj`/`fc2` re-drawn
    with std / sqrt(2 L) (std 0.02, or sqrt(2 / (5 d)) for small_init). mamba_ssm: mamba-ssm's init (Linear
    weights keep PyTorch's default, Embedding N(0, 0.02), out_proj kaiming-uniform / sqrt(L)).
    Conv1d weights keep PyTorch's default; Mamba's dt_proj/A_log/D keep mamba-ssm's init in every scheme.
    """
    if cfg.init_scheme == "mamba_ssm":
        _init_mamba_ssm(model, cfg)
        return
    std = cfg.init_std if cfg.init_scheme == "published" else math.sqrt(2.0 / (5 * cfg.d_model))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("dt_proj"):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
    for name, param in model.named_parameters():
        if name.endswith("out_proj.weight") or name.endswith("fc2.weight"):
            nn.init.normal_(param, std=std / math.sqrt(2 * cfg.n_layer))


def _init_mamba_ssm(model: LanguageModel, cfg: ModelConfig) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is not None and not name.endswith("dt_proj"):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=cfg.init_std)
    for name, param in model.named_parameters():
        if name.endswith("out_proj.weight"):
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
            param /= math.sqrt(cfg.n_layer)


def build_model(cfg: ModelConfig) -> LanguageModel:
    """Build the model described by `cfg` (on the current default device and dtype)."""
    return LanguageModel(cfg)
