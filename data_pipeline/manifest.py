"""manifest.json: what a prepared data folder holds, and the checks that go with it.

Keys: `format`, `seq_len`, `token_dtype`, `tokenizer` {spec, name, vocab_size, eos_id, vocab_hash}, `seed`,
`inputs` / `val_inputs` [{path, bytes}], `val_docs`, `val_fraction`, `on_bad_record`, `shard_samples`,
`layout` (RecordLayout), `settings_hash`, and `splits` {train, val}: each with `shards`
[{name, samples, tokens, bytes, sha256}], `sample_crc32` {name, bytes, sha256} (the per-sample checksum
file), `samples`, `tokens`, `documents`, `records`, `input_tokens`, `dropped_tail_tokens`, `blank_lines`,
`empty_documents`, `skipped` {reason: count}, `skipped_examples`. docs/DATA.md describes each.

Formats: `based-webdataset-v2` (current) adds `sample_crc32`; `based-webdataset-v1` folders (identical
shards, no per-sample checksums) stay readable, and the loader warns that their reads are unchecked.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from data_pipeline.errors import ManifestError, ShardError
from data_pipeline.readers import file_sha256, file_url, is_local, read_file
from data_pipeline.shard_format import RecordLayout

MANIFEST = "manifest.json"
FORMAT = "based-webdataset-v2"
FORMAT_V1 = "based-webdataset-v1"
READABLE_FORMATS = (FORMAT, FORMAT_V1)
CRC_SUFFIX = ".crc32"


def crc_file(split: str) -> str:
    """The name of the per-sample checksum file of `split`: little-endian uint32 [samples]."""
    return f"{split}{CRC_SUFFIX}"


def write_json_atomic(path: str, data: dict) -> None:
    """Write `data` as JSON to `path` through a temporary file and a rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Manifest:
    """A loaded manifest.json of `data_dir`."""

    data: dict
    data_dir: str

    @property
    def where(self) -> str:
        return file_url(self.data_dir, MANIFEST)

    @property
    def layout(self) -> RecordLayout:
        return RecordLayout.from_dict(self.data["layout"])

    @property
    def seq_len(self) -> int:
        return self.data["seq_len"]

    @property
    def tokenizer(self) -> dict:
        return self.data["tokenizer"]

    def split(self, name: str) -> dict:
        """The entry of split `name`; ManifestError if the data has no such split."""
        splits = self.data["splits"]
        if name not in splits or not splits[name]["shards"]:
            raise ManifestError(
                f"{self.where}: no {name!r} split (splits: {sorted(k for k in splits if splits[k]['shards'])}); "
                "prepare with --val-docs, --val-fraction or --val-input to get a validation split"
            )
        return splits[name]

    def checksums(self, split: str) -> dict | None:
        """The `sample_crc32` entry {name, bytes, sha256} of `split`; None for v1 data (no checksums)."""
        return self.split(split).get("sample_crc32")

    def shard_offsets(self, split: str) -> np.ndarray:
        """int64 [num_shards + 1]: index of the first sample of each shard, then the total."""
        counts = [shard["samples"] for shard in self.split(split)["shards"]]
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def fingerprint(self) -> str:
        """sha256 over the shard checksums, layout and tokenizer: identifies the data, not its location."""
        digest = hashlib.sha256(json.dumps(self.data["layout"], sort_keys=True).encode())
        digest.update(self.tokenizer["vocab_hash"].encode())
        for name in sorted(self.data["splits"]):
            for shard in self.data["splits"][name]["shards"]:
                digest.update(f"{name}/{shard['name']}:{shard['sha256']}".encode())
        return digest.hexdigest()

    def check_sizes(self, split: str) -> None:
        """For local data: ShardError naming the first shard that is missing or has the wrong size."""
        if not is_local(self.data_dir):
            return
        files = list(self.split(split)["shards"])
        if self.checksums(split) is not None:
            files.append(self.checksums(split))
        for shard in files:
            path = file_url(self.data_dir, shard["name"])
            try:
                size = os.path.getsize(path)
            except OSError as err:
                raise ShardError(f"{_kind(path)} {path} listed in {self.where} is missing: {err}") from err
            if size != shard["bytes"]:
                raise ShardError(
                    f"{_kind(path)} {path} has {size} bytes, {self.where} says {shard['bytes']}: it is truncated "
                    "or was replaced; copy it again or prepare the data again"
                )

    def verify(self, split: str) -> list[str]:
        """Hash every shard (and the checksum file) of `split`; one message per file whose sha256 or size is wrong."""
        problems = []
        files = list(self.split(split)["shards"])
        if self.checksums(split) is not None:
            files.append(self.checksums(split))
        for shard in files:
            try:
                sha, size = file_sha256(self.data_dir, shard["name"])
            except (OSError, ShardError) as err:
                problems.append(
                    f"{_kind(shard['name'])} {file_url(self.data_dir, shard['name'])} cannot be read: {err}"
                )
                continue
            if sha != shard["sha256"] or size != shard["bytes"]:
                problems.append(
                    f"{_kind(shard['name'])} {file_url(self.data_dir, shard['name'])}: sha256 {sha[:16]}... ({size} bytes) differs "
                    f"from {self.where} ({shard['sha256'][:16]}..., {shard['bytes']} bytes); copy it again"
                )
        return problems


def _kind(name: str) -> str:
    return "checksum file" if name.endswith(CRC_SUFFIX) else "shard"


def load_manifest(data_dir: str) -> Manifest:
    """Read `data_dir`/manifest.json; ManifestError if it is missing, unreadable or of another format."""
    where = file_url(data_dir, MANIFEST)
    try:
        data = json.loads(read_file(data_dir, MANIFEST))
    except (ShardError, OSError) as err:
        raise ManifestError(
            f"{where} cannot be read ({err}); is {data_dir} a folder made by `python -m data_pipeline.prepare`?"
        ) from err
    except json.JSONDecodeError as err:
        raise ManifestError(f"{where} is not valid JSON ({err}); prepare the data again") from err
    if data.get("format") not in READABLE_FORMATS:
        raise ManifestError(
            f"{where}: format {data.get('format')!r}, expected one of {READABLE_FORMATS}; "
            "this data was written by another version of data_pipeline"
        )
    return Manifest(data, data_dir)
