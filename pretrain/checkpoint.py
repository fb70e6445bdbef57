"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, reshardable, visible only when complete.

Layout of `RUN/checkpoints/step_{step:08d}/`: DCP files for {"model", "optim"} (tensors only), one
`rng_rank{r}.json` per rank, `train_state.json`, `config.yaml`, and, written last, `meta.json` with the size
and sha256 of every file. The folder is written as `step_...tmp` and renamed when complete.

Loading never executes code stored in the folder (see pretrain/safe_dcp.py): `.metadata` goes through an
unpickler with an exact allow-list, tensor records must be torch zip records read with `weights_only=True`,
byte entries where a tensor is expected are refused, and everything else is JSON or YAML.

A checkpoint is usable when every file in its folder is listed in meta.json with its size and sha256 and
matches, and it loads. Resume takes the newest usable one, falling back past any that fail either test; when
none is usable it stops with the reason for each. Pruning (keep_last) counts only verified checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pretrain.config import CheckpointConfig
from pretrain.safe_dcp import SafeFileSystemReader, SafeLoadPlanner, UnsafeCheckpointError
from pretrain.tensor_parallel import checkpoint_view

log = logging.getLogger(__name__)
# single-process runs save and load with DCP without a process group, which DCP warns about every time
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the reason."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict:
    """This rank's RNG states (python, numpy, torch, cuda) as JSON-able values."""
    version, py_state, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(py_state), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state tensors of an optimizer that has not stepped yet, as its first step would find them.

    DCP saves and loads into existing state tensors (its own helper creates them with a real step at lr 0, which
    leaves AdamW's step count at 1: a checkpoint written before the first update would then resume with its bias
    correction one step ahead, and saving would shift the live run the same way). Here the step at lr 0 (no
    weight changes) creates exp_avg and exp_avg_sq at zero and the step count is put back to 0, which is exactly
    the state AdamW builds lazily at its first step. An optimizer with state is left alone.
    """
    if optimizer.state:
        return
    saved_lrs = [g["lr"] for g in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, saved_lrs, strict=True):
        group["lr"] = lr
    for per_param in optimizer.state.values():
        step = per_param.get("step")
        if isinstance(step, torch.Tensor):
            step.zero_()
        elif step is not None:
            per_param["step"] = 0


TIED_HEAD, TIED_EMBEDDING = "lm_head.weight", "transformer.embeddings.word_embeddings.weight"


def _renamed(state: dict, old: str, new: str) -> dict:
    return {new if key == old else key: value for key, value in state.items()}


def _optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list, bool]:
    """(optimizer state by parameter name, param_groups, whether a tied head's state was renamed).

    A tied head and the embedding are one parameter, whose state one process files under the embedding's
    name; a pipeline's last stage holds it as `lm_head.weight` only, so it is filed under the same name.
    """
    full = get_optimizer_state_dict(model, optimizer)
    state = full["state"]
    rename = getattr(getattr(model, "cfg", None), "tie_embeddings", False) and TIED_HEAD in state
    return (_renamed(state, TIED_HEAD, TIED_EMBEDDING) if rename else state), full["param_groups"], rename


def _fingerprint(folder: Path) -> tuple:
    """(name, size, mtime) of every file: a verified folder whose fingerprint is unchanged needs no new hashing."""
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()))


def _hash_files(folder: Path, names: list[str]) -> dict[str, dict]:
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in names}


class _PendingSave:
    """An async DCP save in flight; on rank 0 a thread publishes it as soon as the write completes."""

    def __init__(self, future: Any, publish) -> None:
        import threading

        self.future = future
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(publish,), name="checkpoint-finalize", daemon=True)
        if _rank() == 0:
            self.thread.start()

    def _run(self, publish) -> None:
        try:
            self.future.result()
            publish()
        except BaseException as err:  # re-raised in the training thread by wait()
            self.error = err

    def wait(self) -> None:
        self.future.result()
        if self.thread.ident is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error


class Checkpointer:
    """Saves and finds checkpoints of one run; keeps the last K verified ones plus every Nth."""

    def __init__(self, run_dir: Path, cfg: CheckpointConfig) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self._pending: _PendingSave | None = None
        self._verified: dict[int, tuple] = {}

    def folder(self, step: int) -> Path:
        return self.root / f"{STEP_PREFIX}{step:08d}"

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_state: dict,
             config_yaml: str, async_save: bool = False) -> Path:
        """Write checkpoint `step` (all ranks call this). Returns the final folder.

        With `async_save` the tensors are written in the background and the folder appears (complete, with
        meta.json) as soon as that write finishes, without waiting for the next save.
        """
        self.finalize_pending()
        final = self.folder(step)
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        _init_optimizer_state(optimizer)  # before any update: the state of a fresh AdamW, step count 0
        state = {"model": get_model_state_dict(model), "optim": _optim_state(model, optimizer)[0]}
        state = checkpoint_view(model, state)
        (tmp / f"rng_rank{_rank()}.json").write_text(json.dumps(rng_state()))
        if async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp))
            self._pending = _PendingSave(future, lambda: self._publish(tmp, final, train_state, config_yaml, None))
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._finalize(tmp, final, train_state, config_yaml)
        return final

    def finalize_pending(self) -> None:
        """Wait for an async save in flight to be published (all ranks call this)."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        pending.wait()
        _barrier()

    def _finalize(self, tmp: Path, final: Path, train_state: dict, config_yaml: str) -> None:
        """Each rank hashes its own files; rank 0 publishes the folder."""
        rank = _rank()
        mine = [p.name for p in tmp.iterdir() if p.name.startswith(f"__{rank}_") or p.name == f"rng_rank{rank}.json"]
        hashes = _hash_files(tmp, mine)
        gathered = [None] * _world()
        if dist.is_initialized():
            dist.all_gather_object(gathered, hashes)
        else:
            gathered = [hashes]
        if _rank() == 0:
            self._publish(tmp, final, train_state, config_yaml, {k: v for part in gathered for k, v in part.items()})
        _barrier()

    def _publish(self, tmp: Path, final: Path, train_state: dict, config_yaml: str, files: dict | None) -> None:
        """Rank 0: write train_state, config and (last) meta.json listing every file, rename, prune."""
        (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        if files is None:  # async: every rank's write is complete once rank 0's future is
            files = _hash_files(tmp, sorted(p.name for p in tmp.iterdir() if p.name != "meta.json"))
        else:
            files = {**files, **_hash_files(tmp, [".metadata", "train_state.json", "config.yaml"])}
        meta = {"step": train_state["step"], "tokens_seen": train_state["tokens_seen"], "world_size": _world(),
                "complete": True, "files": files}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        self._verified[train_state["step"]] = _fingerprint(final)
        self._prune()

    def is_verified(self, step: int) -> bool:
        """Whether checkpoint `step` matches its meta.json (hashed once per process while its files are unchanged)."""
        folder = self.folder(step)
        fingerprint = _fingerprint(folder)
        if self._verified.get(step) == fingerprint:
            return True
        if verify_checkpoint(folder) is not None:
            return False
        self._verified[step] = fingerprint
        return True

    def _prune(self) -> None:
        """Keep the last `keep_last` verified checkpoints (+ every `keep_every`-th); corrupt ones never count."""
        if self.cfg.keep_last <= 0:
            return
        steps = self.complete_steps()
        good = [s for s in steps if self.is_verified(s)]
        keep = set(good[-self.cfg.keep_last:])
        if self.cfg.keep_every > 0:
            keep |= {s for s in good if s % self.cfg.keep_every == 0}
        for s in steps:
            if s not in keep:
                if s not in good:
                    why = verify_checkpoint(self.folder(s))
                    log.warning("removing corrupt checkpoint %s (%s)", self.folder(s), why)
                shutil.rmtree(self.folder(s), ignore_errors=True)

    def complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name[len(STEP_PREFIX):]) for p in self.root.iterdir()
                      if p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()
                      and (p / "meta.json").is_file())

    def candidates(self) -> list[Path]:
        """Every complete checkpoint folder, newest first."""
        return [self.folder(s) for s in reversed(self.complete_steps())]


REQUIRED_FILES = (".metadata", "train_state.json", "config.yaml")


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file of the folder is listed in meta.json with a matching size and sha256; else what is wrong."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        files = meta["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and {"bytes", "sha256"} <= set(v)
                                                  for v in files.values()):
            return "meta.json: 'files' is not a table of {bytes, sha256} per file"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"meta.json unreadable: {err}"
    # every file must be listed: an empty or partial list would otherwise pass vacuously
    unlisted = sorted(({p.name for p in folder.iterdir()} - {"meta.json"}) - set(files))
    missing = sorted(set(REQUIRED_FILES) - set(files))
    if missing:
        return f"meta.json does not list {', '.join(missing)}"
    if not any(name.endswith(".distcp") for name in files):
        return "meta.json lists no tensor file (*.distcp)"
    if unlisted:
        return f"{', '.join(unlisted)} not listed in meta.json"
    for name, info in sorted(files.items()):
        path = folder / name
        if "/" in name or name in ("", ".", "..") or not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != info["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, meta.json says {info['bytes']}"
        if _sha256(path) != info["sha256"]:
            return f"{name} does not match its sha256 in meta.json"
    return None


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (one verdict for a shared folder instead of one hash pass per rank)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _dcp_error(folder: Path, err: BaseException) -> CheckpointError:
    """A CheckpointError naming what failed: our own refusal when there is one, else DCP's last line."""
    failures = getattr(err, "failures", None) or {}
    causes = [exc for exc, _ in failures.values()] if failures else [err]
    for cause in causes:
        if isinstance(cause, (UnsafeCheckpointError, CheckpointError)):
            return CheckpointError(str(cause))
    last = [line for line in str(causes[0]).splitlines() if line.strip()] or [type(causes[0]).__name__]
    return CheckpointError(f"{folder}: could not be loaded: {last[-1].strip()}")


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    restore_rng: bool = True, verify: bool = True) -> dict:
    """Load model (and optimizer) state from `folder` into the given objects (all ranks call this).

    Works under any parallel layout: DCP reshards. Verifies the folder against meta.json first (`verify`).
    Restores this rank's RNG state when the checkpoint has one for it. Returns the train state (step,
    tokens seen, loader state, ...). Raises CheckpointError naming the folder or file and the reason.
    """
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise CheckpointError(f"{folder}: not a complete checkpoint (no meta.json)")
    problem = _broadcast(verify_checkpoint(folder) if verify and _rank() == 0 else None)
    if problem is not None:
        raise CheckpointError(f"{folder}: corrupted checkpoint: {problem}")
    reader = SafeFileSystemReader(folder)
    try:
        reader.read_metadata()
        train_state = json.loads((folder / "train_state.json").read_text())
    except (UnsafeCheckpointError, OSError, ValueError) as err:
        raise CheckpointError(str(err) if isinstance(err, UnsafeCheckpointError) else f"{folder}: {err}") from None
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        _init_optimizer_state(optimizer)
        state["optim"], param_groups, renamed = _optim_state(model, optimizer)
    try:
        # the view's tensors are views of `state`'s: loading into it fills `state`
        dcp.load(checkpoint_view(model, state), storage_reader=reader, planner=SafeLoadPlanner(folder / ".metadata"))
    except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
        raise _dcp_error(folder, err) from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        optim = _renamed(state["optim"], TIED_EMBEDDING, TIED_HEAD) if renamed else state["optim"]
        set_optimizer_state_dict(model, optimizer, {"state": optim, "param_groups": param_groups})
    rng_file = folder / f"rng_rank{_rank()}.json"
    if restore_rng and rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    return train_state


def load_newest(folders: list[Path], model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                restore_rng: bool = True, where: Path | None = None) -> tuple[Path, dict]:
    """Load the first of `folders` (newest first) that verifies and loads; fall back past the others.

    Returns (folder, train state). When none is usable, raises CheckpointError listing each and why.
    """
    problems = []
    for folder in folders:
        try:
            return folder, load_checkpoint(folder, model, optimizer, restore_rng=restore_rng)
        except CheckpointError as err:
            problems.append(f"{folder.name}: {err}")
            if folder is not folders[-1]:
                log.warning("checkpoint %s is unusable (%s); trying the previous one", folder, err)
    raise CheckpointError(_none_usable(where or (folders[0].parent if folders else Path("?")), problems))


def _none_usable(where: Path, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{where}: no usable checkpoint: {problems[0]}"
    return f"{where}: no usable checkpoint; each was refused:\n  " + "\n  ".join(problems)


def resolve_checkpoint(path: Path) -> list[Path]:
    """The checkpoint folder `path`, or every complete checkpoint of the run folder `path`, newest first."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return [path]
    found = Checkpointer(path, CheckpointConfig()).candidates() if (path / "checkpoints").is_dir() else []
    if found:
        return found
    raise CheckpointError(f"{path}: neither a checkpoint folder (with meta.json) nor a run folder with a complete "
                          "checkpoint under checkpoints/")


def load_native(path: str | Path):
    """(TrainConfig, LanguageModel on CPU in fp32, the checkpoint folder used) from a run or checkpoint folder.

    A run folder gives its newest usable checkpoint (verified, loaded safely; older ones are tried next).
    """
    from based_layers import build_model
    from pretrain.config import ConfigError, load_config

    problems = []
    for folder in resolve_checkpoint(Path(path)):
        try:
            cfg = load_config(folder / "config.yaml")
        except ConfigError as err:
            problems.append(f"{folder.name}: {err}")
            continue
        model = build_model(cfg.model)
        try:
            load_checkpoint(folder, model, None, restore_rng=False)
        except CheckpointError as err:
            problems.append(f"{folder.name}: {err}")
            continue
        return cfg, model, folder
    raise CheckpointError(_none_usable(Path(path), problems))


def load_model_for_export(path: str | Path):
    """(TrainConfig, LanguageModel on CPU in fp32) from a run folder or a checkpoint folder, on one process."""
    cfg, model, _ = load_native(path)
    return cfg, model
