"""`python -m data_pipeline.prepare`: documents -> tokenized, packed WebDataset shards and manifest.json.

    python -m data_pipeline.prepare --input 'pile/train/*.jsonl.zst' --tokenizer tiktoken:gpt2 \\
        --seq-len 2048 --out data/pile-gpt2-2048 --val-input pile/val.jsonl.zst --workers 16

Flow: the main process reads records (lines, rows, files) in input order and sends chunks of them to
`--workers` tokenizer processes; results come back in input order, so the shards are byte-identical for
any number of workers. Documents get an EOS and are packed (data_pipeline.packing) into samples of
seq_len + 1 tokens; every `--shard-samples` samples become a shard `{split}-{index:06d}.tar`
(data_pipeline.shard_format), written to a temporary name and renamed; the crc32 of each of its samples
is appended to `{split}.crc32`.

Validation split: `--val-input FILES` (separate files; a file that is also an `--input` is refused),
`--val-docs K` (the first K records of the input), or `--val-fraction F` (each record with probability F,
decided by a hash of (--seed, record index)). The validation split is written first, then train; each is
one packing stream.

Resume: after each shard the state (records consumed, counters, the samples not yet in a shard) is saved
in `OUT/.prepare/`, but only once every record it covers is verified: zstd checks a frame's checksum at
the frame's end, so a checkpoint inside a zstd frame waits for that frame to end (a single-frame file is
committed only at its end; with --val-docs the rest of the frame is read to check the validation records).
Re-running the same command continues after the last committed shard, skipping exactly the records
already consumed, and produces the same shards as an uninterrupted run; shards written after that point
are written again. manifest.json is written last; then `.prepare/` is removed. A rerun with other settings
names each setting that differs; `--restart` deletes what an earlier prepare wrote into OUT (its shards,
checksum files, manifest and state: nothing else) and starts over. A rerun of a finished prepare checks
that every file the manifest lists is there with its size.

Bad records (invalid UTF-8, invalid JSON, no string "text"): `--on-bad-record error` (default) stops
with the file and line; `skip` counts them, reports them at the end and in the manifest. Blank lines
and empty texts are counted, never packed. Documents are never split or dropped otherwise, except the
last partial sample of each split, whose token count is reported (`dropped_tail_tokens`).
"""

from __future__ import annotations

import argparse
import collections
import copy
import fcntl
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.errors import (
    BadRecordError,
    DataError,
    EmptyInputError,
    InputOverlapError,
    PrepareStateError,
)
from data_pipeline.manifest import CRC_SUFFIX, FORMAT, MANIFEST, crc_file, write_json_atomic
from data_pipeline.packing import Packer
from data_pipeline.readers import file_sha256
from data_pipeline.shard_format import RecordLayout, write_shard
from data_pipeline.sources import (
    BLANK,
    JSONL,
    InputFile,
    InputProgress,
    expand_inputs,
    iter_records,
    parse_record,
)
from data_pipeline.tokenizer import Tokenizer, load_tokenizer, token_dtype

STATE_DIR = ".prepare"
SETTING_KEYS = ("format", "seq_len", "token_dtype", "shard_samples", "seed", "val_docs", "val_fraction")
BLANK_CODE, BAD_CODE, EMPTY_CODE = -1, -2, -3
MAX_EXAMPLES = 20


@dataclass
class PrepareConfig:
    """Options of one prepare run (the command-line flags)."""

    inputs: list[str]
    tokenizer: str
    seq_len: int
    out: str
    workers: int = 1
    shard_samples: int = 16384
    val_docs: int | None = None
    val_fraction: float | None = None
    val_inputs: list[str] = field(default_factory=list)
    seed: int = 0
    on_bad_record: str = "error"
    progress: bool = True
    restart: bool = False
    chunk_records: int = 256
    chunk_bytes: int = 1 << 20


@dataclass
class SplitPlan:
    """Which records go into one split: `select(global_record_index)`, reading stops at `stop`."""

    name: str
    inputs: list[InputFile]
    select: Callable[[int], bool]
    stop: int | None = None


def prepare(config: PrepareConfig) -> dict:
    """Run (or resume) a prepare; return the manifest. Raises DataError subclasses on bad input.

    With workers > 1 the worker processes are spawned, so a script calling this must do so under
    `if __name__ == "__main__":` (as for any multiprocessing code).
    """
    _check_config(config)
    tokenizer = load_tokenizer(config.tokenizer)
    inputs = expand_inputs(config.inputs)
    val_inputs = expand_inputs(config.val_inputs) if config.val_inputs else []
    _check_no_overlap(inputs, val_inputs)
    settings = _settings(config, tokenizer, inputs, val_inputs)
    _make_out(config.out)
    with _locked(config.out):
        if config.restart:
            _clear_out(config.out)
        done = _finished_manifest(config.out, settings)
        if done is not None:
            _log(f"{config.out} is already prepared with these settings; nothing to do")
            return done
        store = _StateStore(config.out, settings)
        layout = RecordLayout.build(config.seq_len, settings["token_dtype"])
        with _WorkerPool(tokenizer, config.workers) as pool:
            for plan in _plans(config, inputs, val_inputs):
                _SplitRun(plan, config, layout, store, pool).run()
        manifest = _manifest(settings, layout, store.state["splits"], config)
        write_json_atomic(os.path.join(config.out, MANIFEST), manifest)
        shutil.rmtree(store.folder)
    _report(manifest)
    return manifest


def _check_config(config: PrepareConfig) -> None:
    if config.seq_len < 1 or config.shard_samples < 1 or config.workers < 1:
        raise DataError("--seq-len, --shard-samples and --workers must be positive")
    chosen = [config.val_docs is not None, config.val_fraction is not None, bool(config.val_inputs)]
    if sum(chosen) > 1:
        raise DataError("choose one of --val-docs, --val-fraction, --val-input")
    if config.val_fraction is not None and not 0 < config.val_fraction < 1:
        raise DataError(f"--val-fraction {config.val_fraction} must be between 0 and 1")
    if config.on_bad_record not in ("error", "skip"):
        raise DataError(f"--on-bad-record {config.on_bad_record!r} must be 'error' or 'skip'")


def _make_out(out: str) -> None:
    """Create the output folder; PrepareStateError if `out` exists and is not a folder."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareStateError(f"--out {out} is a file, not a folder; choose a folder for the prepared data")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise PrepareStateError(f"--out {out} cannot be created: {err}") from err


def _file_identity(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _check_no_overlap(inputs: list[InputFile], val_inputs: list[InputFile]) -> None:
    """InputOverlapError if a file (same file, under any path or link) is both a train and a val input."""
    val_files = {_file_identity(f.path): f.path for f in val_inputs}
    for source in inputs:
        other = val_files.get(_file_identity(source.path))
        if other is not None:
            raise InputOverlapError(
                f"input {source.path} is also a validation input (--val-input {other}): its documents would "
                "be in both splits; remove it from --input or from --val-input"
            )


def _settings(config: PrepareConfig, tokenizer: Tokenizer, inputs: list[InputFile], val_inputs) -> dict:
    """Everything the output depends on; its hash guards resuming and re-running."""
    settings = {
        "format": FORMAT,
        "seq_len": config.seq_len,
        "token_dtype": token_dtype(tokenizer.vocab_size),
        "shard_samples": config.shard_samples,
        "seed": config.seed,
        "val_docs": config.val_docs,
        "val_fraction": config.val_fraction,
        "tokenizer": {
            "spec": tokenizer.spec,
            "name": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "vocab_hash": tokenizer.vocab_hash,
        },
        "inputs": [{"path": f.path, "bytes": f.size} for f in inputs],
        "val_inputs": [{"path": f.path, "bytes": f.size} for f in val_inputs],
    }
    identity = _identity(settings)
    settings["settings_hash"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return settings


def _identity(settings: dict) -> dict:
    """What the settings hash covers (input paths made absolute); also readable from a manifest."""
    identity = {k: settings.get(k) for k in SETTING_KEYS}
    identity["vocab_hash"] = settings["tokenizer"]["vocab_hash"]
    for key in ("inputs", "val_inputs"):
        identity[key] = [[os.path.abspath(f["path"]), f["bytes"]] for f in settings.get(key) or []]
    return identity


def _differences(old: dict, new: dict) -> list[str]:
    """One line per setting of `old` (a manifest or saved settings) that differs from `new`."""
    if "tokenizer" not in old:
        return ["its settings are not recorded (written by an older version of data_pipeline)"]
    before, after = _identity(old), _identity(new)
    lines = []
    for key in sorted(after):
        if key in ("inputs", "val_inputs"):
            lines += _input_differences(key, before[key], after[key])
        elif before[key] != after[key]:
            lines.append(f"{key} was {_short(before[key])}, now {_short(after[key])}")
    return lines or ["the settings hash differs"]


def _input_differences(key: str, before: list, after: list) -> list[str]:
    flag = "--input" if key == "inputs" else "--val-input"
    old, new = dict(map(tuple, before)), dict(map(tuple, after))
    lines = [
        f"{flag} {path} was {old[path]} bytes, now {new[path]}"
        for path in new
        if old.get(path, new[path]) != new[path]
    ]
    lines += [f"{flag} {path} is new" for path in new if path not in old]
    lines += [f"{flag} {path} is no longer given" for path in old if path not in new]
    if not lines and before != after:
        lines.append(f"{flag} files are in another order")
    return lines


def _short(value: object) -> str:
    text = repr(value)
    return text[:16] + "..." if isinstance(value, str) and len(value) > 32 else text


def _settings_mismatch(what: str, path: str, old: dict, new: dict) -> PrepareStateError:
    return PrepareStateError(
        f"{what} made with other settings ({path}): {'; '.join(_differences(old, new))}. Re-run with the "
        f"earlier settings, choose another --out, or add --restart to delete it and prepare with these settings"
    )


def _finished_manifest(out: str, settings: dict) -> dict | None:
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise PrepareStateError(f"{path} cannot be read ({err}); add --restart to prepare again") from err
    if manifest.get("settings_hash") != settings["settings_hash"]:
        raise _settings_mismatch(f"{out} holds data", path, manifest, settings)
    _check_listed_files(out, manifest["splits"], path)
    shutil.rmtree(os.path.join(out, STATE_DIR), ignore_errors=True)
    return manifest


def _check_listed_files(out: str, splits: dict, where: str) -> None:
    """PrepareStateError naming the first shard or checksum file of `splits` that is missing or resized."""
    for split in splits.values():
        files = list(split["shards"]) + ([split["sample_crc32"]] if "sample_crc32" in split else [])
        for entry in files:
            file = os.path.join(out, entry["name"])
            size = os.path.getsize(file) if os.path.isfile(file) else None
            if size != entry["bytes"]:
                found = "is missing" if size is None else f"has {size} bytes, not {entry['bytes']}"
                raise PrepareStateError(
                    f"{file}, listed in {where}, {found}: the prepared data is incomplete; "
                    "add --restart to prepare it again"
                )


def _clear_out(out: str) -> None:
    """Delete what a prepare writes into `out` (nothing else): manifest, state, shards, checksum files."""
    names = [MANIFEST] + [
        name
        for name in os.listdir(out)
        if (name.startswith(("train-", "val-")) and name.endswith((".tar", ".tar.tmp")))
        or name in (f"train{CRC_SUFFIX}", f"val{CRC_SUFFIX}")
    ]
    removed = [name for name in names if os.path.isfile(os.path.join(out, name))]
    for name in removed:
        os.remove(os.path.join(out, name))
    shutil.rmtree(os.path.join(out, STATE_DIR), ignore_errors=True)
    _log(f"--restart: removed {len(removed)} files of an earlier prepare from {out}")


class _locked:
    """Exclusive lock on the output folder, so two prepares never write into one folder."""

    def __init__(self, out: str):
        self.out = out

    def __enter__(self) -> None:
        self.fd = os.open(self.out, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(self.fd)
            raise PrepareStateError(
                f"another prepare is writing into {self.out}; wait for it to finish"
            ) from err

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _plans(config: PrepareConfig, inputs: list[InputFile], val_inputs: list[InputFile]) -> list[SplitPlan]:
    """The validation plan (if any), then the train plan."""
    everything = _always
    if val_inputs:
        return [SplitPlan("val", val_inputs, everything), SplitPlan("train", inputs, everything)]
    if config.val_docs is not None:
        val_docs = config.val_docs
        return [
            SplitPlan("val", inputs, lambda index: index < val_docs, stop=val_docs),
            SplitPlan("train", inputs, lambda index: index >= val_docs),
        ]
    if config.val_fraction is not None:
        fraction, seed = config.val_fraction, config.seed
        return [
            SplitPlan("val", inputs, lambda index: _unit_hash(seed, index) < fraction),
            SplitPlan("train", inputs, lambda index: _unit_hash(seed, index) >= fraction),
        ]
    return [SplitPlan("train", inputs, everything)]


def _always(index: int) -> bool:
    return True


def _unit_hash(seed: int, index: int) -> float:
    """A uniform number in [0, 1) from (seed, index), the same on every machine (splitmix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((x ^ (x >> 31)) >> 11) / float(1 << 53)


class _StateStore:
    """`OUT/.prepare/state.json` (counters per split) and the carry files of unfinished samples."""

    def __init__(self, out: str, settings: dict):
        self.out = out
        self.folder = os.path.join(out, STATE_DIR)
        self.path = os.path.join(self.folder, "state.json")
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.state = json.load(f)
            if self.state["settings_hash"] != settings["settings_hash"]:
                old = self.state.get("settings", {})
                raise _settings_mismatch(f"{out} holds an unfinished prepare", self.path, old, settings)
            _check_listed_files(out, self.state["splits"], self.path)
            _log(f"resuming the unfinished prepare in {out}")
        else:
            stale = glob.glob(os.path.join(out, "train-*.tar")) + glob.glob(os.path.join(out, "val-*.tar"))
            if stale:
                raise PrepareStateError(
                    f"{out} holds shards ({os.path.basename(stale[0])}, ...) but no prepare state; "
                    "choose an empty --out, or add --restart to delete them"
                )
            os.makedirs(self.folder, exist_ok=True)
            self.state = {"settings_hash": settings["settings_hash"], "settings": settings, "splits": {}}
            self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.state)

    def save_carry(self, name: str, arrays: dict[str, np.ndarray]) -> str:
        """Write arrays to `.prepare/NAME.npz` (through a rename); return the file name."""
        tmp = os.path.join(self.folder, f"{name}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, os.path.join(self.folder, f"{name}.npz"))
        return f"{name}.npz"

    def load_carry(self, name: str) -> dict[str, np.ndarray]:
        with np.load(os.path.join(self.folder, name)) as data:
            return {key: data[key] for key in data.files}

    def remove(self, name: str) -> None:
        path = os.path.join(self.folder, name)
        if os.path.exists(path):
            os.remove(path)


def _new_split_state() -> dict:
    return {
        "next": [0, 0, 0],
        "shards": [],
        "samples": 0,
        "documents": 0,
        "records": 0,
        "input_tokens": 0,
        "blank_lines": 0,
        "empty_documents": 0,
        "skipped": {},
        "skipped_examples": [],
        "carry": None,
        "checkpoints": 0,
        "dropped_tail_tokens": 0,
        "complete": False,
    }


@dataclass
class _Chunk:
    """Consecutive records of one input, sent to a tokenizer worker together."""

    fmt: str
    positions: list[tuple[int, int, int]]
    raws: list[object]


@dataclass
class _ShardJob:
    """A shard being written by a worker, and the checkpoint that becomes durable with it."""

    name: str
    result: _Result
    checkpoint: tuple[dict, dict[str, np.ndarray]] | None = None


class _SplitRun:
    """Packs one split's documents into shards; a checkpoint is saved once its shards are on disk and
    every record it covers is verified (`progress`).

    `state` holds the counters of everything processed; `durable` is the last saved checkpoint; `held` is
    the newest checkpoint whose shards are written but whose records are not all verified yet.
    Shards are written by the worker pool (in the background) and renamed in order by this process,
    which also appends their samples' crc32 to `{split}.crc32`.
    """

    def __init__(self, plan, config, layout, store: _StateStore, pool: _WorkerPool):
        self.plan, self.config, self.layout, self.store, self.pool = plan, config, layout, store, pool
        self.durable = store.state["splits"].setdefault(plan.name, _new_split_state())
        self.state = copy.deepcopy(self.durable)
        self.packer = Packer(layout.sample_tokens, layout.dtype)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_count = 0
        self.jobs: collections.deque[_ShardJob] = collections.deque()
        self.written: dict[str, dict] = {}
        self.progress = InputProgress()
        self.held: tuple[dict, dict[str, np.ndarray]] | None = None
        self.crc_path = os.path.join(config.out, crc_file(plan.name))

    def run(self) -> None:
        if self.state["complete"]:
            return
        self._restore()
        self._reset_crc_file()
        self.bar = _Progress(self.plan.name, self.config.progress, self.state)
        for chunk, (lengths, tokens, problems) in self.pool.map(_tokenize_chunk, self._chunks()):
            offset = 0
            for item, position in enumerate(chunk.positions):
                shards_before = len(self.state["shards"])
                offset += self._handle(item, position, lengths[item], tokens, offset, problems)
                if len(self.state["shards"]) > shards_before:
                    self.jobs[-1].checkpoint = self._snapshot(position)
                    self._collect(block=True, keep=self.pool.max_background_writes)
            self._collect(block=False)
            self._commit_held()
            self.bar.update(len(chunk.positions))
        self._finish()

    def _chunks(self) -> Iterator[_Chunk]:
        chunk, size = None, 0
        for input_index, record_index, global_index, raw in self._selected():
            fmt = self.plan.inputs[input_index].fmt
            if chunk is not None and (
                chunk.positions[-1][0] != input_index
                or len(chunk.raws) >= self.config.chunk_records
                or size >= self.config.chunk_bytes
            ):
                yield chunk
                chunk = None
            if chunk is None:
                chunk, size = _Chunk(fmt, [], []), 0
            chunk.positions.append((input_index, record_index, global_index))
            chunk.raws.append(raw)
            size += len(raw) if isinstance(raw, bytes | str) else 0
        if chunk is not None:
            yield chunk

    def _selected(self) -> Iterator[tuple[int, int, int, object]]:
        input_index, record_index, global_index = self.state["next"]
        records = iter_records(self.plan.inputs, (input_index, record_index), self.progress)
        for position in records:
            if self.plan.stop is not None and global_index >= self.plan.stop:
                self._verify_to(records, position[0], position[1])
                return
            if self.plan.select(global_index):
                yield (*position[:2], global_index, position[2])
            global_index += 1

    def _verify_to(self, records: Iterator, input_index: int, record_end: int) -> None:
        """Read on (without using the records) until records [0, record_end) of the input are verified."""
        while not self.progress.covers(input_index, record_end):
            if next(records, None) is None:
                return

    def _verified(self, state: dict) -> bool:
        input_index, record_end, _ = state["next"]
        return self.progress.covers(input_index, record_end)

    def _handle(self, item, position, length, tokens, offset, problems) -> int:
        """Count or pack record `item` of a chunk; return how many of the chunk's tokens it used."""
        self.state["records"] += 1
        if length == BLANK_CODE:
            self.state["blank_lines"] += 1
        elif length == EMPTY_CODE:
            self.state["empty_documents"] += 1
        elif length == BAD_CODE:
            self._bad_record(position, *problems[item])
        else:
            self.state["documents"] += 1
            self.state["input_tokens"] += int(length)
            self._add_samples(*self.packer.add(tokens[offset : offset + length]))
            return int(length)
        return 0

    def _bad_record(self, position, reason: str, detail: str) -> None:
        where = self.plan.inputs[position[0]].location(position[1])
        if self.config.on_bad_record == "error":
            raise BadRecordError(
                f"{where}: {detail}. Fix the input, or re-run with --on-bad-record skip to skip and count bad records"
            )
        self.state["skipped"][reason] = self.state["skipped"].get(reason, 0) + 1
        if len(self.state["skipped_examples"]) < MAX_EXAMPLES:
            self.state["skipped_examples"].append(f"{where}: {detail}")

    def _add_samples(self, tokens: np.ndarray, is_start: np.ndarray) -> None:
        if len(tokens):
            self.pending.append((tokens, is_start))
            self.pending_count += len(tokens)
        while self.pending_count >= self.config.shard_samples:
            self._cut_shard(self.config.shard_samples)

    def _cut_shard(self, count: int) -> None:
        """Send the first `count` pending samples to a worker as the next shard."""
        tokens = np.concatenate([t for t, _ in self.pending])
        is_start = np.concatenate([s for _, s in self.pending])
        name = f"{self.plan.name}-{len(self.state['shards']):06d}.tar"
        path = os.path.join(self.config.out, name + ".tmp")
        args = (path, self.layout, self.state["samples"], tokens[:count], is_start[:count])
        self.jobs.append(_ShardJob(name, self.pool.submit(_write_shard_task, args)))
        self.state["shards"].append(
            {"name": name, "samples": count, "tokens": count * self.layout.sample_tokens}
        )
        self.state["samples"] += count
        self.pending = [(tokens[count:], is_start[count:])] if count < len(tokens) else []
        self.pending_count = len(tokens) - count

    def _snapshot(self, position: tuple[int, int, int]) -> tuple[dict, dict[str, np.ndarray]]:
        """The state as of just after record `position`, and the samples not yet in a shard."""
        state = copy.deepcopy(self.state)
        state["next"] = [position[0], position[1] + 1, position[2] + 1]
        partial_tokens, partial_starts = self.packer.carry()
        width = self.layout.sample_tokens
        pending = self.pending or [(np.zeros((0, width), self.layout.dtype), np.zeros((0, width), bool))]
        arrays = {
            "pending_tokens": np.concatenate([t for t, _ in pending]),
            "pending_starts": np.concatenate([s for _, s in pending]),
            "partial_tokens": partial_tokens,
            "partial_starts": partial_starts,
        }
        return state, arrays

    def _collect(self, block: bool, keep: int = 0) -> None:
        """Finish shard writes in order: rename, append the samples' crc32, offer the checkpoint that
        waited for them."""
        while len(self.jobs) > keep and (block or self.jobs[0].result.ready()):
            job = self.jobs.popleft()
            result = dict(job.result.get())
            crcs = result.pop("crc32")
            self.written[job.name] = result
            path = os.path.join(self.config.out, job.name)
            os.replace(path + ".tmp", path)
            with open(self.crc_path, "ab") as f:
                f.write(crcs.astype("<u4").tobytes())
            if job.checkpoint is not None:
                self.held = job.checkpoint
                self._commit_held()

    def _commit_held(self) -> None:
        """Persist the held checkpoint once its records are verified (a newer one replaces it before)."""
        if self.held is not None and self._verified(self.held[0]):
            self._persist(*self.held)
            self.held = None

    def _reset_crc_file(self) -> None:
        """Cut `{split}.crc32` to the samples of the durable checkpoint (later shards are written again)."""
        size = 4 * self.durable["samples"]
        have = os.path.getsize(self.crc_path) if os.path.isfile(self.crc_path) else 0
        if have < size:
            raise PrepareStateError(
                f"{self.crc_path} has {have} bytes, {self.store.path} needs {size}: it was cut or deleted; "
                "add --restart to prepare again"
            )
        with open(self.crc_path, "ab") as f:
            f.truncate(size)

    def _persist(self, state: dict, arrays: dict[str, np.ndarray] | None) -> None:
        """Make `state` (whose shards are all written) and its carry arrays the durable checkpoint."""
        for shard in state["shards"]:
            if "sha256" not in shard:
                shard.update(self.written[shard["name"]])
        state["checkpoints"] = self.durable["checkpoints"] + 1
        carry = f"{self.plan.name}-carry-{state['checkpoints']:06d}"
        state["carry"] = self.store.save_carry(carry, arrays) if arrays is not None else None
        old = self.durable["carry"]
        self.durable = self.store.state["splits"][self.plan.name] = state
        self.store.save()
        if old:
            self.store.remove(old)

    def _restore(self) -> None:
        """Continue from the last checkpoint: its pending samples and partial sample."""
        if self.durable["carry"] is None:
            return
        arrays = self.store.load_carry(self.durable["carry"])
        if len(arrays["pending_tokens"]):
            self.pending = [(arrays["pending_tokens"], arrays["pending_starts"])]
            self.pending_count = len(arrays["pending_tokens"])
        self.packer.restore(arrays["partial_tokens"], arrays["partial_starts"])

    def _finish(self) -> None:
        self.bar.close()
        if self.state["documents"] == 0:
            inputs = ", ".join(f.path for f in self.plan.inputs)
            raise EmptyInputError(
                f"the {self.plan.name} split got no document from {inputs} ({self.state['records']} records: "
                f"{self.state['blank_lines']} blank, {self.state['empty_documents']} empty, "
                f"{sum(self.state['skipped'].values())} skipped)"
            )
        if self.pending_count:
            self._cut_shard(self.pending_count)
        self._collect(block=True)
        if not self.state["shards"]:
            raise EmptyInputError(
                f"the {self.plan.name} split has {self.state['input_tokens']} tokens, fewer than one sample of "
                f"{self.layout.sample_tokens}; give more input or a smaller --seq-len"
            )
        final = copy.deepcopy(self.state)
        final["dropped_tail_tokens"] = self.packer.fill
        final["complete"] = True
        # every record is read and verified now; the final state supersedes any held checkpoint
        self.held = None
        self._persist(final, None)


class _Progress:
    """A tqdm bar of documents with tokens and tokens/s."""

    def __init__(self, split: str, enabled: bool, state: dict):
        from tqdm import tqdm

        self.state = state
        self.start_tokens = state["input_tokens"]
        self.start = time.monotonic()
        self.bar = tqdm(
            desc=f"prepare {split}", unit=" docs", disable=not enabled, file=sys.stderr, mininterval=1
        )

    def update(self, records: int) -> None:
        self.bar.update(records)
        rate = (self.state["input_tokens"] - self.start_tokens) / max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"{self.state['input_tokens']:,} tokens, {rate:,.0f} tokens/s", refresh=False
        )

    def close(self) -> None:
        self.bar.close()


class _Result:
    """The result of a task run inline (the interface of multiprocessing's AsyncResult)."""

    def __init__(self, value):
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self):
        return self.value


class _WorkerPool:
    """Runs tokenize and shard-write tasks in `workers` processes (inline for one worker)."""

    def __init__(self, tokenizer: Tokenizer, workers: int):
        self.tokenizer, self.workers = tokenizer, workers
        self.pool = None

    def __enter__(self) -> _WorkerPool:
        global _WORKER_TOKENIZER
        _WORKER_TOKENIZER = self.tokenizer
        if self.workers > 1:
            context = multiprocessing.get_context("spawn")
            self.pool = context.Pool(self.workers, initializer=_init_worker, initargs=(self.tokenizer.spec,))
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    @property
    def max_background_writes(self) -> int:
        """Shards that may be in flight at once (each holds its samples in memory)."""
        return 0 if self.pool is None else self.workers

    def submit(self, function: Callable, args: tuple) -> _Result:
        """Start `function(*args)`; the result has `ready()` and `get()`."""
        if self.pool is None:
            return _Result(function(*args))
        return self.pool.apply_async(function, args)

    def map(self, function: Callable, items: Iterator) -> Iterator[tuple[object, object]]:
        """Yield (item, function(item.fmt, item.raws)) in order, at most 4 items per worker in flight."""
        in_flight: collections.deque = collections.deque()
        for item in items:
            in_flight.append((item, self.submit(function, (item.fmt, item.raws))))
            if len(in_flight) >= 4 * self.workers:
                done, result = in_flight.popleft()
                yield done, result.get()
        while in_flight:
            done, result = in_flight.popleft()
            yield done, result.get()


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(spec: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(spec)


def _tokenize_chunk(
    fmt: str, raws: list[object]
) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[str, str]]]:
    """Parse and tokenize records; EOS appended to each document.

    Returns lengths int64 [n] (tokens of record i incl. EOS, or BLANK_CODE / BAD_CODE / EMPTY_CODE),
    the documents' tokens concatenated (uint32), and {record: (reason, detail)} for bad records.
    """
    tokenizer = _WORKER_TOKENIZER
    lengths = np.zeros(len(raws), np.int64)
    pieces: list[list[int]] = []
    problems: dict[int, tuple[str, str]] = {}
    for i, raw in enumerate(raws):
        if fmt == JSONL and raw == BLANK:
            lengths[i] = BLANK_CODE
            continue
        text = parse_record(fmt, raw)
        if isinstance(text, tuple):
            lengths[i], problems[i] = BAD_CODE, text
        elif not text:
            lengths[i] = EMPTY_CODE
        else:
            ids = tokenizer.encode(text)
            ids.append(tokenizer.eos_id)
            lengths[i] = len(ids)
            pieces.append(ids)
    tokens = np.array(list(itertools.chain.from_iterable(pieces)), np.uint32)
    return lengths, tokens, problems


def _write_shard_task(
    path: str, layout: RecordLayout, first: int, tokens: np.ndarray, is_start: np.ndarray
) -> dict:
    return write_shard(path, layout, first, tokens, is_start)


def _manifest(settings: dict, layout: RecordLayout, splits: dict, config: PrepareConfig) -> dict:
    manifest = {key: value for key, value in settings.items()}
    manifest["layout"] = layout.to_dict()
    manifest["on_bad_record"] = config.on_bad_record
    manifest["splits"] = {}
    for name, state in splits.items():
        entry = {key: state[key] for key in state if key not in ("next", "carry", "checkpoints", "complete")}
        entry["tokens"] = state["samples"] * layout.sample_tokens
        sha, size = file_sha256(config.out, crc_file(name))
        entry["sample_crc32"] = {"name": crc_file(name), "bytes": size, "sha256": sha}
        manifest["splits"][name] = entry
    return manifest


def _report(manifest: dict) -> None:
    for name, split in manifest["splits"].items():
        skipped = sum(split["skipped"].values())
        _log(
            f"{name}: {split['documents']:,} documents -> {split['samples']:,} samples "
            f"({split['tokens']:,} tokens) in {len(split['shards'])} shards; "
            f"{split['dropped_tail_tokens']} tail tokens dropped, {split['blank_lines']} blank lines, "
            f"{split['empty_documents']} empty documents, {skipped} bad records skipped {split['skipped'] or ''}"
        )
        for example in split["skipped_examples"][:5]:
            _log(f"  skipped {example}")


def _log(message: str) -> None:
    print(f"[data_pipeline.prepare] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> PrepareConfig:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.prepare", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="files or globs: .jsonl[.zst], .txt[.zst], .parquet"
    )
    parser.add_argument("--tokenizer", required=True, help="tiktoken:gpt2, sentencepiece:PATH, hf:PATH, ...")
    parser.add_argument(
        "--seq-len", type=int, required=True, help="tokens per training row (samples hold one more)"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--workers", type=int, default=len(os.sched_getaffinity(0)), help="tokenizer processes"
    )
    parser.add_argument("--shard-samples", type=int, default=16384, help="samples per shard")
    parser.add_argument(
        "--val-docs", type=int, help="the first K records of the input form the validation split"
    )
    parser.add_argument(
        "--val-fraction", type=float, help="each record goes to validation with this probability"
    )
    parser.add_argument("--val-input", nargs="+", default=[], help="separate validation files or globs")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of --val-fraction; recorded in the manifest"
    )
    parser.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="delete what an earlier (unfinished or other) prepare wrote into --out, then start over",
    )
    args = parser.parse_args(argv)
    return PrepareConfig(
        inputs=args.input,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        out=args.out,
        workers=args.workers,
        shard_samples=args.shard_samples,
        val_docs=args.val_docs,
        val_fraction=args.val_fraction,
        val_inputs=args.val_input,
        seed=args.seed,
        on_bad_record=args.on_bad_record,
        progress=not args.no_progress,
        restart=args.restart,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        prepare(parse_args(argv))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
