"""Training and validation loaders over prepared shards, in one global order fixed by the data.

    loader = GlobalOrderLoader(data_dir, split="train", global_batch_size=G, micro_batch_size=m,
                               dp_rank=r, dp_size=R, seed=s, num_workers=w)
    for batch in loader:   # endless
        batch["input_ids"]     # int64 [m, T]
        batch["labels"]        # int64 [m, T]  (input shifted by one)
        batch["doc_ids"]       # int32 [m, T]  (0 at t=0, +1 at each document start)
        batch["sample_index"]  # int64 [m]     (which sample of the split each row is; for debugging)

The order: position p of the endless stream is sample `perm_{seed, p // N}(p mod N)` of the split
(data_pipeline.order), a pure function of (manifest, seed, epoch). Global batch g is positions
[g*G, (g+1)*G); rank r takes rows [r*G/R, (r+1)*G/R) of it in micro-batches of m rows. Micro-batch k of
a rank is computed from k alone, so DataLoader workers each build whole micro-batches and torch returns
them in sampler order: the stream is the same for any num_workers, dp_size, and local or remote data.

Reading: a sample is one fixed-size tar record at `index_in_shard * record_bytes`
(data_pipeline.shard_format), read with one ranged read (data_pipeline.readers: pread for local files,
HTTP range requests for http(s), whole-shard streaming for other webdataset URLs). Memory holds one
micro-batch per prefetch slot and a few open files; no shard is loaded whole (except the streaming
fallback's small shard cache). Every record read is checked against its crc32 in `{split}.crc32`
(memory-mapped for local data, so the check costs a crc32 of the record and no extra read); a mismatch
is a ShardError naming the shard and the sample. Data of format v1 has no such file: it is read
unchecked, with a warning. With num_workers >= 1 each worker keeps `prefetch_factor` micro-batches
ready; a local page-cached read costs microseconds per sample (see docs/PERFORMANCE.md).

Resume: `state_dict()["consumed_samples"]` counts positions of the global order in completed global
batches (a partly consumed global batch is read again after a resume, as the optimizer step it belonged
to never happened). `load_state_dict` continues at exactly that position, with any dp_size or
global batch size; then call `iter(loader)` again.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_pipeline.errors import LoaderStateError, ShardError
from data_pipeline.manifest import Manifest, load_manifest
from data_pipeline.order import GlobalOrder
from data_pipeline.readers import file_url, is_local, make_reader
from data_pipeline.shard_format import decode_record, record_crc32


class SampleStore:
    """Random access to the samples of one split; opens its reader lazily in each process."""

    def __init__(self, manifest: Manifest, split: str, max_cached_shards: int = 2):
        self.data_dir = manifest.data_dir
        self.split = split
        self.layout = manifest.layout
        self.shard_names = [shard["name"] for shard in manifest.split(split)["shards"]]
        self.shard_starts = manifest.shard_offsets(split)
        self.num_samples = int(self.shard_starts[-1])
        self.vocab_size = manifest.tokenizer["vocab_size"]
        self.max_cached_shards = max_cached_shards
        self.checksums = _SampleChecksums(manifest, split)
        self._reader = None
        self._reader_pid = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    @property
    def reader(self):
        """This process's reader (a forked worker must not share the parent's connections)."""
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader = make_reader(self.data_dir, self.max_cached_shards)
            self._reader_pid = os.getpid()
        return self._reader

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [k, L+1] (uint16/uint32) and document-start masks bool [k, L+1] of samples `indices`."""
        width = self.layout.sample_tokens
        tokens = np.empty((len(indices), width), self.layout.dtype)
        is_start = np.empty((len(indices), width), bool)
        shards = np.searchsorted(self.shard_starts, indices, side="right") - 1
        expected = self.checksums.expected(indices)
        for row, (index, shard) in enumerate(zip(indices.tolist(), shards.tolist(), strict=True)):
            name = self.shard_names[shard]
            offset = (index - int(self.shard_starts[shard])) * self.layout.record_bytes
            record = self.reader.read(name, offset, self.layout.record_bytes)
            where = file_url(self.data_dir, name)
            tokens[row], is_start[row] = decode_record(record, self.layout, index, where)
            if expected is not None:
                self.checksums.check(
                    record, index, int(expected[row]), where, index - int(self.shard_starts[shard])
                )
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            row = int(np.argmax(tokens.max(axis=1) >= self.vocab_size))
            raise ShardError(
                f"{self.data_dir}: sample {int(indices[row])} of split {self.split} holds token "
                f"{int(tokens[row].max())} >= vocab size {self.vocab_size}; the shard is corrupt: "
                "run `python -m data_pipeline.inspect DIR --verify`"
            )
        return tokens, is_start


class _SampleChecksums:
    """The crc32 of every sample of a split (`{split}.crc32`), read lazily in each process.

    Local data is memory-mapped (a lookup is a memory read); other locations read the 4 bytes of a
    sample through their own reader, so the shard cache is not disturbed.
    """

    def __init__(self, manifest: Manifest, split: str):
        self.data_dir = manifest.data_dir
        entry = manifest.checksums(split)
        self.name = None if entry is None else entry["name"]
        self._table, self._pid = None, None
        if self.name is None:
            warnings.warn(
                f"{manifest.where} (format {manifest.data.get('format')}) has no per-sample checksums: "
                f"reads of split {split} are not checked; run `python -m data_pipeline.inspect "
                f"{manifest.data_dir} --verify` once, or prepare the data again to get checksums",
                stacklevel=3,
            )

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_table": None, "_pid": None}

    def expected(self, indices: np.ndarray) -> np.ndarray | None:
        """The recorded crc32 uint32 [k] of samples `indices` [k]; None for data without checksums."""
        if self.name is None:
            return None
        if self._table is None or self._pid != os.getpid():
            self._table, self._pid = self._open(), os.getpid()
        if isinstance(self._table, np.ndarray) and (
            not len(indices) or int(indices.max()) < len(self._table)
        ):
            return self._table[indices]
        return np.array([self._read_one(int(index)) for index in indices], np.uint32)

    def check(self, record: bytes, index: int, expected: int, where: str, in_shard: int) -> None:
        """ShardError unless `record` (sample `index` of the split, record `in_shard` of its shard) has
        crc32 `expected`."""
        actual = record_crc32(record)
        if actual != expected:
            raise ShardError(
                f"{where}: sample {index} (record {in_shard} of the shard) fails its checksum: crc32 "
                f"{actual:08x}, {self.name} says {expected:08x}; the shard is corrupt: copy it again or "
                f"prepare the data again (`python -m data_pipeline.inspect DIR --verify` checks every shard)"
            )

    def _read_one(self, index: int) -> int:
        data = b"" if isinstance(self._table, np.ndarray) else self._table.read(self.name, 4 * index, 4)
        if len(data) != 4:
            raise ShardError(
                f"{file_url(self.data_dir, self.name)}: no checksum for sample {index} (truncated)"
            )
        return int.from_bytes(data, "little")

    def _open(self):
        if not is_local(self.data_dir):
            return make_reader(self.data_dir, max_cached_shards=1)
        path = file_url(self.data_dir, self.name)
        try:
            return np.memmap(path, dtype="<u4", mode="r")
        except (OSError, ValueError) as err:
            raise ShardError(f"checksum file {path} cannot be read: {err}") from err


def make_batch(tokens: np.ndarray, is_start: np.ndarray, indices: np.ndarray) -> dict[str, torch.Tensor]:
    """The model batch of samples tokens [m, T+1], is_start bool [m, T+1] (see the module docstring)."""
    starts = is_start[:, :-1].copy()
    starts[:, 0] = False
    return {
        "input_ids": torch.from_numpy(tokens[:, :-1].astype(np.int64)),
        "labels": torch.from_numpy(tokens[:, 1:].astype(np.int64)),
        "doc_ids": torch.from_numpy(np.cumsum(starts, axis=1, dtype=np.int32)),
        "sample_index": torch.from_numpy(np.asarray(indices, dtype=np.int64)),
    }


class _MicroBatches(Dataset):
    """Micro-batch k of one rank, for k = 0, 1, ... counted from stream position `base`."""

    def __init__(
        self,
        store: SampleStore,
        order: GlobalOrder,
        base: int,
        rows_per_rank: int,
        dp_rank: int,
        global_batch_size: int,
        micro_batch_size: int,
    ):
        self.store, self.order, self.base = store, order, base
        self.rows_per_rank, self.dp_rank = rows_per_rank, dp_rank
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.accumulation_steps = rows_per_rank // micro_batch_size

    def positions(self, k: int) -> np.ndarray:
        """Stream positions int64 [m] of micro-batch k."""
        step, micro = divmod(k, self.accumulation_steps)
        first = (
            self.base
            + step * self.global_batch_size
            + self.dp_rank * self.rows_per_rank
            + micro * self.micro_batch_size
        )
        return first + np.arange(self.micro_batch_size, dtype=np.int64)

    def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens [m, T+1], is_start [m, T+1] and sample indices [m] of micro-batch k."""
        indices = self.order.samples(self.positions(k))
        return (*self.store.read(indices), indices)


class _CountFrom(Sampler):
    """k, k+1, ..., up to `stop` (endless when None)."""

    def __init__(self, start: int, stop: int | None = None):
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(itertools.count(self.start) if self.stop is None else range(self.start, self.stop))


def _iterate(
    dataset: Dataset, start: int, stop: int | None, num_workers: int, prefetch_factor: int, pin_memory: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of dataset[start], dataset[start+1], ... in order, read by num_workers processes (0: inline).

    Workers send compact numpy samples (uint16 tokens, bits) through the pipe; the int64 tensors are made
    here, which costs less than torch's shared-memory transfer of the larger tensors.
    """
    if num_workers == 0:
        samples = (dataset[k] for k in _CountFrom(start, stop))
    else:
        samples = DataLoader(
            dataset,
            batch_size=None,
            sampler=_CountFrom(start, stop),
            num_workers=num_workers,
            prefetch_factor=prefetch_factor,
            collate_fn=_as_is,
        )
    pin = pin_memory and torch.cuda.is_available()
    for sample in samples:
        batch = make_batch(*sample)
        yield {key: value.pin_memory() for key, value in batch.items()} if pin else batch


def _as_is(sample: object) -> object:
    return sample


class GlobalOrderLoader:
    """The endless, resumable training stream of one data-parallel rank (see the module docstring)."""

    def __init__(
        self,
        data_dir: str,
        split: str = "train",
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        prefetch_factor: int = 4,
        pin_memory: bool = False,
        verify_checksums: bool = False,
        max_cached_shards: int = 2,
    ):
        _check_batch_shape(global_batch_size, micro_batch_size, dp_rank, dp_size)
        self.manifest = load_manifest(data_dir)
        self.split, self.seed = split, seed
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        _check_shards(self.manifest, split, verify_checksums)
        self.store = SampleStore(self.manifest, split, max_cached_shards)
        self.order = GlobalOrder(self.store.num_samples, seed)
        self.fingerprint = self.manifest.fingerprint()
        self._base = 0
        self._micro_done = 0
        self._generation = 0

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def samples_per_epoch(self) -> int:
        return self.store.num_samples

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // self.dp_size // self.micro_batch_size

    @property
    def consumed_samples(self) -> int:
        """Stream positions in the global batches this rank has completed."""
        return self._base + self._micro_done // self.accumulation_steps * self.global_batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._generation += 1
        return self._stream(self._generation)

    def _stream(self, generation: int) -> Iterator[dict[str, torch.Tensor]]:
        rows = self.global_batch_size // self.dp_size
        dataset = _MicroBatches(
            self.store,
            self.order,
            self._base,
            rows,
            self.dp_rank,
            self.global_batch_size,
            self.micro_batch_size,
        )
        start = self._micro_done
        batches = _iterate(dataset, start, None, self.num_workers, self.prefetch_factor, self.pin_memory)
        for k, batch in zip(itertools.count(start), batches):
            if generation != self._generation:
                raise RuntimeError(
                    "this loader iterator is stale: iter(loader) or load_state_dict was called since"
                )
            self._micro_done = k + 1
            yield batch

    def state_dict(self) -> dict:
        """{"consumed_samples", "epoch", "seed", "split", "data_fingerprint", "global_batch_size"}."""
        consumed = self.consumed_samples
        return {
            "consumed_samples": consumed,
            "epoch": consumed // self.samples_per_epoch,
            "seed": self.seed,
            "split": self.split,
            "data_fingerprint": self.fingerprint,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at state["consumed_samples"]; LoaderStateError if it is for other data, split or seed."""
        expected = {"seed": self.seed, "split": self.split, "data_fingerprint": self.fingerprint}
        for key, value in expected.items():
            if key in state and state[key] != value:
                raise LoaderStateError(
                    f"loader state has {key}={state[key]!r} but this loader has {value!r} "
                    f"({self.manifest.where}); resume with the data and seed of the checkpoint"
                )
        self._base = int(state["consumed_samples"])
        self._micro_done = 0
        self._generation += 1


class ValidationLoader:
    """The validation split in a fixed order: global batch b is samples [b*B*R, (b+1)*B*R), rank r
    takes rows [r*B, (r+1)*B). `max_samples` is rounded down to whole global batches, so every rank
    yields `len(loader)` batches of B rows."""

    def __init__(
        self,
        data_dir: str,
        batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        max_samples: int | None = None,
        split: str = "val",
        num_workers: int = 0,
        prefetch_factor: int = 4,
        verify_checksums: bool = False,
        max_cached_shards: int = 2,
    ):
        _check_batch_shape(batch_size * dp_size, batch_size, dp_rank, dp_size)
        self.manifest = load_manifest(data_dir)
        _check_shards(self.manifest, split, verify_checksums)
        self.store = SampleStore(self.manifest, split, max_cached_shards)
        available = (
            self.store.num_samples if max_samples is None else min(max_samples, self.store.num_samples)
        )
        self.num_batches = available // (batch_size * dp_size)
        if self.num_batches == 0:
            raise ShardError(
                f"{self.manifest.where}: split {split} has {self.store.num_samples} samples (max_samples="
                f"{max_samples}), fewer than one validation batch of {batch_size} x {dp_size} ranks"
            )
        self.num_samples = self.num_batches * batch_size * dp_size
        self.batch_size, self.dp_rank, self.dp_size = batch_size, dp_rank, dp_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = GlobalOrder(self.store.num_samples, seed=0, shuffle=False)
        rows = self.batch_size * self.dp_size
        dataset = _MicroBatches(self.store, order, 0, self.batch_size, self.dp_rank, rows, self.batch_size)
        return _iterate(dataset, 0, self.num_batches, self.num_workers, self.prefetch_factor, False)


def _check_batch_shape(global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
    if micro_batch_size < 1 or global_batch_size % (dp_size * micro_batch_size):
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a multiple of dp_size {dp_size} x "
            f"micro_batch_size {micro_batch_size}"
        )


def _check_shards(manifest: Manifest, split: str, verify_checksums: bool) -> None:
    manifest.check_sizes(split)
    if verify_checksums:
        problems = manifest.verify(split)
        if problems:
            raise ShardError("; ".join(problems))
