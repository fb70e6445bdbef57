"""Before step 0: the prepared data that `data.path` names must be the data the config describes.

The loader reads whatever the shards hold, so a config that disagrees with them would train silently
wrong (`data.seq_len=64` on 128-token samples: wrong token counts, throughput and FLOPs) or fail late
(token ids past the embedding: a bare IndexError; no validation split: an error at the first validation).
`check_data_matches_config` compares data.path's manifest.json with the config and raises a ConfigError
that names the manifest, its key and the config key.
"""

from __future__ import annotations

from data_pipeline.errors import DataError
from data_pipeline.manifest import Manifest, load_manifest
from data_pipeline.tokenizer import token_dtype
from pretrain.config import ConfigError, TrainConfig

TOKENIZER_KEYS = ("spec", "name", "vocab_size", "eos_id", "vocab_hash")


def check_data_matches_config(cfg: TrainConfig) -> Manifest:
    """The manifest of `cfg.data.path`; ConfigError at the first disagreement with `cfg`.

    Checks: the manifest loads; its `seq_len` is `data.seq_len`; its `tokenizer` record is complete and
    consistent (eos id inside the vocabulary, `token_dtype` able to hold every id); the tokenizer's ids fit
    the model (`tokenizer.vocab_size` <= `model.vocab_size`; a larger model vocabulary is allowed, as the
    published Mamba recipe uses 50277 rows for GPT-2's 50257 tokens); a `val` split exists when
    `logging.val_interval` > 0.
    """
    try:
        manifest = load_manifest(cfg.data.path)
    except DataError as err:
        raise ConfigError(f"data.path={cfg.data.path}: {err}") from None
    _check_seq_len(cfg, manifest)
    _check_tokenizer(cfg, manifest)
    _check_val_split(cfg, manifest)
    return manifest


def _check_seq_len(cfg: TrainConfig, manifest: Manifest) -> None:
    if manifest.seq_len != cfg.data.seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} but {manifest.where} has seq_len {manifest.seq_len} (its samples "
            f"hold {manifest.seq_len + 1} tokens): set data.seq_len={manifest.seq_len}, or prepare the data "
            f"again with --seq-len {cfg.data.seq_len}"
        )


def _check_tokenizer(cfg: TrainConfig, manifest: Manifest) -> None:
    tok = manifest.data.get("tokenizer")
    missing = [key for key in TOKENIZER_KEYS if not isinstance(tok, dict) or key not in tok]
    if missing:
        raise ConfigError(f"{manifest.where}: key tokenizer lacks {missing}; prepare the data again")
    where = f"{manifest.where} (tokenizer {tok['name']}, {tok['spec']})"
    if not 0 <= tok["eos_id"] < tok["vocab_size"]:
        raise ConfigError(
            f"{where}: tokenizer.eos_id {tok['eos_id']} is outside tokenizer.vocab_size "
            f"{tok['vocab_size']}; the manifest is corrupt: prepare the data again"
        )
    dtype = manifest.data.get("token_dtype")
    if dtype != manifest.layout.dtype or (dtype == "uint16" and token_dtype(tok["vocab_size"]) != dtype):
        raise ConfigError(
            f"{where}: token_dtype {dtype!r} (layout {manifest.layout.dtype!r}) cannot hold "
            f"tokenizer.vocab_size {tok['vocab_size']}; the manifest is corrupt: prepare the data again"
        )
    if tok["vocab_size"] > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} but {where} has tokenizer.vocab_size {tok['vocab_size']}: "
            f"token ids up to {tok['vocab_size'] - 1} have no embedding row. Set model.vocab_size="
            f"{tok['vocab_size']} (or more), or point data.path at data prepared with this model's tokenizer"
        )


def _check_val_split(cfg: TrainConfig, manifest: Manifest) -> None:
    if cfg.logging.val_interval > 0:
        try:
            manifest.split("val")
        except DataError as err:
            raise ConfigError(
                f"logging.val_interval={cfg.logging.val_interval} needs a validation split: {err}; "
                "or set logging.val_interval=0"
            ) from None
