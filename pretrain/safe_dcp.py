"""Reading torch.distributed.checkpoint (DCP) folders without ever running code stored in them.

A checkpoint folder is untrusted input (a colleague's run, a download, a corrupted disk), and its sha256 list
(meta.json) proves nothing against someone who rewrites it too. DCP itself unpickles `.metadata` with plain
`pickle` and loads byte entries with `torch.load(weights_only=False)`; both run arbitrary code. Here:

- `.metadata` is read by `MetadataUnpickler`, which resolves only an explicit table of exact (module, name)
  pairs (DCP's metadata classes, torch.Size, dtypes, layouts, paths). It never imports a module and never
  follows a dotted name through attributes (protocol 4's STACK_GLOBAL would otherwise reach `os.system` from
  any allowed module). Early Python 3.11 releases (Debian 12 ships 3.11.2) pickle Enum members as
  `builtins.getattr(EnumClass, 'NAME')`; that exact form is allowed for the allowed Enum classes and their
  member names only.
- The unpickled object is checked to be a DCP `Metadata` whose records point at this folder's own
  `__R_N.distcp` files, with no storage transforms.
- A byte entry (`BytesStorageMetadata`) under the model or optimizer keys is refused outright, and
  `SafeLoadPlanner` refuses one (`BytesStorageMetadata`) where the state dict expects a tensor, and
  loads any byte entry it does accept with `torch.load(weights_only=True)`.
- `SafeFileSystemReader.read_data` checks that every tensor record is a torch zip record before DCP reads it
  (with `weights_only=True`), and names the file when a record cannot be read.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.serialization
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

# what torch.save writes since 1.6 (a zip archive); DCP stores each tensor record in that format
_ZIP_MAGIC = b"PK\x03\x04"
# the top-level keys of our checkpoints (pretrain/checkpoint.py): tensors only
TENSOR_PREFIXES = ("model.", "optim.")
_RECORD_FILE = re.compile(r"__\d+_\d+\.distcp")
_METADATA_CLASSES = ("Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
                     "TensorProperties", "ChunkStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING")
# the Enum classes whose members may be pickled as builtins.getattr(cls, name) (early Python 3.11, e.g. 3.11.2)
_ALLOWED_ENUMS = (dcp_metadata._MEM_FORMAT_ENCODING,)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file that would need code execution, or a record of the wrong kind; names the file."""


def _enum_member(owner: Any, name: Any) -> Any:
    """`getattr(owner, name)` restricted to the members of the allowed Enum classes."""
    if owner not in _ALLOWED_ENUMS or not isinstance(name, str) or name not in owner.__members__:
        raise pickle.UnpicklingError(f"getattr({owner!r}, {name!r}) is not a member of an allowed Enum")
    return owner[name]


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Every (module, name) the metadata may refer to, with the object it resolves to."""
    table: dict[tuple[str, str], Any] = {
        ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name) for name in _METADATA_CLASSES
    }
    table[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = dcp_filesystem._StorageInfo
    table[("torch", "Size")] = torch.Size
    table[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    table[("collections", "OrderedDict")] = OrderedDict
    # StorageMeta.checkpoint_id (never used for loading); Python 3.13 names the class pathlib._local.PosixPath
    for module in ("pathlib", "pathlib._local"):
        table[(module, "PosixPath")] = pathlib.PurePosixPath
        table[(module, "PurePosixPath")] = pathlib.PurePosixPath
    table[("builtins", "getattr")] = _enum_member
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            table[("torch", name)] = getattr(torch, name)
    return table


class MetadataUnpickler(pickle.Unpickler):
    """Builds only the objects of `_allowed_globals()`; anything else is an UnpicklingError naming it."""

    _ALLOWED = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        # no attribute traversal: pickle's own find_class resolves "a.b" through getattr chains
        if "." in name:
            raise pickle.UnpicklingError(f"refers to the dotted name {module}:{name}; attribute lookups are not "
                                         "allowed")
        found = self._ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which is not allowed")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("uses a persistent id, which DCP metadata never does")


def read_metadata_file(path: Path) -> Metadata:
    """The DCP metadata in `path` (a folder's `.metadata`), unpickled safely and checked; else the reason."""
    try:
        metadata = MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as err:  # a crafted or truncated pickle fails in many ways; all mean "not usable"
        raise UnsafeCheckpointError(f"{path}: not a DCP metadata file that loads without running code: {err}") from None
    check_metadata(metadata, path)
    return metadata


def check_metadata(metadata: Any, path: Path) -> None:
    """Raise UnsafeCheckpointError unless `metadata` is DCP Metadata over this folder's own record files."""
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
    entries = metadata.state_dict_metadata
    if not isinstance(entries, dict) or not all(isinstance(k, str) and isinstance(
            v, (TensorStorageMetadata, BytesStorageMetadata)) for k, v in entries.items()):
        raise UnsafeCheckpointError(f"{path}: state_dict_metadata is not a dict of tensor/bytes entries")
    # model and optimizer state are tensors only; a byte entry there is a swap (loaded even when unused)
    for fqn, entry in entries.items():
        if fqn.startswith(TENSOR_PREFIXES) and isinstance(entry, BytesStorageMetadata):
            raise UnsafeCheckpointError(f"{path}: {fqn!r} is declared as a byte entry, but model and optimizer "
                                        "state are tensors; refusing the checkpoint")
    records = metadata.storage_data
    if not isinstance(records, dict):
        raise UnsafeCheckpointError(f"{path}: storage_data is not a dict")
    for index, info in records.items():
        where = f"{path}: the record of {getattr(index, 'fqn', index)!r}"
        if not isinstance(index, MetadataIndex) or not isinstance(info, dcp_filesystem._StorageInfo):
            raise UnsafeCheckpointError(f"{where} is not a DCP storage record")
        if not isinstance(info.relative_path, str) or not _RECORD_FILE.fullmatch(info.relative_path):
            raise UnsafeCheckpointError(f"{where} points at {info.relative_path!r}, not a __R_N.distcp file of the "
                                        "checkpoint folder")
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0
                and info.length >= 0):
            raise UnsafeCheckpointError(f"{where} has an invalid offset/length")
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(f"{where} uses storage transforms {info.transform_descriptors}, which this "
                                        "trainer never writes")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader with a safe, checked `.metadata` and tensor records checked before DCP reads them."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(str(path))
        self._folder = Path(path)
        self._metadata: Metadata | None = None

    def read_metadata(self) -> Metadata:
        # no **kwargs: DCP would otherwise retry with a rank-local `__R.metadata` file after a refusal
        if self._metadata is None:
            self._metadata = read_metadata_file(self._folder / ".metadata")
        metadata = self._metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        files = sorted({self.storage_data[item.storage_index].relative_path for item in plan.items})
        for item in plan.items:
            self._check_record(item)
        try:
            return super().read_data(plan, planner)
        except UnsafeCheckpointError:
            raise
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            where = f"{self._folder}/{', '.join(files)}"
            raise UnsafeCheckpointError(f"{where}: a record could not be read: {first}") from None

    def _check_record(self, item) -> None:
        """A tensor record must be a torch zip record inside its file (a bare pickle is refused unread)."""
        from torch.distributed.checkpoint.planner import LoadItemType

        info = self.storage_data[item.storage_index]
        path = self._folder / info.relative_path
        size = path.stat().st_size if path.is_file() else -1
        if size < info.offset + info.length:
            raise UnsafeCheckpointError(f"{path}: the record of {item.storage_index.fqn!r} (bytes {info.offset}.."
                                        f"{info.offset + info.length}) lies beyond the file's {max(size, 0)} bytes")
        if item.type == LoadItemType.BYTE_IO:
            return
        with open(path, "rb") as f:
            f.seek(info.offset)
            head = f.read(len(_ZIP_MAGIC))
        if head != _ZIP_MAGIC:
            raise UnsafeCheckpointError(f"{path}: the record of {item.storage_index.fqn!r} at byte {info.offset} is "
                                        "not a torch tensor record (expected a zip record); refusing to unpickle it")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that refuses bytes where a tensor is expected and never loads with weights_only=False."""

    def __init__(self, metadata_path: Path) -> None:
        super().__init__()
        self._metadata_path = metadata_path

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        entries = metadata.state_dict_metadata if metadata is not None else {}
        for fqn, value in self.state_dict.items():
            if isinstance(value, torch.Tensor) and isinstance(entries.get(fqn), BytesStorageMetadata):
                raise UnsafeCheckpointError(f"{self._metadata_path}: {fqn!r} is declared as a byte entry where the "
                                            "model/optimizer holds a tensor; refusing to load it")

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UnsafeCheckpointError(f"{self._metadata_path.parent}: the byte entry {read_item.dest_index.fqn!r} "
                                        f"does not load with weights_only=True: {str(err).splitlines()[0]}") from None
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
