"""Fixtures for the data pipeline tests: tiny tokenizers built here (never downloaded) and small corpora."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from datatest_utils import UNICODE_TEXTS, make_config, tiny_ranks  # noqa: E402

from data_pipeline.prepare import prepare  # noqa: E402
from data_pipeline.tiny_corpus import generate_documents, train_sentencepiece, write_jsonl_zst  # noqa: E402
from data_pipeline.tokenizer import write_tiktoken_file  # noqa: E402


@pytest.fixture(scope="session")
def tiktoken_spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "tiny.tiktoken"
    write_tiktoken_file(path, tiny_ranks())
    return f"tiktoken:{path}"


@pytest.fixture(scope="session")
def sentencepiece_spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    train_sentencepiece(str(path), generate_documents(300, seed=7), vocab_size=300)
    return f"sentencepiece:{path}"


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    return list(UNICODE_TEXTS) + generate_documents(400, seed=1)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus_texts) -> str:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl.zst"
    write_jsonl_zst(str(path), corpus_texts)
    return str(path)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_file, tiktoken_spec) -> Path:
    """The test corpus prepared with the tiny tiktoken tokenizer (read-only for tests)."""
    out = tmp_path_factory.mktemp("prepared")
    prepare(make_config([corpus_file], tiktoken_spec, out))
    return out
