"""Import the published checkpoints' format (hazyresearch/based-*, attn-*, mamba-*) into our model.

    python tools/import_hf.py --src DIR --out RUN_DIR

DIR holds the published `config.json` and `pytorch_model.bin` (or a `model.safetensors` conversion).
RUN_DIR gets a trainer checkpoint `checkpoints/step_00000000/` (the weights, a fresh optimizer state) and
`config.yaml`, so that continued pretraining is

    python -m pretrain.train RUN_DIR/config.yaml run_dir=RUN_DIR data.path=...   # resumes from step 0

and `tools/export_hf.py`, `tools/generate.py` and the lm-eval model accept RUN_DIR (or DIR itself). The run's
config names no data (`data.path` is empty) and records the published tokenizer, GPT-2's (`data.tokenizer:
tiktoken:gpt2`), for the tools. RUN_DIR must be new or empty.

What is mapped (docs: shared reference §3 "checkpoint / HF format"):
- Based: GPT2Config-style keys n_embd, n_layer, n_inner, vocab_size, pad_vocab_size_multiple,
  layer_norm_epsilon, alt_mixer_layers (linear attention), alt_mixer_2_layers (sliding window), mixer
  {expand_proj, kernel_size, use_bias}, alt_mixer {num_heads, feature_dim, parallel_implementation},
  alt_mixer_2 {num_heads, window_size}, rotary_emb_fraction/base, fixed_decay. The published code
  halves window_size (256 -> 128 previous tokens + self) and uses eps 1e-6 for "fla*" implementations,
  1e-12 otherwise; both are reproduced.
- Transformer++: the same GPT2Config keys, every layer full attention.
- Mamba (mamba-ssm MambaConfig): d_model, n_layer, vocab_size, ssm_cfg, pad_vocab_size_multiple,
  tie_embeddings; names backbone.embedding / backbone.layers.{i}.norm / backbone.norm_f are renamed to ours.
State dicts: a leading `model.` (Lightning) is stripped, `*metrics*` keys are dropped, the tied
embedding may appear under both names (they must be equal) or only as lm_head.weight; the MLP width
comes from the weights when `n_inner` is absent. The load is strict: a missing or extra key is an error.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from based_layers import LanguageModel, build_model  # noqa: E402
from based_layers.config import (  # noqa: E402
    AttentionConfig,
    BaseConvConfig,
    LinearAttnConfig,
    MambaConfig,
    ModelConfig,
    SlidingWindowConfig,
)

EMBEDDING = "transformer.embeddings.word_embeddings.weight"
_MAMBA_RENAMES = [
    (re.compile(r"^backbone\.embedding\.weight$"), EMBEDDING),
    (re.compile(r"^backbone\.layers\.(\d+)\.norm\.weight$"), r"transformer.layers.\1.norm1.weight"),
    (re.compile(r"^backbone\.layers\.(\d+)\.mixer\.(.+)$"), r"transformer.layers.\1.mixer.\2"),
    (re.compile(r"^backbone\.norm_f\.weight$"), "transformer.ln_f.weight"),
]


class PublishedFormatError(RuntimeError):
    """The published checkpoint cannot be mapped onto our model; the message names the key."""


def published_family(config: dict) -> str:
    """"based", "attn" or "mamba" from the keys of a published config.json."""
    if "ssm_cfg" in config or ("d_model" in config and "n_embd" not in config):
        return "mamba"
    if "n_embd" not in config:
        raise PublishedFormatError("config.json has neither n_embd (Based / attention) nor d_model (Mamba)")
    if any(k in config for k in ("mixer", "alt_mixer", "alt_mixer_layers", "alt_mixer_2_layers")):
        return "based"
    return "attn"


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a leading `model.` from every key and drop Lightning metric entries."""
    out = {}
    for key, value in state.items():
        if "metrics" in key:
            continue
        out[key[len("model."):] if key.startswith("model.") else key] = value
    return out


def _padded_vocab(config: dict, rows: int, vocab_key: str = "vocab_size") -> tuple[int, int]:
    """(vocab_size, pad_vocab_size_multiple) consistent with an embedding of `rows` rows."""
    vocab = int(config.get(vocab_key, rows))
    multiple = int(config.get("pad_vocab_size_multiple", 1))
    if math.ceil(vocab / multiple) * multiple == rows:
        return vocab, multiple
    for m in (1, 8, 16, 32, 64, 128):
        if math.ceil(vocab / m) * m == rows:
            return vocab, m
    raise PublishedFormatError(f"config.json vocab_size {vocab} (pad multiple {multiple}) does not fit the embedding's "
                       f"{rows} rows")


def _mlp_hidden(config: dict, state: dict, layer: int = 0) -> int:
    fc1 = state.get(f"transformer.layers.{layer}.mlp.fc1.weight")
    if fc1 is None:
        raise PublishedFormatError(f"no transformer.layers.{layer}.mlp.fc1.weight in the state dict")
    hidden = fc1.shape[0] // 2
    if config.get("n_inner") not in (None, hidden):
        raise PublishedFormatError(f"config.json n_inner {config['n_inner']} but mlp.fc1 has {fc1.shape[0]} rows (2 x hidden)")
    if config.get("activation_function", "swiglu") not in ("swiglu", "glu"):
        raise PublishedFormatError(f"activation_function {config['activation_function']!r}: only the SwiGLU MLP is supported")
    return hidden


def _common_gpt2(config: dict, state: dict) -> dict:
    if config.get("rotary_emb_interleaved", False):
        raise PublishedFormatError("rotary_emb_interleaved: true is not supported (the published models use false)")
    if config.get("scale_attn_by_inverse_layer_idx", False):
        raise PublishedFormatError("scale_attn_by_inverse_layer_idx: true is not supported")
    if not config.get("rms_norm", True):
        raise PublishedFormatError("rms_norm: false (LayerNorm) is not supported; the published models use RMSNorm")
    rows = state[EMBEDDING].shape[0]
    vocab, multiple = _padded_vocab(config, rows)
    return {"d_model": int(config["n_embd"]), "n_layer": int(config["n_layer"]), "vocab_size": vocab,
            "pad_vocab_size_multiple": multiple, "mlp_hidden": _mlp_hidden(config, state),
            "norm_eps": float(config.get("layer_norm_epsilon", 1e-5)),
            "tie_embeddings": bool(config.get("tie_word_embeddings", True))}


def based_model_config(config: dict, state: dict) -> ModelConfig:
    common = _common_gpt2(config, state)
    n_head = int(config.get("n_head", 16))
    mixer, la, swa = config.get("mixer") or {}, config.get("alt_mixer") or {}, config.get("alt_mixer_2") or {}
    implementation = str(la.get("parallel_implementation", "quadratic"))
    feature_dim = int(la.get("feature_dim", (la.get("feature_map") or {}).get("input_dim", 16)))
    la_heads = int(la.get("num_heads", n_head))
    window = int(swa.get("window_size", 256)) // 2
    rotary = float(config.get("rotary_emb_fraction", 0.0))
    return ModelConfig(
        family="based", default_mixer="base_conv",
        mixer_layers={"linear_attn": list(config.get("alt_mixer_layers") or []),
                      "sliding_window": list(config.get("alt_mixer_2_layers") or [])},
        decay_buffer=bool(config.get("fixed_decay", False)) and "transformer.decay.decay" in state,
        base_conv=BaseConvConfig(expand=int(mixer.get("expand_proj", 4)), kernel_size=int(mixer.get("kernel_size", 3)),
                                 bias=bool(mixer.get("use_bias", True))),
        linear_attn=LinearAttnConfig(num_heads=la_heads, feature_dim=feature_dim,
                                     head_dim=int(la.get("head_dim", 0) or 0),
                                     eps=1e-6 if "fla" in implementation else 1e-12),
        sliding_window=SlidingWindowConfig(num_heads=int(swa.get("num_heads", n_head)), window=window,
                                           rotary_fraction=rotary,
                                           rope_base=float(config.get("rotary_emb_base", 10000.0))),
        **common)


def attn_model_config(config: dict, state: dict) -> ModelConfig:
    common = _common_gpt2(config, state)
    return ModelConfig(family="attn", default_mixer="attention", mixer_layers={},
                       attention=AttentionConfig(num_heads=int(config.get("n_head", 16)),
                                                 rotary_fraction=float(config.get("rotary_emb_fraction", 0.0)),
                                                 rope_base=float(config.get("rotary_emb_base", 10000.0))),
                       **common)


def mamba_model_config(config: dict, state: dict) -> ModelConfig:
    if not config.get("rms_norm", True):
        raise PublishedFormatError("rms_norm: false (LayerNorm) is not supported for Mamba")
    ssm = dict(config.get("ssm_cfg") or {})
    if ssm.get("layer", "Mamba1") not in ("Mamba1", "Mamba"):
        raise PublishedFormatError(f"ssm_cfg.layer {ssm['layer']!r}: only Mamba (v1) is supported")
    rows = state[EMBEDDING].shape[0]
    vocab, multiple = _padded_vocab(config, rows)
    dt_rank = ssm.get("dt_rank", "auto")
    d_model = int(config.get("d_model", 2560))
    return ModelConfig(
        family="mamba", d_model=d_model, n_layer=int(config.get("n_layer", 64)), vocab_size=vocab,
        pad_vocab_size_multiple=multiple, default_mixer="mamba", mixer_layers={}, mlp_hidden=0,
        norm_eps=float(config.get("norm_epsilon", 1e-5)), init_scheme="mamba_ssm",
        tie_embeddings=bool(config.get("tie_embeddings", config.get("tie_word_embeddings", True))),
        mamba=MambaConfig(d_state=int(ssm.get("d_state", 16)), d_conv=int(ssm.get("d_conv", 4)),
                          expand=int(ssm.get("expand", 2)), dt_rank=0 if dt_rank == "auto" else int(dt_rank),
                          conv_bias=bool(ssm.get("conv_bias", True)), bias=bool(ssm.get("bias", False))))


def _rename_mamba(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for pattern, repl in _MAMBA_RENAMES:
            if pattern.match(key):
                key = pattern.sub(repl, key)
                break
        out[key] = value
    return out


def _resolve_tied(state: dict, tied: bool) -> dict:
    """Both tied names present and equal, or only one: return a dict with both (as a strict load wants)."""
    head = state.get("lm_head.weight")
    emb = state.get(EMBEDDING)
    if emb is None and head is None:
        raise PublishedFormatError(f"neither {EMBEDDING} nor lm_head.weight is in the state dict")
    if tied:
        if emb is not None and head is not None and not torch.equal(emb, head):
            raise PublishedFormatError(f"the config ties the embeddings but {EMBEDDING} and lm_head.weight differ")
        shared = emb if emb is not None else head
        state[EMBEDDING] = shared
        state["lm_head.weight"] = shared
    return state


def import_state_dict(config: dict, state: dict[str, torch.Tensor]) -> LanguageModel:
    """Our model (fp32 or the file's dtype, eval mode) from a published config.json dict and state dict."""
    family = published_family(config)
    state = clean_state_dict(state)
    if family == "mamba":
        state = _rename_mamba(state)
        tied = bool(config.get("tie_embeddings", config.get("tie_word_embeddings", True)))
    else:
        tied = bool(config.get("tie_word_embeddings", True))
    state = _resolve_tied(state, tied)
    builder = {"based": based_model_config, "attn": attn_model_config, "mamba": mamba_model_config}[family]
    cfg = builder(config, state)
    model = build_model(cfg)
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing from the checkpoint: {sorted(result.missing_keys)[:8]}")
    if result.unexpected_keys:
        problems.append(f"not used by the model: {sorted(result.unexpected_keys)[:8]}")
    if problems:
        raise PublishedFormatError(f"published {family} checkpoint does not match the model built from its config.json: "
                           + "; ".join(problems))
    dtype = state[EMBEDDING].dtype
    return model.to(dtype).eval()


def read_published(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, state dict) of a published-format folder; tensors are read without running pickled code."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise PublishedFormatError(f"{folder}: no config.json")
    config = json.loads(config_file.read_text())
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return config, load_file(str(folder / "model.safetensors"))
    weights = folder / "pytorch_model.bin"
    if not weights.is_file():
        raise PublishedFormatError(f"{folder}: neither model.safetensors nor pytorch_model.bin")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PublishedFormatError(f"{weights}: cannot be read as a plain tensor state dict ({err})") from err
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return config, state


def load_published(folder: str | Path) -> LanguageModel:
    config, state = read_published(Path(folder))
    return import_state_dict(config, state)


# every published checkpoint was trained on GPT-2 tokens (the Mamba configs declare 50277 rows, see
# tools/model_io.py); the tools refuse it for a model of another vocabulary size
PUBLISHED_TOKENIZER = "tiktoken:gpt2"
GPT2_VOCAB_SIZES = (50257, 50277)


def write_run(model: LanguageModel, run_dir: Path, source: str, tokenizer: str = "") -> Path:
    """A trainer checkpoint at step 0 of `model` plus RUN/config.yaml; returns the checkpoint folder.

    The run names no data (`data.path` is empty: continued pretraining sets it) and records the model's
    tokenizer as `data.tokenizer`, so the tools never take a data folder's tokenizer (data/tiny's) for it.
    """
    from pretrain.checkpoint import Checkpointer
    from pretrain.config import CheckpointConfig, DataConfig, TrainConfig, to_yaml

    _check_new_folder(run_dir)
    cfg = TrainConfig(run_name=run_dir.name, run_dir=str(run_dir), model=model.cfg,
                      data=DataConfig(path="", tokenizer=tokenizer))
    model = model.float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    train_state = {"step": 0, "tokens_seen": 0, "skipped_steps": 0, "loader": {"consumed_samples": 0},
                   "world_size": 1, "imported_from": source}
    yaml_text = to_yaml(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml_text)
    return Checkpointer(run_dir, CheckpointConfig(keep_last=0)).save(0, model, optimizer, train_state, yaml_text)


def _check_new_folder(run_dir: Path) -> None:
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise PublishedFormatError(f"--out {run_dir} exists and is not an empty folder; choose a new folder")


def published_tokenizer(src: Path, model: LanguageModel) -> str:
    """The tokenizer spec to record for an import of `src`, or "" (with a note) when it cannot be GPT-2's."""
    if model.cfg.vocab_size in GPT2_VOCAB_SIZES and not (src / "tokenizer.json").is_file():
        return PUBLISHED_TOKENIZER
    print(f"import_hf: note: {src} is not a GPT-2-vocabulary model (vocab_size {model.cfg.vocab_size}"
          f"{', has its own tokenizer.json' if (src / 'tokenizer.json').is_file() else ''}); no tokenizer is "
          "recorded: pass --tokenizer SPEC to the tools", file=sys.stderr)
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="folder with the published config.json and weights")
    parser.add_argument("--out", required=True, help="run folder to create (checkpoint at step 0 + config.yaml)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        _check_new_folder(out)  # before the (long) load of the weights
        model = load_published(args.src)
        tokenizer = published_tokenizer(Path(args.src), model)
        folder = write_run(model, out, str(Path(args.src).resolve()), tokenizer)
    except PublishedFormatError as err:
        print(f"import_hf: error: {err}", file=sys.stderr)
        return 1
    cfg = model.cfg
    print(f"imported {args.src} ({cfg.family}, {model.num_parameters():,} parameters, {cfg.n_layer} layers) -> {folder}"
          f"; tokenizer: {tokenizer or 'none recorded'}")
    print(f"continue pretraining: python -m pretrain.train {args.out}/config.yaml run_dir={args.out} data.path=DATA")
    return 0


if __name__ == "__main__":
    sys.exit(main())
