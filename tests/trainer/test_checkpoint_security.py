"""Crafted checkpoints never run code, through every entry point that reads a run or checkpoint folder.

Each payload is applied to a real checkpoint written by our Checkpointer (tiny Transformer++), meta.json is
rewritten to match (an attacker rewrites it too), and the folder goes through the trainer's resume,
tools/export_hf.py, tools/generate.py and the lm-eval model. The payload would create a marker file; it must
not appear, and each entry point must fail with an error naming the offending file.
"""

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from tests.trainer.conftest import ROOT

SHORT = ("schedule.max_steps=4", "schedule.warmup_steps=1", "logging.val_interval=0", "logging.progress_bar=false",
         "logging.tensorboard=false", "data.global_batch_size=8", "data.micro_batch_size=4")


def _config(data: Path, run_dir: Path, *overrides: str):
    return load_config(ROOT / "configs/attn_tiny.yaml", [f"data.path={data}", f"run_dir={run_dir}", *SHORT,
                                                         *overrides])


def _trainer(cfg):
    from pretrain.distributed import DistInfo
    from pretrain.trainer import Trainer

    return Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


@pytest.fixture(scope="module")
def base_run(tiny_data, tmp_path_factory) -> Path:
    """A run folder with one checkpoint (after one step, so with optimizer state) written by the trainer."""
    run = tmp_path_factory.mktemp("secure") / "run"
    trainer = _trainer(_config(tiny_data, run))
    trainer.train_step(iter(trainer.loader))
    trainer.state.step = 1
    trainer.save()
    return run


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    """Trainer.fit installs SIGTERM/SIGUSR1 handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def rehash(folder: Path) -> None:
    """Rewrite meta.json so that it lists every file of the folder with its current size and sha256."""
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                     for p in sorted(folder.iterdir()) if p.name != "meta.json"}
    (folder / "meta.json").write_text(json.dumps(meta))


class _RunsCommand:
    """Unpickling this runs `touch MARKER` (what an attacker would put in a checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _short_unicode(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def dotted_global_payload(marker: Path) -> bytes:
    """Protocol 4: STACK_GLOBAL('torch.distributed.checkpoint.filesystem', 'os.system')('touch MARKER')."""
    return (b"\x80\x04" + _short_unicode("torch.distributed.checkpoint.filesystem") + _short_unicode("os.system")
            + b"\x93" + _short_unicode(f"touch {marker}") + b"\x85" + b"R" + b".")


def _metadata(folder: Path):
    # the test's own, freshly written checkpoint: trusted, so plain pickle is fine here
    return pickle.loads((folder / ".metadata").read_bytes())


def _bytes_swap(folder: Path, marker: Path, prefix: str) -> str:
    """Declare the first key starting with `prefix` as a byte entry whose bytes are a code-running pickle."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    metadata = _metadata(folder)
    key = next(k for k in metadata.state_dict_metadata if k.startswith(prefix))
    shard = folder / "__0_0.distcp"
    payload = pickle.dumps(_RunsCommand(marker))
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload)
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    metadata.storage_data = {i: s for i, s in metadata.storage_data.items() if i.fqn != key}
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo("__0_0.distcp", offset, len(payload))
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return key


def _tensor_record_is_a_pickle(folder: Path, marker: Path) -> None:
    """Overwrite one tensor record of __0_0.distcp (same length) with a code-running pickle."""
    metadata = _metadata(folder)
    info = next(iter(metadata.storage_data.values()))
    payload = pickle.dumps(_RunsCommand(marker))
    assert len(payload) <= info.length
    shard = folder / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset:info.offset + info.length] = payload + b"\0" * (info.length - len(payload))
    shard.write_bytes(bytes(data))


PAYLOADS = {
    "reduce": lambda f, m: (f / ".metadata").write_bytes(pickle.dumps(_RunsCommand(m))),
    "dotted_global": lambda f, m: (f / ".metadata").write_bytes(dotted_global_payload(m)),
    "bytes_on_model_key": lambda f, m: _bytes_swap(f, m, "model."),
    "bytes_on_optimizer_key": lambda f, m: _bytes_swap(f, m, "optim."),
    "tensor_record_pickle": _tensor_record_is_a_pickle,
}
# the file each refusal must name
NAMED = {"reduce": ".metadata", "dotted_global": ".metadata", "bytes_on_model_key": ".metadata",
         "bytes_on_optimizer_key": ".metadata", "tensor_record_pickle": "__0_0.distcp"}


def _resume(run: Path, data: Path) -> str:
    from pretrain.checkpoint import CheckpointError

    trainer = _trainer(_config(data, run))
    with pytest.raises(CheckpointError) as err:
        trainer.fit()
    return str(err.value)


def _export(run: Path, data: Path) -> str:
    from tools.export_hf import ExportError, export

    with pytest.raises(ExportError) as err:
        export(run, run.parent / "export")
    assert not (run.parent / "export").exists()
    return str(err.value)


def _generate(run: Path, data: Path) -> str:
    """The CLI reports a load error on stderr and exits 1 (tools/generate.py main)."""
    from tools.generate import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["--checkpoint", str(run), "--prompt", "Alice", "--max-new-tokens", "2", "--device", "cpu"])
    assert code == 1, f"generate exited {code}"
    assert stderr.getvalue().startswith("generate: error: "), stderr.getvalue()
    return stderr.getvalue()


def _lm_eval(run: Path, data: Path) -> str:
    from tools.lm_eval_model import BasedPretrainLM

    with pytest.raises(Exception) as err:
        BasedPretrainLM(pretrained=str(run), device="cpu")
    return str(err.value)


ENTRY_POINTS = {"trainer_resume": _resume, "export_hf": _export, "generate": _generate, "lm_eval": _lm_eval}


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_crafted_checkpoint_runs_no_code_through_any_entry_point(payload, base_run, tiny_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    folder = next((run / "checkpoints").glob("step_*"))
    marker = tmp_path / "marker"
    PAYLOADS[payload](folder, marker)
    rehash(folder)
    before = sorted(p.name for p in run.iterdir())
    for name, entry in ENTRY_POINTS.items():
        message = entry(run, tiny_data)
        assert not marker.exists(), f"{payload} ran code through {name}"
        assert str(folder / NAMED[payload]) in message, (name, message)
    # the refused resume wrote nothing into the run folder (no config.yaml, metrics or TensorBoard files)
    assert sorted(p.name for p in run.iterdir()) == before


def test_dotted_global_is_refused_by_the_unpickler(tmp_path):
    from pretrain.safe_dcp import MetadataUnpickler

    marker = tmp_path / "marker"
    with pytest.raises(pickle.UnpicklingError, match="dotted name"):
        MetadataUnpickler(io.BytesIO(dotted_global_payload(marker))).load()
    assert not marker.exists()


class _Python3112Pickler(pickle.Pickler):
    """Pickles Enum members the way Python 3.11.2 (Debian 12) does: builtins.getattr(EnumClass, 'NAME')."""

    member_name: str | None = None

    def reducer_override(self, obj):
        from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

        if isinstance(obj, _MEM_FORMAT_ENCODING):
            return getattr, (type(obj), self.member_name or obj.name)
        return NotImplemented


def _write_metadata_as_3112(folder: Path, member_name: str | None = None) -> bytes:
    buffer = io.BytesIO()
    pickler = _Python3112Pickler(buffer, protocol=4)
    pickler.member_name = member_name
    pickler.dump(_metadata(folder))
    data = buffer.getvalue()
    assert b"getattr" in data and b"TORCH_CONTIGUOUS_FORMAT" in data or member_name
    (folder / ".metadata").write_bytes(data)
    rehash(folder)
    return data


def test_metadata_pickled_by_python_3_11_2_loads(base_run, tiny_data, tmp_path):
    from pretrain.checkpoint import load_checkpoint
    from pretrain.parallelize import unwrap

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    folder = next((run / "checkpoints").glob("step_*"))
    _write_metadata_as_3112(folder)
    saved = _trainer(_config(tiny_data, base_run))
    load_checkpoint(next((base_run / "checkpoints").glob("step_*")), unwrap(saved.model), saved.optimizer)
    fresh = _trainer(_config(tiny_data, run, "seed=5"))
    load_checkpoint(folder, unwrap(fresh.model), fresh.optimizer)
    for (name, a), b in zip(unwrap(saved.model).state_dict().items(), unwrap(fresh.model).state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("member", ["__class__", "_missing_", "TORCH_NOT_A_FORMAT"])
def test_getattr_form_allows_only_enum_member_names(member, base_run, tmp_path):
    from pretrain.checkpoint import CheckpointError, load_model_for_export

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    folder = next((run / "checkpoints").glob("step_*"))
    _write_metadata_as_3112(folder, member)
    with pytest.raises(CheckpointError, match=f"{folder / '.metadata'}.*not a member"):
        load_model_for_export(folder)


# pickle.dumps([_MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT], protocol=4) by Debian 12's /usr/bin/python3 (3.11.2)
PYTHON_3_11_2_ENUM_LIST = bytes.fromhex(
    "8004957a000000000000005d948c086275696c74696e73948c07676574617474729493948c25746f7263682e64697374726962757465642e636865636b706f696e742e6d65746164617461948c145f4d454d5f464f524d41545f454e434f44494e479493948c17544f5243485f434f4e544947554f55535f464f524d41549486945294612e"
)


def test_crafted_pickler_writes_what_python_3_11_2_writes():
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    from pretrain.safe_dcp import MetadataUnpickler

    buffer = io.BytesIO()
    _Python3112Pickler(buffer, protocol=4).dump([_MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT])
    assert buffer.getvalue() == PYTHON_3_11_2_ENUM_LIST
    loaded = MetadataUnpickler(io.BytesIO(PYTHON_3_11_2_ENUM_LIST)).load()
    assert loaded == [_MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT]
