"""Helpers shared by the kernel folders: backend checks, argument checks, debug output allocation."""

from __future__ import annotations

import os

import torch

# Tests set this to True: every kernel output is allocated filled with NaN, so an element that a kernel
# forgets to write shows up as NaN instead of as stale memory that happens to look right.
FILL_OUTPUTS_WITH_NAN = os.environ.get("BASED_KERNELS_FILL_NAN", "0") == "1"

BACKENDS = ("triton", "reference")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(op: str, backend: str, *tensors: torch.Tensor) -> None:
    """Raise a ValueError for an unknown backend, a RuntimeError when Triton cannot run these tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r}; expected one of {BACKENDS}")
    if backend != "triton":
        return
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            f"{op}: backend='triton' needs the Triton package, which is not installed. Install it with "
            "`pip install -e '.[kernels]'` (triton>=3.2, on a machine with a CUDA GPU), or pass "
            "backend='reference' (plain PyTorch, any device)."
        ) from err
    devices = {t.device.type for t in tensors}
    if interpreting():
        if devices != {"cpu"}:
            raise RuntimeError(f"{op}: TRITON_INTERPRET=1 runs kernels on the CPU; got tensors on {sorted(devices)}")
        return
    if devices != {"cuda"}:
        hint = "" if torch.cuda.is_available() else " (this machine has no CUDA device)"
        raise RuntimeError(
            f"{op}: backend='triton' runs on CUDA tensors; got tensors on {sorted(devices)}{hint}. Move the "
            "tensors to a GPU, pass backend='reference' (plain PyTorch), or set TRITON_INTERPRET=1 before "
            "importing the kernels (CPU interpreter, slow, for tests)."
        )


def check_tensor(op: str, name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    """ValueError unless `t` is a tensor with `ndim` dimensions and one of `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} has dtype {t.dtype}; expected one of {dtypes}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """ValueError when the given tensors are not all on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: tensors on different devices: {devices}")


def check_doc_ids(op: str, doc_ids: torch.Tensor | None, batch: int, seqlen: int) -> None:
    """ValueError unless doc_ids is None or an integer [B, T] tensor."""
    if doc_ids is None:
        return
    check_tensor(op, "doc_ids", doc_ids, 2, (torch.int32, torch.int64))
    if tuple(doc_ids.shape) != (batch, seqlen):
        raise ValueError(f"{op}: doc_ids must be [B, T] = {(batch, seqlen)}, got {tuple(doc_ids.shape)}")


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized output buffer (NaN-filled when FILL_OUTPUTS_WITH_NAN, to catch unwritten elements)."""
    if FILL_OUTPUTS_WITH_NAN:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dimension has stride 1 (other strides are passed to kernels), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [rows, C] with a unit column stride (a view when possible, else a copy)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a nominal 132 under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132
