"""Input files as a stream of raw records, and the parsing of one record into a document's text.

Formats, chosen by extension:
- `.jsonl`, `.jsonl.zst` (the Pile): one JSON object per line with a string "text" (and "meta", unused).
  A record is a line; blank lines are counted, not parsed.
- `.txt`, `.txt.zst`: the whole file is one document.
- `.parquet`: one document per row of the "text" column.

Reading (decompression, line splitting) runs in the main process; parsing (UTF-8, JSON) runs in the
tokenizer workers through `parse_record`. A record is addressed by its input index and its index in that
input (0-based; messages print 1-based line numbers).

Integrity: zstd checks a frame's checksum only when the frame ends, so the records of a frame are read
(possibly garbled, as valid JSON) before its corruption is known; a single-frame file is checked only at
its end. `InputProgress` tells how far the records read so far are verified (every frame they lie in has
ended with a matching checksum; records of plain files and parquet count as verified when read), so
prepare commits nothing built from records that a later checksum error could still disown.
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from data_pipeline.errors import CorruptInputError, EmptyInputError, UnknownFormatError

JSONL, TEXT, PARQUET = "jsonl", "text", "parquet"
_FORMATS = (
    (".jsonl.zst", JSONL),
    (".jsonl", JSONL),
    (".txt.zst", TEXT),
    (".txt", TEXT),
    (".parquet", PARQUET),
)
BLANK = b""
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class InputFile:
    """One input file: its path, format and size in bytes."""

    path: str
    fmt: str
    size: int

    def location(self, record: int) -> str:
        """Where record number `record` (0-based) of this file is, for messages."""
        if self.fmt == JSONL:
            return f"{self.path}:{record + 1}"
        if self.fmt == PARQUET:
            return f"{self.path} row {record}"
        return self.path


def file_format(path: str) -> str:
    """The format of `path` from its extension; UnknownFormatError if it has none we read."""
    for suffix, fmt in _FORMATS:
        if path.endswith(suffix):
            return fmt
    raise UnknownFormatError(
        f"input {path}: unknown format; expected one of {', '.join(s for s, _ in _FORMATS)}"
    )


def expand_inputs(patterns: list[str]) -> list[InputFile]:
    """Expand files and globs in the given order (each glob's matches sorted) into InputFiles."""
    files: list[InputFile] = []
    seen: set[str] = set()
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise EmptyInputError(f"input pattern {pattern!r} matches no file")
        for path in matches:
            if not os.path.isfile(path):
                raise EmptyInputError(f"input {path} does not exist or is not a file")
            if path in seen:
                raise UnknownFormatError(f"input {path} is given twice; each document must be read once")
            seen.add(path)
            files.append(InputFile(path, file_format(path), os.path.getsize(path)))
    return files


class InputProgress:
    """How far the records read are verified: every record of inputs before `input`, and records
    [0, `records`) of input `input`."""

    def __init__(self) -> None:
        self.input = 0
        self.records = 0

    def covers(self, input_index: int, record_end: int) -> bool:
        """Whether records [0, record_end) of input `input_index` (and all earlier inputs) are verified."""
        return input_index < self.input or (input_index == self.input and record_end <= self.records)


def iter_records(
    inputs: list[InputFile], start: tuple[int, int] = (0, 0), progress: InputProgress | None = None
) -> Iterator[tuple[int, int, object]]:
    """Yield `(input_index, record_index, raw)` from `start` on; raw is bytes, a str, None or BLANK.

    jsonl: raw is the line's bytes (BLANK, i.e. b"", for a blank line); text: the file's bytes; parquet: the "text"
    value (str, or None when null/missing). Raises EmptyInputError for a file without records and
    CorruptInputError for one that cannot be read to its end. `progress`, if given, is kept up to date.
    """
    progress = progress or InputProgress()
    first_input, first_record = start
    for input_index in range(first_input, len(inputs)):
        skip = first_record if input_index == first_input else 0
        source = inputs[input_index]
        progress.input, progress.records = input_index, 0
        count = 0
        for record_index, raw in _records_of(source, progress):
            count += 1
            if record_index >= skip:
                yield input_index, record_index, raw
        if count == 0:
            raise EmptyInputError(f"input {source.path} holds no record (empty file); remove it from --input")
        progress.input, progress.records = input_index + 1, 0


def parse_record(fmt: str, raw: object) -> str | tuple[str, str]:
    """A record's document text, or `(reason, detail)` when the record is bad.

    Reasons: 'invalid_utf8', 'invalid_json', 'missing_text'.
    """
    if fmt == PARQUET:
        return raw if isinstance(raw, str) else ("missing_text", "the text column is null")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return "invalid_utf8", f"invalid UTF-8 at byte {err.start}: {err.reason}"
    if fmt == TEXT:
        return text
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return "invalid_json", f"invalid JSON: {err}"
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        return "missing_text", 'no string "text" field in the JSON object'
    return obj["text"]


def _records_of(source: InputFile, progress: InputProgress) -> Iterator[tuple[int, object]]:
    try:
        if source.fmt == PARQUET:
            for index, value in _parquet_records(source.path):
                progress.records = index + 1
                yield index, value
        elif source.fmt == JSONL:
            yield from _line_records(source.path, progress)
        else:
            with _open_bytes(source.path) as f:
                data = f.read()
            if data:
                progress.records = 1
                yield 0, data
    except (OSError, EOFError, ValueError) as err:
        raise CorruptInputError(
            f"input {source.path} cannot be read to its end ({type(err).__name__}: {err}); "
            "the file is truncated or corrupt: download or copy it again"
        ) from err


def _line_records(path: str, progress: InputProgress) -> Iterator[tuple[int, object]]:
    """Lines; a line counts as verified once every byte up to its end lies in a checked zstd frame."""
    with _open_bytes(path) as f:
        raw = f.raw if isinstance(f, io.BufferedReader) and isinstance(f.raw, _ZstdRaw) else None
        end = 0
        for index, line in enumerate(f):
            end += len(line)
            if raw is None or raw.verified_bytes >= end:
                progress.records = index + 1
            yield index, (line if line.strip() else BLANK)


def _open_bytes(path: str) -> io.BufferedReader:
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdRaw(path), buffer_size=1 << 20)
    return open(path, "rb")


class _ZstdRaw(io.RawIOBase):
    """Decompresses a (multi-frame) zstd file; raises EOFError when the file ends inside a frame."""

    CHUNK = 1 << 20

    def __init__(self, path: str):
        import zstandard

        self.file = open(path, "rb")
        self.decompressor = zstandard.ZstdDecompressor()
        self.frame = self.decompressor.decompressobj()
        self.frame_started = False
        self.pending = b""
        self.position = 0
        self.output_bytes = 0
        # decompressed bytes of the frames that have ended (zstd checked their checksums, if they have one)
        self.verified_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.position == len(self.pending):
            self.pending, self.position = b"", 0
            if not self._decompress_more():
                return 0
        size = min(len(buffer), len(self.pending) - self.position)
        buffer[:size] = self.pending[self.position : self.position + size]
        self.position += size
        return size

    def _decompress_more(self) -> bool:
        import zstandard

        data = self.file.read(self.CHUNK)
        if not data:
            if self.frame_started and not self.frame.eof:
                raise EOFError("the zstd stream ends inside a frame (truncated file)")
            return False
        try:
            while data:
                self.frame_started = True
                out = self.frame.decompress(data)
                self.pending += out
                self.output_bytes += len(out)
                data = self.frame.unused_data if self.frame.eof else b""
                if self.frame.eof:
                    self.verified_bytes = self.output_bytes
                    self.frame = self.decompressor.decompressobj()
                    self.frame_started = False
        except zstandard.ZstdError as err:
            raise ValueError(f"zstd: {err}") from err
        return True

    def close(self) -> None:
        self.file.close()
        super().close()


def _parquet_records(path: str) -> Iterator[tuple[int, object]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except pyarrow.ArrowException as err:
        raise ValueError(str(err)) from err
    if "text" not in parquet.schema_arrow.names:
        raise CorruptInputError(
            f"input {path}: parquet file has no 'text' column (columns: {parquet.schema_arrow.names})"
        )
    index = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["text"]):
            for value in batch.column(0).to_pylist():
                yield index, value
                index += 1
    except pyarrow.ArrowException as err:
        raise ValueError(f"at row {index}: {err}") from err
