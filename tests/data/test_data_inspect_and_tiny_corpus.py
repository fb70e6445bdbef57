"""inspect CLI, the deterministic tiny corpus, and the data pipeline's import boundaries."""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np
import pytest
from datatest_utils import read_manifest

from data_pipeline import inspect
from data_pipeline.errors import PrepareStateError
from data_pipeline.manifest import load_manifest
from data_pipeline.order import GlobalOrder
from data_pipeline.tiny_corpus import generate_documents, make_tiny_corpus
from data_pipeline.tokenizer import load_tokenizer

# sha256 of "\n".join(generate_documents(50, seed=0)): the corpus text must never change by accident.
TINY_CORPUS_SHA256 = "14a02a68c7522521"


def test_inspect_summary_verify_and_show(prepared, corpus_texts, tiktoken_spec, capsys):
    assert inspect.main([str(prepared), "--verify", "--show", "5", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    manifest = read_manifest(prepared)
    train = manifest["splits"]["train"]
    assert f"train: {len(train['shards'])} shards, {train['samples']:,} samples" in out
    assert "tiktoken:tiny.tiktoken" in out and "verify: " in out and " match the manifest" in out
    index = int(GlobalOrder(train["samples"], 3).samples(np.array([5]))[0])
    assert f"train position 5 (epoch 0) = sample {index}:" in out
    shown = out.split(f"= sample {index}:\n", 1)[1].rstrip("\n")
    pieces = shown.split(inspect.DOC_MARK)
    tok = load_tokenizer(tiktoken_spec)
    joined = "".join(corpus_texts)
    assert all(piece.replace(tok.decode([tok.eos_id]), "") in joined for piece in pieces if piece)


def test_tiny_corpus_text_is_fixed():
    text = "\n".join(generate_documents(50, seed=0))
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == TINY_CORPUS_SHA256
    assert generate_documents(5, seed=1) != generate_documents(5, seed=0)


def test_tiny_corpus_is_reproducible(tmp_path):
    first = make_tiny_corpus(str(tmp_path / "a"), docs=300, seq_len=64, shard_samples=64)
    second = make_tiny_corpus(str(tmp_path / "b"), docs=300, seq_len=64, shard_samples=64)
    assert first["splits"] == second["splits"]
    assert first["tokenizer"]["vocab_hash"] == second["tokenizer"]["vocab_hash"]
    assert first["tokenizer"]["vocab_size"] == 512
    assert first["splits"]["val"]["documents"] == 15 and first["splits"]["train"]["samples"] > 64
    assert make_tiny_corpus(str(tmp_path / "a"), docs=300, seq_len=64, shard_samples=64) == first
    with pytest.raises(PrepareStateError, match="delete it first"):
        make_tiny_corpus(str(tmp_path / "a"), docs=301, seq_len=64, shard_samples=64)
    manifest = load_manifest(str(tmp_path / "a"))
    shown = inspect.show(manifest, "val", 0, 0, None).split("\n", 1)[1]
    assert generate_documents(300, seed=0)[0].startswith(shown[:100])


def test_no_model_or_distributed_imports():
    folder = pathlib.Path(__file__).resolve().parents[2] / "data_pipeline"
    for path in folder.glob("*.py"):
        source = path.read_text()
        for forbidden in ("torch.distributed", "based_layers", "kernels", "pretrain"):
            assert f"import {forbidden}" not in source and f"from {forbidden}" not in source, (
                path,
                forbidden,
            )


def test_plain_jsonl_tiny_corpus_has_the_same_samples(tmp_path):
    """--no-zstd (a machine without zstandard) writes the source uncompressed: the same tokenizer and the same
    samples in the same order; the recipe records the choice, so the two folders are never mixed up."""
    zst = make_tiny_corpus(str(tmp_path / "zst"), docs=200, seq_len=64, shard_samples=64)
    plain = make_tiny_corpus(str(tmp_path / "plain"), docs=200, seq_len=64, shard_samples=64, zstd=False)
    assert (tmp_path / "plain" / "source" / "tiny_corpus.jsonl").is_file()
    assert not (tmp_path / "plain" / "source" / "tiny_corpus.jsonl.zst").exists()
    assert plain["tokenizer"]["vocab_hash"] == zst["tokenizer"]["vocab_hash"]
    # the splits record each shard's sha256 and the checksum of every sample: the same tokens, the same order
    assert plain["splits"] == zst["splits"]
    with pytest.raises(PrepareStateError, match="delete it first"):
        make_tiny_corpus(str(tmp_path / "zst"), docs=200, seq_len=64, shard_samples=64, zstd=False)
