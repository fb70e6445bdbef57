"""Errors raised by the data pipeline.

Every error message says what was wrong, where (file and line, shard and sample) and what to do.
Catch `DataError` to handle all of them.
"""

from __future__ import annotations


class DataError(Exception):
    """Base class of every error the data pipeline raises on bad input or bad data."""


class EmptyInputError(DataError):
    """An input file (or the whole input) holds no document."""


class BadRecordError(DataError):
    """A record of an input file cannot be used: invalid JSON, invalid UTF-8, no "text" string."""


class CorruptInputError(DataError):
    """An input file cannot be read to its end (truncated or corrupt compression, bad parquet)."""


class InputOverlapError(DataError):
    """A file is both a training and a validation input."""


class UnknownFormatError(DataError):
    """An input file's extension names no format the pipeline reads."""


class TokenizerError(DataError):
    """A tokenizer spec cannot be loaded (unknown kind, missing file, no end-of-document token)."""


class TokenizerMismatchError(DataError):
    """A tokenizer differs from the one the data was prepared with."""


class ManifestError(DataError):
    """manifest.json is missing, unreadable or inconsistent with the files beside it."""


class ShardError(DataError):
    """A shard is missing, truncated, corrupt, or its sha256 differs from the manifest."""


class PrepareStateError(DataError):
    """An output folder holds a partial or finished prepare made with other settings."""


class LoaderStateError(DataError):
    """A loader state_dict does not belong to this dataset, split or seed."""
