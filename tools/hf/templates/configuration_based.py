"""Configuration of an exported based-pretrain model (written by tools/export_hf.py).

`based_model` is the native `ModelConfig` as a dict (see based_layers_config.py in this folder);
`vocab_size` is the tokenizer's vocabulary (the logits the model returns), `hidden_size` and
`num_hidden_layers` are informational copies for tools that read them.
"""

from transformers import PretrainedConfig


class BasedConfig(PretrainedConfig):
    model_type = "based_pretrain"

    def __init__(self, based_model: dict | None = None, vocab_size: int | None = None, hidden_size: int | None = None,
                 num_hidden_layers: int | None = None, tie_word_embeddings: bool = True, use_cache: bool = True,
                 **kwargs):
        self.based_model = dict(based_model or {})
        self.vocab_size = vocab_size if vocab_size is not None else self.based_model.get("vocab_size")
        self.hidden_size = hidden_size if hidden_size is not None else self.based_model.get("d_model")
        self.num_hidden_layers = num_hidden_layers if num_hidden_layers is not None else self.based_model.get("n_layer")
        self.tie_word_embeddings = tie_word_embeddings
        self.use_cache = use_cache
        super().__init__(**kwargs)
