"""Based, Transformer++ and Mamba language models as plain nn.Modules (no training, no I/O)."""

from based_layers.config import (
    AttentionConfig,
    BaseConvConfig,
    LinearAttnConfig,
    MambaConfig,
    ModelConfig,
    SlidingWindowConfig,
)
from based_layers.model import LanguageModel, build_model

__all__ = ["AttentionConfig", "BaseConvConfig", "LanguageModel", "LinearAttnConfig", "MambaConfig", "ModelConfig",
           "SlidingWindowConfig", "build_model"]
