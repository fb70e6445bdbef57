"""Hugging Face wrapper of an exported based-pretrain model (Based, Transformer++ or Mamba).

The model itself is the bundled native code (based_layers_*.py, kernels_*.py in this folder, copied from
the based-pretrain repository by tools/export_hf.py), so the exported model computes exactly what the
native one does, on plain PyTorch. This file only adapts it to `transformers`:

- `forward(input_ids, attention_mask)` -> logits [B, T, vocab_size] (the padded vocabulary rows are cut off).
  A 0/1 attention mask is turned into document ids: each run of pads is its own document, so left
  padding never reaches the recurrent state (linear-attention state, conv tail, SSM state, window,
  KV cache) or the positions of the prompt.
- `generate` (greedy and sampling) runs the recurrent form: a parallel prefill, then one `step` per token
  with a constant-size state for Based and Mamba (a KV cache for attention). The state travels between
  steps as `recurrent_state`, not as a `transformers` Cache; beam search is therefore not offered.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import transformers
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.utils import ModelOutput

from .based_layers_config import ModelConfig
from .based_layers_model import LanguageModel
from .configuration_based import BasedConfig

_TRANSFORMERS_V5 = int(transformers.__version__.split(".")[0]) >= 5


def model_config_from_dict(values: dict) -> ModelConfig:
    """The native ModelConfig from its dict form (nested dataclasses for the mixer sections)."""
    defaults = ModelConfig()
    kwargs = {}
    for field in dataclasses.fields(ModelConfig):
        if field.name not in values:
            continue
        value = values[field.name]
        default = getattr(defaults, field.name)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = type(default)(**value)
        kwargs[field.name] = value
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"config.json based_model has keys this model code does not know: {unknown}")
    return ModelConfig(**kwargs)


def doc_ids_from_attention_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, T] 0/1 mask -> doc ids [B, T] (a new id wherever the mask changes), or None when all ones."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    mask = attention_mask.long()
    change = torch.zeros_like(mask)
    change[:, 1:] = (mask[:, 1:] != mask[:, :-1]).long()
    return change.cumsum(dim=1)


@dataclass
class BasedCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    recurrent_state: list | None = None


class BasedForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = BasedConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _is_stateful = True
    _supported_generation_modes = [GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE]
    _tied_weights_keys = ({"lm_head.weight": "transformer.embeddings.word_embeddings.weight"} if _TRANSFORMERS_V5
                          else ["lm_head.weight"])

    def __init__(self, config: BasedConfig) -> None:
        super().__init__(config)
        native = LanguageModel(model_config_from_dict(config.based_model))
        self.transformer = native.transformer
        self.lm_head = native.lm_head
        # the native model shares these modules; kept unregistered so parameter names stay the published ones
        object.__setattr__(self, "_native", native)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def _init_weights(self, module) -> None:
        """The native constructor already initialized every weight; loading overwrites them. RoPE's cos/sin
        tables are not weights (non-persistent buffers): transformers 5 gives them uninitialized memory when it
        loads, so they are computed again here."""
        if hasattr(module, "rebuild_tables"):
            module.rebuild_tables()

    def get_input_embeddings(self):
        return self.transformer.embeddings.word_embeddings

    def set_input_embeddings(self, value) -> None:
        self.transformer.embeddings.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value) -> None:
        self.lm_head = value
        self._native.lm_head = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                recurrent_state: list | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None, **kwargs) -> BasedCausalLMOutput:
        """input_ids [B, T] -> logits [B, T, vocab_size] (fp32); with `recurrent_state`, T must be 1."""
        native = self._native
        state = None
        if recurrent_state is not None:
            if input_ids.shape[1] != 1:
                raise ValueError(f"with recurrent_state, forward takes one new token per row; got {input_ids.shape[1]}")
            logits, state = native.step(input_ids[:, 0], recurrent_state)
            logits = logits.unsqueeze(1)
        elif use_cache:
            logits, state = native.prefill(input_ids, doc_ids=doc_ids_from_attention_mask(attention_mask))
        else:
            logits = native(input_ids, doc_ids=doc_ids_from_attention_mask(attention_mask))
        logits = logits[..., : self.config.vocab_size].float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return BasedCausalLMOutput(loss=loss, logits=logits, recurrent_state=state)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        model_kwargs["recurrent_state"] = outputs.recurrent_state
        return model_kwargs

    def prepare_inputs_for_generation(self, input_ids, recurrent_state=None, attention_mask=None, **kwargs):
        """Prefill with the whole (left-padded) prompt, then feed only the newest token with the state."""
        if recurrent_state is not None:
            return {"input_ids": input_ids[:, -1:], "recurrent_state": recurrent_state, "use_cache": True}
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "use_cache": kwargs.get("use_cache", True)}
