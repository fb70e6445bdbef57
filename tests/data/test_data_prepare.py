"""prepare: round trip, formats, determinism across workers, resume after an interruption."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from datatest_utils import make_config, read_manifest

import data_pipeline.prepare as prepare_module
from data_pipeline.errors import BadRecordError, PrepareStateError
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


def _zstd_with_checksum(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


def _garbled_twin(good: bytes, start: int) -> bytes:
    """A one-frame zstd file as large as `good`'s whose content has one letter changed after byte `start`
    (so it still decodes to valid JSON) and whose checksum is `good`'s: zstd reports the mismatch only at
    the frame's end, after every garbled record was read."""
    frame = _zstd_with_checksum(good)
    for offset in range(start, start + 400):
        for letter in b"qxzjk":
            if not chr(good[offset]).isalpha() or good[offset] == letter:
                continue
            garbled = _zstd_with_checksum(good[:offset] + bytes([letter]) + good[offset + 1 :])
            if len(garbled) == len(frame):
                return garbled[:-4] + frame[-4:]
    raise AssertionError("no same-size garbling found")


def test_corrupt_zstd_frame_commits_no_shard_and_the_rerun_rewrites_them(
    tmp_path, monkeypatch, tiktoken_spec
):
    """Issue 14 item 10: records read from a zstd frame whose checksum later fails must not reach a committed
    checkpoint; after the file is replaced (same size, so the settings are the same) the rerun's shards
    equal a clean run's, not the garbled ones."""
    import data_pipeline.sources as sources
    from data_pipeline.errors import CorruptInputError
    from data_pipeline.tiny_corpus import generate_documents

    texts = generate_documents(450, seed=5)
    good = "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()
    record_40 = good.index(json.dumps({"text": texts[40]}).encode())
    path = tmp_path / "in.jsonl.zst"
    options = {"chunk_records": 8, "shard_samples": 60}
    # small reads, as for a large file: output reaches the records long before the frame ends
    monkeypatch.setattr(sources._ZstdRaw, "CHUNK", 2048)
    path.write_bytes(_zstd_with_checksum(good))
    clean = prepare(make_config([str(path)], tiktoken_spec, tmp_path / "clean", **options))

    path.write_bytes(_garbled_twin(good, record_40 + 10))
    config = make_config([str(path)], tiktoken_spec, tmp_path / "out", **options)
    with pytest.raises(CorruptInputError, match=f"{path}.*checksum"):
        prepare(config)
    path.write_bytes(_zstd_with_checksum(good))
    assert prepare(config)["splits"] == clean["splits"]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "clean"))


def test_a_validation_input_that_is_also_an_input_is_refused(tmp_path, corpus_file, tiktoken_spec):
    """Issue 14 item 14: train and validation must not share documents (also through a link)."""
    from data_pipeline.errors import InputOverlapError

    link = tmp_path / "val-link.jsonl.zst"
    link.symlink_to(corpus_file)
    for val in (corpus_file, str(link)):
        config = make_config([corpus_file], tiktoken_spec, tmp_path / "out", val_docs=None, val_inputs=[val])
        with pytest.raises(InputOverlapError, match=f"input {corpus_file} is also a validation input"):
            prepare(config)
    assert not (tmp_path / "out").exists()


def test_rerun_after_a_failed_prepare_names_the_changed_setting_and_restart_starts_over(
    tmp_path, tiktoken_spec, corpus_texts
):
    """Issue 14 item 15: fixing the input after a failure changes its size; the rerun says so and offers
    --restart, which gives the same data as a clean prepare of the fixed input."""
    lines = [json.dumps({"text": text}) + "\n" for text in corpus_texts]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(lines[:300]) + '{"text": broken\n' + "".join(lines[300:]))
    config = make_config([str(path)], tiktoken_spec, tmp_path / "out")
    with pytest.raises(BadRecordError, match=f"{path}:301"):
        prepare(config)
    assert (tmp_path / "out" / "train-000000.tar").exists()
    path.write_text("".join(lines))
    size = path.stat().st_size
    with pytest.raises(
        PrepareStateError, match=f"--input {path} was {size + 16} bytes, now {size}.*--restart"
    ):
        prepare(config)
    assert (
        prepare(dataclasses.replace(config, restart=True))["splits"]
        == prepare(make_config([str(path)], tiktoken_spec, tmp_path / "clean"))["splits"]
    )
    with pytest.raises(PrepareStateError, match="seq_len was 32, now 16.*--restart"):
        prepare(dataclasses.replace(config, seq_len=16))


def test_out_that_is_a_file_is_a_clean_error(tmp_path, corpus_file, tiktoken_spec, capsys):
    out = tmp_path / "data.tar"
    out.write_bytes(b"not a folder")
    argv = ["--input", corpus_file, "--tokenizer", tiktoken_spec, "--seq-len", "32", "--out", str(out)]
    assert prepare_module.main(argv + ["--no-progress", "--workers", "1"]) == 1
    assert f"--out {out} is a file, not a folder" in capsys.readouterr().err
    assert out.read_bytes() == b"not a folder"


def test_rerun_detects_a_deleted_shard_and_restart_rewrites_it(
    tmp_path, prepared, corpus_file, tiktoken_spec
):
    """Issue 14 item 15: a rerun of a finished prepare checks the files the manifest lists."""
    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    (out / "train-000002.tar").unlink()
    config = make_config([corpus_file], tiktoken_spec, out)
    with pytest.raises(
        PrepareStateError, match=f"{out}/train-000002.tar, listed in .*manifest.json, is missing.*--restart"
    ):
        prepare(config)
    (out / "val.crc32").write_bytes(b"")
    (out / "tokenizer-notes.txt").write_text("the user's own file")
    assert prepare(dataclasses.replace(config, restart=True))["splits"] == read_manifest(prepared)["splits"]
    assert (out / "tokenizer-notes.txt").exists()
