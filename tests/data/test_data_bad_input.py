"""Bad input and bad data give errors that name the file and line, shard and sample; or are counted."""

from __future__ import annotations

import itertools
import json
import shutil
import zlib

import numpy as np
import pytest
from datatest_utils import make_config, read_manifest

from data_pipeline import inspect
from data_pipeline.errors import (
    BadRecordError,
    CorruptInputError,
    EmptyInputError,
    ShardError,
    TokenizerMismatchError,
    UnknownFormatError,
)
from data_pipeline.loader import GlobalOrderLoader, SampleStore
from data_pipeline.manifest import load_manifest
from data_pipeline.prepare import main as prepare_main
from data_pipeline.prepare import prepare

GOOD = json.dumps({"text": "a good document about the cat", "meta": {}}).encode() + b"\n"
BAD_LINES = {
    "invalid_utf8": b'{"text": "bad \xff\xfe bytes"}\n',
    "invalid_json": b'{"text": "no closing quote}\n',
    "missing_text": b'{"content": "the field is not called text"}\n',
}


@pytest.fixture
def broken_copy(tmp_path, prepared):
    folder = tmp_path / "copy"
    shutil.copytree(prepared, folder)
    return folder


def first_train_shard(folder) -> str:
    return read_manifest(folder)["splits"]["train"]["shards"][0]["name"]


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_record_names_file_and_line(tmp_path, tiktoken_spec, reason):
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD * 3 + BAD_LINES[reason] + GOOD * 30)
    with pytest.raises(BadRecordError, match=f"{path}:4: .*--on-bad-record skip"):
        prepare(make_config([str(path)], tiktoken_spec, tmp_path / "out", val_docs=None, seq_len=8))


def test_skip_policy_counts_and_reports(tmp_path, tiktoken_spec, capsys):
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD * 3 + b"".join(BAD_LINES.values()) + b"\n" + GOOD * 30)
    manifest = prepare(
        make_config(
            [str(path)], tiktoken_spec, tmp_path / "out", val_docs=None, seq_len=8, on_bad_record="skip"
        )
    )
    train = manifest["splits"]["train"]
    assert train["skipped"] == {"invalid_utf8": 1, "invalid_json": 1, "missing_text": 1}
    assert train["blank_lines"] == 1 and train["documents"] == 33 and train["records"] == 37
    assert f"{path}:5: invalid JSON" in train["skipped_examples"][1]
    assert "3 bad records skipped" in capsys.readouterr().err


@pytest.mark.parametrize("name,content", [("empty.jsonl", b""), ("empty.jsonl.zst", b""), ("e.txt", b"")])
def test_empty_input_names_the_file(tmp_path, tiktoken_spec, name, content):
    (tmp_path / "good.jsonl").write_bytes(GOOD * 30)
    (tmp_path / name).write_bytes(content)
    inputs = [str(tmp_path / "good.jsonl"), str(tmp_path / name)]
    with pytest.raises(EmptyInputError, match=str(tmp_path / name)):
        prepare(make_config(inputs, tiktoken_spec, tmp_path / "out", val_docs=None, seq_len=8))


def test_input_without_documents_and_missing_glob(tmp_path, tiktoken_spec):
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n" + json.dumps({"text": ""}).encode() + b"\n")
    with pytest.raises(EmptyInputError, match="blank.jsonl.*2 blank, 1 empty"):
        prepare(make_config([str(tmp_path / "blank.jsonl")], tiktoken_spec, tmp_path / "out", val_docs=None))
    with pytest.raises(EmptyInputError, match="nothing-here"):
        prepare(make_config([str(tmp_path / "nothing-here*.jsonl")], tiktoken_spec, tmp_path / "o2"))
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(UnknownFormatError, match="x.csv"):
        prepare(make_config([str(tmp_path / "x.csv")], tiktoken_spec, tmp_path / "o3"))


def test_truncated_zst_input_names_the_file(tmp_path, corpus_file, tiktoken_spec):
    data = open(corpus_file, "rb").read()
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptInputError, match=f"{path}.*truncated"):
        prepare(make_config([str(path)], tiktoken_spec, tmp_path / "out"))


def test_cli_reports_errors_with_exit_status(tmp_path, tiktoken_spec, capsys):
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD + BAD_LINES["invalid_json"])
    argv = [
        "--input",
        str(path),
        "--tokenizer",
        tiktoken_spec,
        "--seq-len",
        "8",
        "--out",
        str(tmp_path / "o"),
    ]
    assert prepare_main(argv + ["--no-progress"]) == 1
    assert f"{path}:2" in capsys.readouterr().err


def test_truncated_shard_is_named(broken_copy):
    shard = broken_copy / first_train_shard(broken_copy)
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ShardError, match=f"{shard}.*truncated"):
        GlobalOrderLoader(str(broken_copy), global_batch_size=8, micro_batch_size=2)


def test_truncated_shard_read_names_sample(broken_copy):
    shard = broken_copy / first_train_shard(broken_copy)
    shard.write_bytes(shard.read_bytes()[:5000])
    store = SampleStore(load_manifest(str(broken_copy)), "train")
    with pytest.raises(ShardError, match=f"{shard}: sample 39 is cut short"):
        store.read(np.array([39]))


def test_corrupt_tar_header_names_shard_and_sample(broken_copy):
    shard = broken_copy / first_train_shard(broken_copy)
    data = bytearray(shard.read_bytes())
    record = load_manifest(str(broken_copy)).layout.record_bytes
    data[3 * record : 3 * record + 10] = b"garbage!!!"
    shard.write_bytes(bytes(data))
    store = SampleStore(load_manifest(str(broken_copy)), "train")
    with pytest.raises(ShardError, match=f"{shard}: sample 3: expected tar member"):
        store.read(np.array([2, 3]))


def test_checksum_mismatch_is_named(broken_copy, capsys):
    shard = broken_copy / first_train_shard(broken_copy)
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 1  # inside the last sample's tokens or the tar's zero padding: size unchanged
    shard.write_bytes(bytes(data))
    GlobalOrderLoader(str(broken_copy), global_batch_size=8, micro_batch_size=2)
    with pytest.raises(ShardError, match=f"{shard}: sha256"):
        GlobalOrderLoader(str(broken_copy), global_batch_size=8, micro_batch_size=2, verify_checksums=True)
    assert inspect.main([str(broken_copy), "--verify"]) == 1
    assert f"FAILED shard {shard}" in capsys.readouterr().out


def test_out_of_vocab_token_is_named(broken_copy):
    shard = broken_copy / first_train_shard(broken_copy)
    layout = load_manifest(str(broken_copy)).layout
    data = bytearray(shard.read_bytes())
    token_0 = layout.tokens_offset + layout.tokens_bytes - 2 * layout.sample_tokens
    data[token_0 : token_0 + 2] = b"\xff\xff"
    shard.write_bytes(bytes(data))
    # a shard whose checksum matches (made that way): the vocabulary check still names the sample
    crcs = np.fromfile(broken_copy / "train.crc32", "<u4")
    crcs[0] = zlib.crc32(bytes(data[: layout.record_bytes]))
    crcs.tofile(broken_copy / "train.crc32")
    store = SampleStore(load_manifest(str(broken_copy)), "train")
    with pytest.raises(ShardError, match="sample 0 of split train holds token 65535"):
        store.read(np.array([0]))


def test_flipped_token_byte_is_an_error_naming_shard_and_sample(broken_copy):
    """Issue 14 item 11: every read checks the sample's crc32, so the trainer's loader never reads a
    corrupt sample silently (the shard's size is unchanged, so only a checksum can tell)."""
    manifest = load_manifest(str(broken_copy))
    layout, shard = manifest.layout, broken_copy / first_train_shard(broken_copy)
    data = bytearray(shard.read_bytes())
    sample = 5
    data[sample * layout.record_bytes + layout.tokens_offset + layout.tokens_bytes - 7] ^= 0x01
    shard.write_bytes(bytes(data))
    loader = GlobalOrderLoader(str(broken_copy), global_batch_size=8, micro_batch_size=2)
    with pytest.raises(
        ShardError, match=f"{shard}: sample {sample} \\(record {sample} of the shard\\) fails its checksum"
    ):
        for _ in itertools.islice(loader, loader.samples_per_epoch // 2 + 1):
            pass
    store = SampleStore(manifest, "train")
    store.read(np.array([sample - 1, sample + 1]))
    with pytest.raises(ShardError, match=f"sample {sample} "):
        store.read(np.array([sample]))


def test_v1_data_without_checksums_reads_with_a_warning(broken_copy):
    """Folders of format v1 (before per-sample checksums; identical shards) stay readable, with a warning."""
    manifest = read_manifest(broken_copy)
    manifest["format"] = "based-webdataset-v1"
    for split in manifest["splits"].values():
        del split["sample_crc32"]
    (broken_copy / "manifest.json").write_text(json.dumps(manifest))
    for split in ("train", "val"):
        (broken_copy / f"{split}.crc32").unlink()
    with pytest.warns(UserWarning, match="no per-sample checksums"):
        store = SampleStore(load_manifest(str(broken_copy)), "train")
    assert store.read(np.arange(3))[0].shape == (3, 33)


def test_tokenizer_mismatch_is_named(prepared, sentencepiece_spec):
    with pytest.raises(TokenizerMismatchError, match=f"{prepared}/manifest.json"):
        inspect.show(load_manifest(str(prepared)), "train", 0, 0, sentencepiece_spec)
