"""Helpers shared by the data pipeline tests (fixtures are in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.prepare import PrepareConfig

MERGES = (
    "th",
    "he",
    "in",
    "er",
    "an",
    " t",
    " a",
    " the",
    "re",
    "on",
    "at",
    "en",
    "nd",
    "ed",
    "es",
    "or",
    "is",
    " w",
    " s",
    " c",
    "ou",
    "it",
    "al",
    "ar",
    "le",
    "ve",
    "as",
    " is",
    " a",
    " h",
    "ll",
    "ow",
)
UNICODE_TEXTS = (
    "Naïve café — déjà vu.\nSecond line\twith a tab, and emoji 🙂.",
    "日本語のテキストと English mixed <|endoftext|> inside the text.",
)


def tiny_ranks() -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 bytes, then a few merges (each a concatenation of existing tokens)."""
    ranks = {bytes([b]): b for b in range(256)}
    for merge in MERGES:
        token = merge.encode()
        if token not in ranks:
            ranks[token] = len(ranks)
    return ranks


def make_config(inputs: list[str], tokenizer: str, out: Path, **options) -> PrepareConfig:
    """A small prepare: 32-token rows, 40-sample shards, first 20 records for validation, no bar."""
    settings = {"seq_len": 32, "shard_samples": 40, "val_docs": 20, "progress": False, "workers": 1}
    settings.update(options)
    return PrepareConfig(inputs=inputs, tokenizer=tokenizer, out=str(out), **settings)


def read_manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())
