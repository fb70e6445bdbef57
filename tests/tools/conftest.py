"""Fixtures for the tools tests: tiny models of the three families saved as trainer checkpoints, tokenizers."""

import io
import os
import random
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# the dynamic-module cache of transformers (exported modeling code) goes to a private folder
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf_modules_"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from based_layers import build_model  # noqa: E402
from based_layers.config import (  # noqa: E402
    AttentionConfig,
    BaseConvConfig,
    LinearAttnConfig,
    MambaConfig,
    ModelConfig,
    SlidingWindowConfig,
)

VOCAB = 200


def tiny_config(family: str, vocab: int = VOCAB) -> ModelConfig:
    """Small models with every mixer of the family (Based: conv, LA, SWA, conv)."""
    if family == "based":
        return ModelConfig(family="based", d_model=32, n_layer=4, vocab_size=vocab, pad_vocab_size_multiple=8,
                           default_mixer="base_conv", mixer_layers={"linear_attn": [1], "sliding_window": [2]},
                           mlp_hidden=64, decay_buffer=True, base_conv=BaseConvConfig(expand=4, kernel_size=3),
                           linear_attn=LinearAttnConfig(num_heads=2, feature_dim=4),
                           sliding_window=SlidingWindowConfig(num_heads=2, window=6))
    if family == "attn":
        return ModelConfig(family="attn", d_model=32, n_layer=2, vocab_size=vocab, pad_vocab_size_multiple=16,
                           default_mixer="attention", mlp_hidden=80,
                           attention=AttentionConfig(num_heads=4, rotary_fraction=0.5))
    if family == "mamba":
        return ModelConfig(family="mamba", d_model=32, n_layer=2, vocab_size=vocab, pad_vocab_size_multiple=16,
                           default_mixer="mamba", mlp_hidden=0, init_scheme="mamba_ssm",
                           mamba=MambaConfig(d_state=4, d_conv=4, expand=2))
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, vocab: int = VOCAB):
    torch.manual_seed(seed)
    model = build_model(tiny_config(family, vocab)).eval()
    with torch.no_grad():  # larger weights than init so that logits are far from uniform
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "A_log" not in name:
                p.mul_(4.0)
    return model


def save_checkpoint(model, run_dir: Path, data_path: Path | str = "data/none", step: int = 7) -> Path:
    """A trainer-format checkpoint (DCP + meta.json) of `model` under run_dir/checkpoints/."""
    from pretrain.checkpoint import Checkpointer
    from pretrain.config import CheckpointConfig, DataConfig, TrainConfig, to_yaml

    cfg = TrainConfig(model=model.cfg, data=DataConfig(path=str(data_path), seq_len=64), device="cpu",
                      precision="fp32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt = Checkpointer(run_dir, CheckpointConfig(keep_last=0))
    state = {"step": step, "tokens_seen": 0, "skipped_steps": 0, "loader": {}, "world_size": 1}
    return ckpt.save(step, model, optimizer, state, to_yaml(cfg))


def train_sentencepiece(path: Path, vocab_size: int = VOCAB) -> Path:
    import sentencepiece

    rng = random.Random(0)
    words = ("Alice Bruno Chen lives in Oslo Lima Cairo the quick brown fox jumps over lazy dog her cat is called "
             "Pip Max and a baker teacher pilot one two three four five six seven eight nine ten").split()
    texts = [" ".join(rng.choice(words) for _ in range(14)) + ". 12 + 30 = 42, (x) [y]!?" for _ in range(400)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe", num_threads=1,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False, unk_id=0,
        bos_id=-1, eos_id=1, pad_id=-1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def write_manifest(data_dir: Path, spec: str) -> Path:
    """A minimal data folder whose manifest.json names the tokenizer (all the tools read of it)."""
    import json

    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "manifest.json").write_text(json.dumps({"tokenizer": {"spec": spec}}))
    return data_dir


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="session")
def native_runs(tmp_path_factory, sp_tokenizer) -> dict:
    """{family: run folder} with one checkpoint of a tiny model each, data manifest naming the tokenizer."""
    root = tmp_path_factory.mktemp("runs")
    data = write_manifest(root / "data", f"sentencepiece:{sp_tokenizer}")
    runs = {}
    for family in ("based", "attn", "mamba"):
        run = root / family
        save_checkpoint(tiny_model(family), run, data)
        runs[family] = run
    return runs
