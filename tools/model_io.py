"""Load a model and its tokenizer from any of the folders the tools accept.

- a trainer run folder or checkpoint folder (`pretrain.checkpoint.load_model_for_export`); the tokenizer
  is the one named by the training data's manifest.json (`data.path` of the run's config);
- a folder written by tools/export_hf.py (config.json with `based_model`, model.safetensors, tokenizer.json);
- a published-format folder (config.json of the Based / attention / Mamba checkpoints with
  pytorch_model.bin or model.safetensors; see tools/import_hf.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from based_layers import LanguageModel, ModelConfig


class ModelLoadError(RuntimeError):
    """The folder cannot be loaded as a model; the message says why and what to pass instead."""


@dataclass
class LoadedModel:
    model: LanguageModel
    kind: str  # "native", "export" or "published"
    path: Path
    tokenizer_spec: str | None = None  # a data_pipeline tokenizer spec
    tokenizer_dir: Path | None = None  # a folder with tokenizer.json / tokenizer_config.json
    seq_len: int | None = None
    step: int | None = None
    checkpoint_dir: Path | None = None  # the trainer checkpoint folder that was loaded (native only)


def folder_kind(path: Path) -> str:
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        return "export" if "based_model" in config else "published"
    return "native"


def load_model(path: str | Path) -> LoadedModel:
    """The model (CPU, fp32 unless the files say otherwise, eval mode) and where its tokenizer is."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such folder")
    kind = folder_kind(path)
    if kind == "native":
        return _load_native(path)
    if kind == "export":
        return _load_export(path)
    from tools.import_hf import load_published

    model = load_published(path)
    tok_dir = path if (path / "tokenizer.json").is_file() else None
    return LoadedModel(model.eval(), "published", path, tokenizer_dir=tok_dir,
                       tokenizer_spec=None if tok_dir else "tiktoken:gpt2", seq_len=2048)


def _load_native(path: Path) -> LoadedModel:
    from torch.distributed.checkpoint.api import CheckpointException

    from pretrain.checkpoint import load_native

    try:
        # verified against meta.json, read without running stored code, older checkpoints tried next
        cfg, model, folder = load_native(path)
    # DCP's CheckpointException derives from BaseException, and its message holds a whole traceback
    except (Exception, CheckpointException) as err:
        raise ModelLoadError(_condense(str(err))) from err
    meta = json.loads((folder / "meta.json").read_text())
    spec = tokenizer_spec_of_data(cfg.data.path) or cfg.data.tokenizer or None
    return LoadedModel(model.eval(), "native", path, tokenizer_spec=spec, seq_len=cfg.data.seq_len,
                       step=meta.get("step"), checkpoint_dir=folder)


def _condense(message: str) -> str:
    """The first line and, when the message carries a traceback, its last line (the actual cause)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if "Traceback" not in message or len(lines) < 2:
        return message
    return f"{lines[0].split('CheckpointException')[0].rstrip(': ')}: {lines[-1]}"


def tokenizer_spec_of_data(data_dir: str | Path) -> str | None:
    """The tokenizer spec recorded in DATA/manifest.json, or None when the folder is not there (or the run
    names none: an imported model's `data.path` is empty)."""
    if not str(data_dir):
        return None
    manifest = Path(data_dir) / "manifest.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text())["tokenizer"]["spec"]


def model_config_from_dict(values: dict) -> ModelConfig:
    """ModelConfig from its dict form (the `based_model` entry of an exported config.json)."""
    import dataclasses

    defaults = ModelConfig()
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ModelLoadError(f"based_model has keys that ModelConfig does not know: {unknown}")
    kwargs = {}
    for key, value in values.items():
        default = getattr(defaults, key)
        kwargs[key] = type(default)(**value) if dataclasses.is_dataclass(default) and isinstance(value, dict) else value
    return ModelConfig(**kwargs)


def _load_export(path: Path) -> LoadedModel:
    from safetensors.torch import load_file

    from based_layers import build_model

    config = json.loads((path / "config.json").read_text())
    cfg = model_config_from_dict(config["based_model"])
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(f"{path}: no model.safetensors")
    state = load_file(str(weights))
    if cfg.tie_embeddings:
        state.setdefault("lm_head.weight", state["transformer.embeddings.word_embeddings.weight"])
    model = build_model(cfg)
    dtype = next(iter(state.values())).dtype
    model.load_state_dict(state, strict=True)
    model = model.to(dtype)
    tok_dir = path if (path / "tokenizer.json").is_file() else None
    return LoadedModel(model.eval(), "export", path, tokenizer_dir=tok_dir,
                       seq_len=config.get("max_position_embeddings"))


class DirTokenizer:
    """A tokenizer.json folder (as written by the exporter) behind our tokenizer interface."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        eos = config.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        self.eos_id = self.tokenizer.token_to_id(eos) if eos else None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.name = config.get("based_pretrain_tokenizer_spec", f"hf:{folder.name}")
        self.spec = f"hf:{folder / 'tokenizer.json'}"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer_for(loaded: LoadedModel, spec: str | None = None):
    """The tokenizer to use with `loaded`: `spec` when given, else the one the folder names. A tokenizer
    whose vocabulary is not the model's is refused (its ids would index the wrong embedding rows, or the
    model's ids would not decode)."""
    from data_pipeline.tokenizer import load_tokenizer

    if spec:
        tokenizer, named = load_tokenizer(spec), "--tokenizer"
    elif loaded.tokenizer_dir is not None:
        tokenizer, named = DirTokenizer(loaded.tokenizer_dir), str(loaded.tokenizer_dir / "tokenizer.json")
    elif loaded.tokenizer_spec:
        tokenizer, named = load_tokenizer(loaded.tokenizer_spec), "the run's data manifest or data.tokenizer"
    else:
        raise ModelLoadError(f"{loaded.path}: cannot tell which tokenizer this model uses (the training data's "
                             "manifest.json is not where the run's config says); pass --tokenizer SPEC, e.g. "
                             "sentencepiece:/path/tokenizer.model or tiktoken:gpt2")
    check_vocabulary(tokenizer, loaded.model.cfg.vocab_size, str(loaded.path), named)
    return tokenizer


# the published Mamba configs keep mamba-ssm's default vocab_size (50277, the GPT-NeoX size) although they
# were trained on GPT-2 tokens (50257): their rows 50257.. are unused (shared reference, "Mamba configs")
_PUBLISHED_SUPERSETS = {50277: 50257}


def check_vocabulary(tokenizer, model_vocab: int, where: str, named: str) -> None:
    """ModelLoadError unless the tokenizer's vocabulary size is the model's `vocab_size`."""
    size = tokenizer.vocab_size
    if size == model_vocab or _PUBLISHED_SUPERSETS.get(model_vocab) == size:
        return
    raise ModelLoadError(f"{where}: the tokenizer {getattr(tokenizer, 'name', '?')} (from {named}) has {size} "
                         f"tokens but the model's vocabulary is {model_vocab}: not this model's tokenizer; pass "
                         "--tokenizer SPEC of the tokenizer the model was trained with")


def to_device(model: LanguageModel, device: str, dtype: str | torch.dtype) -> LanguageModel:
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return model.to(device=device, dtype=dtype)
