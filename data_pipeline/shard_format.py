"""The on-disk sample format: WebDataset tar shards whose samples all have the same byte size.

A sample is a window of `seq_len + 1` tokens of the packed token stream and the positions in it where a
document starts. In the tar, sample `k` of a split (0-based, over all its shards) is two members, written
by webdataset's TarWriter in this order:
- `{k:010d}.docstarts.npy`: uint8 [ceil((seq_len+1)/8)], `np.packbits(is_start, bitorder="little")` where
  `is_start[t]` is true when a document's first token is at position t;
- `{k:010d}.tokens.npy`: uint16 or uint32 [seq_len + 1].
Any WebDataset reader can decode them with numpy. Because keys have a fixed width, headers are plain
USTAR (mtime 0) and arrays have a fixed shape, every sample record has the same size (`record_bytes`),
so sample j of a shard starts at byte `j * record_bytes`: the loader reads a sample with one ranged read
and needs no index. The writer checks this layout after every sample, and the reader checks the member
names of every record it reads, so a corrupt or foreign tar is an error, never silent garbage.

Per-sample checksums: beside the shards, `{split}.crc32` holds little-endian uint32 [samples of the split]:
entry k is zlib's crc32 of sample k's whole record (`record_bytes` bytes: both tar headers and payloads).
The loader checks it on every read (a crc32 of 6 KiB costs a few microseconds), so a flipped byte is an
error naming the shard and sample. docs/DATA.md describes the whole format.
"""

from __future__ import annotations

import functools
import hashlib
import io
import tarfile
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import webdataset

from data_pipeline.errors import ShardError

KEY_DIGITS = 10
TAR_BLOCK = 512
TOKENS, DOCSTARTS = "tokens.npy", "docstarts.npy"
TAR_MTIME = 0


def sample_key(index: int) -> str:
    """The WebDataset key of sample `index` of a split."""
    return f"{index:0{KEY_DIGITS}d}"


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` (C-contiguous) in .npy format, as np.save writes it."""
    return _npy_header(array.dtype.str, array.shape) + array.tobytes()


@functools.lru_cache(maxsize=16)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype), allow_pickle=False)
    data = buffer.getvalue()
    return data[: len(data) - np.dtype(dtype).itemsize * int(np.prod(shape))]


def little_endian(dtype: str) -> np.dtype:
    """`dtype` ('uint16' or 'uint32') in the little-endian byte order the shards use."""
    return np.dtype(dtype).newbyteorder("<")


def encode_sample(index: int, tokens: np.ndarray, is_start: np.ndarray) -> dict[str, object]:
    """The TarWriter dict of one sample: tokens [L+1] and the bool document-start mask [L+1]."""
    bits = np.packbits(is_start.astype(bool), bitorder="little")
    tokens = tokens.astype(tokens.dtype.newbyteorder("<"), copy=False)
    return {"__key__": sample_key(index), DOCSTARTS: npy_bytes(bits), TOKENS: npy_bytes(tokens)}


@dataclass(frozen=True)
class RecordLayout:
    """Byte layout of one sample record; offsets are from the record's first byte."""

    seq_len: int
    dtype: str
    record_bytes: int
    docstarts_offset: int
    docstarts_bytes: int
    tokens_offset: int
    tokens_bytes: int

    @property
    def sample_tokens(self) -> int:
        return self.seq_len + 1

    @property
    def bits_bytes(self) -> int:
        return (self.seq_len + 8) // 8

    @classmethod
    def build(cls, seq_len: int, dtype: str) -> RecordLayout:
        """Measure the layout by encoding one sample."""
        sample = encode_sample(0, np.zeros(seq_len + 1, dtype), np.zeros(seq_len + 1, bool))
        starts_size, tokens_size = len(sample[DOCSTARTS]), len(sample[TOKENS])
        starts_span = TAR_BLOCK + _padded(starts_size)
        return cls(
            seq_len=seq_len,
            dtype=dtype,
            record_bytes=starts_span + TAR_BLOCK + _padded(tokens_size),
            docstarts_offset=TAR_BLOCK,
            docstarts_bytes=starts_size,
            tokens_offset=starts_span + TAR_BLOCK,
            tokens_bytes=tokens_size,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RecordLayout:
        return cls(**data)


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


class _HashingFile:
    """A write-only file wrapper: counts bytes, computes their sha256 and the crc32 of each record.

    tarfile's stream mode writes in its own buffer sizes, so records are cut at multiples of
    `record_bytes` here; bytes after the last whole record (the tar end blocks) get no crc.
    """

    def __init__(self, file, record_bytes: int):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.record_bytes = record_bytes
        self.record_crcs: list[int] = []
        self._crc, self._filled = 0, 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        view = memoryview(data)
        while len(view):
            take = min(len(view), self.record_bytes - self._filled)
            self._crc = zlib.crc32(view[:take], self._crc)
            self._filled += take
            view = view[take:]
            if self._filled == self.record_bytes:
                self.record_crcs.append(self._crc)
                self._crc, self._filled = 0, 0
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def write_shard(
    path: str, layout: RecordLayout, first_index: int, tokens: np.ndarray, is_start: np.ndarray
) -> dict:
    """Write samples `tokens` [n, L+1] and `is_start` [n, L+1] as a tar.

    Returns {"bytes", "sha256", "crc32"}: crc32 is uint32 [n], the crc32 of each sample's record.
    Keys are `first_index + j`. Raises ShardError if a record does not have the fixed layout.
    """
    with open(path, "wb") as raw:
        out = _HashingFile(raw, layout.record_bytes)
        writer = webdataset.TarWriter(out, encoder=False, mtime=TAR_MTIME, user="based", group="based")
        for j in range(len(tokens)):
            writer.write(encode_sample(first_index + j, tokens[j], is_start[j]))
            if writer.tarstream.offset != (j + 1) * layout.record_bytes:
                raise ShardError(
                    f"{path}: sample {first_index + j} ends at byte {writer.tarstream.offset}, expected "
                    f"{(j + 1) * layout.record_bytes}; this webdataset/tarfile version writes another layout"
                )
        writer.close()
    crcs = np.array(out.record_crcs[: len(tokens)], np.uint32)
    return {"bytes": out.size, "sha256": out.sha256.hexdigest(), "crc32": crcs}


def record_crc32(record: bytes | memoryview) -> int:
    """The checksum of one sample record, as `{split}.crc32` stores it."""
    return zlib.crc32(record)


def tar_size(layout: RecordLayout, samples: int) -> int:
    """Size in bytes of a shard of `samples` records (tar end blocks, padded to tarfile's record size)."""
    return -(-(samples * layout.record_bytes + 2 * TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def decode_record(
    record: bytes | memoryview, layout: RecordLayout, index: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [L+1] and the bool document-start mask [L+1] of sample `index` from its record bytes.

    `where` names the shard for error messages.
    """
    if len(record) != layout.record_bytes:
        raise ShardError(
            f"{where}: sample {index} is cut short ({len(record)} of {layout.record_bytes} bytes); "
            "the shard is truncated: copy it again or run `python -m data_pipeline.inspect DIR --verify`"
        )
    key = sample_key(index)
    _check_header(record, 0, f"{key}.{DOCSTARTS}", index, where)
    _check_header(record, layout.tokens_offset - TAR_BLOCK, f"{key}.{TOKENS}", index, where)
    starts = _npy_payload(
        record, layout.docstarts_offset, layout.docstarts_bytes, layout.bits_bytes, np.uint8
    )
    tokens = _npy_payload(
        record, layout.tokens_offset, layout.tokens_bytes, layout.sample_tokens, little_endian(layout.dtype)
    )
    is_start = np.unpackbits(starts, count=layout.sample_tokens, bitorder="little").astype(bool)
    return tokens, is_start


def _check_header(record, offset: int, expected: str, index: int, where: str) -> None:
    name = bytes(record[offset : offset + 100]).rstrip(b"\0").decode("ascii", "replace")
    if name != expected or bytes(record[offset + 257 : offset + 262]) != b"ustar":
        raise ShardError(
            f"{where}: sample {index}: expected tar member {expected!r} at byte {offset} of its record, "
            f"found {name!r}; the shard is corrupt or does not belong to this manifest: "
            "run `python -m data_pipeline.inspect DIR --verify`"
        )


def _npy_payload(record, offset: int, npy_size: int, count: int, dtype) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    header = npy_size - count * itemsize
    return np.frombuffer(record, dtype=dtype, count=count, offset=offset + header)
