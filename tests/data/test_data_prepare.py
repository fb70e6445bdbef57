"""prepare: round trip, formats, determinism across workers, resume after an interruption."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from datatest_utils import make_config, read_manifest

import data_pipeline.prepare as prepare_module
from data_pipeline.errors import PrepareStateError
from data_pipeline.loader import SampleStore
from data_pipeline.manifest import load_manifest
from data_pipeline.prepare import prepare
from data_pipeline.tiny_corpus import write_jsonl_zst
from data_pipeline.tokenizer import load_tokenizer


def split_tokens(folder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All samples of a split in sample order, flattened: tokens [N*(L+1)] and is_start [N*(L+1)]."""
    store = SampleStore(load_manifest(str(folder)), split)
    tokens, is_start = store.read(np.arange(store.num_samples))
    return tokens.reshape(-1), is_start.reshape(-1)


def expected_stream(texts: list[str], spec: str) -> list[int]:
    tok = load_tokenizer(spec)
    return [t for text in texts for t in [*tok.encode(text), tok.eos_id]]


def test_round_trip_jsonl_zst(prepared, corpus_texts, tiktoken_spec):
    """Every token of the input is in exactly one sample (in sample order), and decodes to the source."""
    manifest = read_manifest(prepared)
    tok = load_tokenizer(tiktoken_spec)
    for split, texts in (("val", corpus_texts[:20]), ("train", corpus_texts[20:])):
        tokens, is_start = split_tokens(prepared, split)
        stream = expected_stream(texts, tiktoken_spec)
        entry = manifest["splits"][split]
        assert entry["dropped_tail_tokens"] == len(stream) - len(tokens) < 33
        assert tokens.tolist() == stream[: len(tokens)]
        assert entry["documents"] == len(texts) and entry["input_tokens"] == len(stream)
        starts = np.flatnonzero(is_start)
        ends = np.flatnonzero(tokens == tok.eos_id) + 1
        assert starts.tolist() == [0, *ends[ends < len(tokens)].tolist()]
        decoded = [
            tok.decode(tokens[a : b - 1].tolist()) for a, b in zip(starts[: len(ends)], ends, strict=True)
        ]
        assert decoded == texts[: len(decoded)] and len(decoded) >= len(texts) - 1


def test_manifest_contents(prepared, corpus_file, tiktoken_spec):
    manifest = read_manifest(prepared)
    tok = load_tokenizer(tiktoken_spec)
    assert manifest["tokenizer"]["vocab_hash"] == tok.vocab_hash
    assert manifest["seq_len"] == 32 and manifest["token_dtype"] == "uint16" and manifest["seed"] == 0
    assert manifest["inputs"] == [{"path": corpus_file, "bytes": os.path.getsize(corpus_file)}]
    for split in manifest["splits"].values():
        assert all(s["samples"] == 40 for s in split["shards"][:-1])
        assert sum(s["samples"] for s in split["shards"]) == split["samples"]
        assert all(len(s["sha256"]) == 64 and s["tokens"] == 33 * s["samples"] for s in split["shards"])
    assert not (prepared / ".prepare").exists()


def test_workers_give_identical_shards(tmp_path, prepared, corpus_file, tiktoken_spec):
    prepare(make_config([corpus_file], tiktoken_spec, tmp_path / "w2", workers=2, chunk_records=16))
    assert read_manifest(tmp_path / "w2")["splits"] == read_manifest(prepared)["splits"]


@pytest.mark.parametrize("fail_at,background", [(1, 0), (5, 0), (6, 3)], ids=["val", "train", "train-bg3"])
def test_interrupted_prepare_resumes_to_identical_shards(
    fail_at, background, tmp_path, monkeypatch, prepared, corpus_file, tiktoken_spec
):
    """A crash while writing shard `fail_at` leaves a partial file; `background` shard writes may be
    unfinished (not renamed, their checkpoint not saved) when it happens."""
    real_write = prepare_module.write_shard
    calls = []

    def crashing_write(path, *args):
        calls.append(path)
        if len(calls) == fail_at + 1:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        return real_write(path, *args)

    config = make_config([corpus_file], tiktoken_spec, tmp_path / "out")
    monkeypatch.setattr(prepare_module, "write_shard", crashing_write)
    monkeypatch.setattr(prepare_module._WorkerPool, "max_background_writes", background)
    with pytest.raises(KeyboardInterrupt):
        prepare(config)
    assert not (tmp_path / "out" / "manifest.json").exists()
    monkeypatch.undo()
    prepare(config)
    assert read_manifest(tmp_path / "out")["splits"] == read_manifest(prepared)["splits"]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(prepared))


def test_rerun_is_noop_and_other_settings_are_refused(
    tmp_path, corpus_file, tiktoken_spec, sentencepiece_spec
):
    out = tmp_path / "out"
    first = prepare(make_config([corpus_file], tiktoken_spec, out))
    assert prepare(make_config([corpus_file], tiktoken_spec, out)) == first
    with pytest.raises(PrepareStateError, match=str(out)):
        prepare(make_config([corpus_file], sentencepiece_spec, out))
    with pytest.raises(PrepareStateError, match="seq|settings"):
        prepare(make_config([corpus_file], tiktoken_spec, out, seq_len=16))


def test_resume_with_another_tokenizer_is_refused(
    tmp_path, monkeypatch, corpus_file, tiktoken_spec, sentencepiece_spec
):
    monkeypatch.setattr(prepare_module, "write_shard", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare(make_config([corpus_file], tiktoken_spec, tmp_path / "out"))
    monkeypatch.undo()
    with pytest.raises(PrepareStateError, match="unfinished prepare"):
        prepare(make_config([corpus_file], sentencepiece_spec, tmp_path / "out"))


def test_plain_text_parquet_and_jsonl_inputs(tmp_path, tiktoken_spec):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document number {i} " * (3 + i % 5) for i in range(30)]
    (tmp_path / "a.txt").write_text(texts[0])
    (tmp_path / "b.jsonl").write_text(
        "".join(json.dumps({"text": t, "meta": {}}) + "\n" for t in texts[1:15])
    )
    pq.write_table(pa.table({"text": texts[15:], "id": list(range(15))}), tmp_path / "c.parquet")
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.parquet")]
    prepare(make_config(inputs, tiktoken_spec, tmp_path / "out", val_docs=None, seq_len=16, shard_samples=7))
    tokens, _ = split_tokens(tmp_path / "out", "train")
    assert tokens.tolist() == expected_stream(texts, tiktoken_spec)[: len(tokens)]
    assert read_manifest(tmp_path / "out")["splits"]["train"]["documents"] == 30


def test_val_fraction_routes_each_record_once(tmp_path, corpus_file, tiktoken_spec, corpus_texts):
    prepare(
        make_config([corpus_file], tiktoken_spec, tmp_path / "out", val_docs=None, val_fraction=0.1, seed=3)
    )
    splits = read_manifest(tmp_path / "out")["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(corpus_texts)
    assert 10 < splits["val"]["documents"] < 80


def test_val_input_files(tmp_path, corpus_file, tiktoken_spec, corpus_texts):
    write_jsonl_zst(str(tmp_path / "val.jsonl.zst"), corpus_texts[:30])
    config = make_config(
        [corpus_file],
        tiktoken_spec,
        tmp_path / "out",
        val_docs=None,
        val_inputs=[str(tmp_path / "val.jsonl.zst")],
    )
    prepare(config)
    splits = read_manifest(tmp_path / "out")["splits"]
    assert splits["val"]["documents"] == 30 and splits["train"]["documents"] == len(corpus_texts)
