"""Model description: one dataclass tree, also the `model:` section of the training YAML.

The stack is a list of mixer names, one per layer (`ModelConfig.layer_mixers()`): `default_mixer`
everywhere except the layers listed in `mixer_layers`. Every block holds one mixer and, when
`mlp_hidden > 0`, a SwiGLU MLP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

MIXER_NAMES = ("base_conv", "linear_attn", "sliding_window", "attention", "mamba")
BACKENDS = ("auto", "reference", "triton")
# "auto" = the fused chunked loss on CUDA, the plain fp32-logits loss elsewhere
LOSS_IMPLS = ("auto", "plain", "fused_chunked", "liger")


def resolve_backend(choice: str, x) -> str:
    """`auto` -> the Triton kernels for CUDA tensors, plain PyTorch otherwise; other choices as given."""
    if choice != "auto":
        return choice
    return "triton" if x.is_cuda else "reference"


def use_fused_step(choice: str, module: nn.Module, x: torch.Tensor, *state: torch.Tensor) -> bool:
    """Whether a mixer's `step` runs the fused one-token kernel that updates its state in place: when the
    backend resolves to "triton" and autograd records nothing. The kernels write the state outside autograd,
    so a step with gradients on (for x, the state or the mixer's weights) takes the plain PyTorch form."""
    if resolve_backend(choice, x) != "triton":
        return False
    if not torch.is_grad_enabled():
        return True
    return not (x.requires_grad or any(t.requires_grad for t in state) or
                any(p.requires_grad for p in module.parameters()))


@dataclass
class BaseConvConfig:
    """Gated short convolution (published BaseConv): in_proj d -> expand*d, conv over the first half."""

    expand: int = 4
    kernel_size: int = 3
    bias: bool = True
    backend: str = "auto"


@dataclass
class LinearAttnConfig:
    """Taylor-feature-map linear attention. `head_dim` 0 means d_model / num_heads."""

    num_heads: int = 16
    feature_dim: int = 16
    head_dim: int = 0
    eps: float = 1e-12
    backend: str = "auto"


@dataclass
class SlidingWindowConfig:
    """Sliding-window softmax attention: a query sees `window` previous tokens plus itself.

    The published configs say 256 and the published code halves it: the released checkpoints see
    128 previous tokens + self, which is what `window: 128` means here.
    """

    num_heads: int = 16
    window: int = 128
    rotary_fraction: float = 1.0
    rope_base: float = 10000.0
    backend: str = "auto"


@dataclass
class AttentionConfig:
    """Full causal softmax attention (Transformer++), through torch SDPA."""

    num_heads: int = 16
    rotary_fraction: float = 0.5
    rope_base: float = 10000.0


@dataclass
class MambaConfig:
    """Mamba (S6) mixer. `dt_rank` 0 means ceil(d_model / 16). `backend: mamba_ssm` uses its CUDA kernels."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False
    backend: str = "reference"


@dataclass
class ModelConfig:
    """The whole language model.

    `init_scheme: published` reproduces the published init (std `init_std` for every Linear and
    Embedding, out_proj/fc2 re-drawn with std / sqrt(2 n_layer)); `small_init` uses the std the
    published code computed but never used, sqrt(2 / (5 d_model)), with the same rescale.
    `decay_buffer: true` adds the published based-1b buffer `transformer.decay.decay`, which changes
    no output (kept only so that checkpoints match key for key).
    `norm_backend` runs the RMSNorms (with the residual add before norm2) in plain PyTorch or the fused Triton
    kernel (auto: Triton on CUDA); `mlp_backend` likewise the MLP's SwiGLU (kernels/swiglu: one pass each way over
    fc1's [value | gate] output). `loss_impl` picks how the training loss is computed from the last hidden
    states: `plain` materialises fp32 logits [tokens, vocab]; `fused_chunked` (kernels/linear_cross_entropy)
    runs head + cross-entropy over `loss_chunk_size` tokens at a time and never holds all logits; `liger` is
    liger-kernel's LigerFusedLinearCrossEntropyLoss (optional package); auto: fused_chunked on CUDA.
    """

    family: str = "based"
    d_model: int = 1024
    n_layer: int = 27
    vocab_size: int = 50257
    pad_vocab_size_multiple: int = 8
    default_mixer: str = "base_conv"
    mixer_layers: dict[str, list[int]] = field(default_factory=dict)
    mlp_hidden: int = 2048
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    norm_backend: str = "auto"
    mlp_backend: str = "auto"
    loss_impl: str = "auto"
    loss_chunk_size: int = 4096
    init_scheme: str = "published"
    init_std: float = 0.02
    decay_buffer: bool = False
    base_conv: BaseConvConfig = field(default_factory=BaseConvConfig)
    linear_attn: LinearAttnConfig = field(default_factory=LinearAttnConfig)
    sliding_window: SlidingWindowConfig = field(default_factory=SlidingWindowConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return int(math.ceil(self.vocab_size / m) * m)

    def layer_mixers(self) -> list[str]:
        """The mixer name of every layer, index 0 first."""
        names = [self.default_mixer] * self.n_layer
        for mixer, layers in self.mixer_layers.items():
            for i in layers:
                names[i] = mixer
        return names

    def validate(self) -> list[str]:
        """Problems with this config, as `key: what is wrong` lines (empty when valid)."""
        errors: list[str] = []
        for name in [self.default_mixer, *self.mixer_layers]:
            if name not in MIXER_NAMES:
                errors.append(f"model.mixer_layers/default_mixer: unknown mixer {name!r}; expected one of {MIXER_NAMES}")
        seen: dict[int, str] = {}
        for mixer, layers in self.mixer_layers.items():
            for i in layers:
                if not 0 <= i < self.n_layer:
                    errors.append(f"model.mixer_layers.{mixer}: layer {i} outside 0..{self.n_layer - 1}")
                if i in seen:
                    errors.append(f"model.mixer_layers: layer {i} listed for both {seen[i]} and {mixer}")
                seen[i] = mixer
        used = set(self.layer_mixers()) if not errors else set()
        for mixer, heads in (("linear_attn", self.linear_attn.num_heads), ("sliding_window", self.sliding_window.num_heads),
                             ("attention", self.attention.num_heads)):
            if mixer in used and self.d_model % heads:
                errors.append(f"model.{mixer}.num_heads: {heads} does not divide d_model {self.d_model}")
        if self.init_scheme not in ("published", "small_init", "mamba_ssm"):
            errors.append(f"model.init_scheme: {self.init_scheme!r}; expected 'published', 'small_init' or 'mamba_ssm'")
        for sub in ("base_conv", "linear_attn", "sliding_window"):
            backend = getattr(self, sub).backend
            if backend not in BACKENDS:
                errors.append(f"model.{sub}.backend: {backend!r}; expected one of {BACKENDS}")
        for key in ("norm_backend", "mlp_backend"):
            if getattr(self, key) not in BACKENDS:
                errors.append(f"model.{key}: {getattr(self, key)!r}; expected one of {BACKENDS}")
        if self.loss_impl not in LOSS_IMPLS:
            errors.append(f"model.loss_impl: {self.loss_impl!r}; expected one of {LOSS_IMPLS}")
        if self.loss_chunk_size < 1:
            errors.append(f"model.loss_chunk_size: {self.loss_chunk_size}; expected a positive number of tokens")
        if self.mamba.backend not in ("reference", "mamba_ssm"):
            errors.append(f"model.mamba.backend: {self.mamba.backend!r}; expected 'reference' or 'mamba_ssm'")
        return errors
