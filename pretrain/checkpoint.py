"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, reshardable, visible only when complete.

Layout of `RUN/checkpoints/step_{step:08d}/`: DCP files for {"model", "optim"} (tensors only), one
`rng_rank{r}.json` per rank, `train_state.json`, `config.yaml`, and, written last, `meta.json` with the size
and sha256 of every file. The folder is written as `step_...tmp` and renamed when complete.

Loading never executes pickled code: tensors are read with `torch.load(weights_only=True)` by DCP, the
DCP metadata file through a restricted unpickler that only builds DCP's own metadata classes, and
everything else is JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pretrain.config import CheckpointConfig
from pretrain.tensor_parallel import checkpoint_view

log = logging.getLogger(__name__)
# single-process runs save and load with DCP without a process group, which DCP warns about every time
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the reason."""


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP metadata classes, torch sizes and dtypes, and plain containers."""

    _ALLOWED_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)
    _ALLOWED = {("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                ("builtins", "slice"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("torch.distributed.tensor.placement_types", "Shard"),
                ("torch.distributed.tensor.placement_types", "Replicate")}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(self._ALLOWED_MODULE_PREFIXES) or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


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
    """Create AdamW's state tensors (a step with zero grads at lr 0 changes no weight) so DCP can load into them."""
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


class Checkpointer:
    """Saves and finds checkpoints of one run; keeps the last K plus every Nth."""

    def __init__(self, run_dir: Path, cfg: CheckpointConfig) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self._pending: tuple[Any, Path, Path, dict, str] | None = None

    def folder(self, step: int) -> Path:
        return self.root / f"{STEP_PREFIX}{step:08d}"

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_state: dict,
             config_yaml: str, async_save: bool = False) -> Path:
        """Write checkpoint `step` (all ranks call this). Returns the final folder."""
        self.finalize_pending()
        final = self.folder(step)
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        state = {"model": get_model_state_dict(model), "optim": _optim_state(model, optimizer)[0]}
        state = checkpoint_view(model, state)
        (tmp / f"rng_rank{_rank()}.json").write_text(json.dumps(rng_state()))
        if async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp))
            self._pending = (future, tmp, final, train_state, config_yaml)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._finalize(tmp, final, train_state, config_yaml)
        return final

    def finalize_pending(self) -> None:
        """Wait for an async save in flight and make it visible (all ranks call this)."""
        if self._pending is None:
            return
        future, tmp, final, train_state, config_yaml = self._pending
        self._pending = None
        future.result()
        self._finalize(tmp, final, train_state, config_yaml)

    def _finalize(self, tmp: Path, final: Path, train_state: dict, config_yaml: str) -> None:
        mine = [p for p in tmp.iterdir() if p.name.startswith(f"__{_rank()}_") or p.name == f"rng_rank{_rank()}.json"]
        hashes = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in mine}
        gathered = [None] * _world()
        if dist.is_initialized():
            dist.all_gather_object(gathered, hashes)
        else:
            gathered = [hashes]
        if _rank() == 0:
            (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1))
            (tmp / "config.yaml").write_text(config_yaml)
            files = {k: v for part in gathered for k, v in part.items()}
            for name in (".metadata", "train_state.json", "config.yaml"):
                files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            meta = {"step": train_state["step"], "tokens_seen": train_state["tokens_seen"], "world_size": _world(),
                    "complete": True, "files": files}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        _barrier()

    def _prune(self) -> None:
        steps = sorted(self.complete_steps())
        keep = set(steps[-self.cfg.keep_last:]) if self.cfg.keep_last > 0 else set(steps)
        if self.cfg.keep_every > 0:
            keep |= {s for s in steps if s % self.cfg.keep_every == 0}
        for s in steps:
            if s not in keep:
                shutil.rmtree(self.folder(s), ignore_errors=True)

    def complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name[len(STEP_PREFIX):]) for p in self.root.iterdir()
                      if p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()
                      and (p / "meta.json").is_file())

    def newest_valid(self) -> Path | None:
        """The newest checkpoint whose files match meta.json; broken ones are named in a warning and skipped."""
        for step in reversed(self.complete_steps()):
            folder = self.folder(step)
            problem = verify_checkpoint(folder)
            if problem is None:
                return folder
            log.warning("checkpoint %s is unusable (%s); trying the previous one", folder, problem)
        return None


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file listed in meta.json is present with its size and sha256; else what is wrong."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"meta.json unreadable: {err}"
    for name, info in meta.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != info["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, meta.json says {info['bytes']}"
        if _sha256(path) != info["sha256"]:
            return f"{name} does not match its sha256 in meta.json"
    return None


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    restore_rng: bool = True) -> dict:
    """Load model (and optimizer) state from `folder` into the given objects (all ranks call this).

    Works under any parallel layout: DCP reshards. Restores this rank's RNG state when the checkpoint has
    one for it. Returns the train state (step, tokens seen, loader state, ...).
    """
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise CheckpointError(f"{folder}: not a complete checkpoint (no meta.json)")
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        _init_optimizer_state(optimizer)
        state["optim"], param_groups, renamed = _optim_state(model, optimizer)
    try:
        # the view's tensors are views of `state`'s: loading into it fills `state`
        dcp.load(checkpoint_view(model, state), storage_reader=SafeFileSystemReader(str(folder)))
    except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"{folder}: could not be loaded: {err}") from err
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        optim = _renamed(state["optim"], TIED_EMBEDDING, TIED_HEAD) if renamed else state["optim"]
        set_optimizer_state_dict(model, optimizer, {"state": optim, "param_groups": param_groups})
    rng_file = folder / f"rng_rank{_rank()}.json"
    if restore_rng and rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    return json.loads((folder / "train_state.json").read_text())


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or the newest valid checkpoint of a run folder."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        found = Checkpointer(path, CheckpointConfig()).newest_valid()
        if found is not None:
            return found
    raise CheckpointError(f"{path}: neither a checkpoint folder (with meta.json) nor a run folder with a complete "
                          "checkpoint under checkpoints/")


def load_model_for_export(path: str | Path):
    """(TrainConfig, LanguageModel on CPU in fp32) from a run folder or a checkpoint folder, on one process."""
    from based_layers import build_model
    from pretrain.config import load_config

    folder = resolve_checkpoint(Path(path))
    problem = verify_checkpoint(folder)
    if problem is not None:
        raise CheckpointError(f"{folder}: corrupted checkpoint: {problem}")
    cfg = load_config(folder / "config.yaml")
    model = build_model(cfg.model)
    load_checkpoint(folder, model, None, restore_rng=False)
    return cfg, model
