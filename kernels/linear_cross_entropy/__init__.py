"""Fused head + cross-entropy that never materialises [tokens, vocab] fp32 logits.

`linear_cross_entropy(hidden, weight, labels, backend=...)`: the mean cross-entropy of hidden @ weight.T.
Backends: "chunked" (ours, chunked.py; also vocab-parallel), "reference" (plain PyTorch: all fp32 logits),
"liger" (liger-kernel's LigerFusedLinearCrossEntropyLoss; optional package, CUDA). Layouts: hidden [N, D],
weight [V, D] (this rank's rows under vocab parallelism), labels [N] int.
"""

from __future__ import annotations

import torch

from .._common import check_same_device
from .chunked import chunked_linear_cross_entropy
from .reference import linear_cross_entropy_reference

__all__ = ["BACKENDS", "linear_cross_entropy", "linear_cross_entropy_reference"]

_OP = "linear_cross_entropy"
BACKENDS = ("chunked", "reference", "liger")


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{_OP}: expected hidden [N, D] and weight [V, D]; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1] or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{_OP}: labels must be integer [N] = [{hidden.shape[0]}]; got {tuple(labels.shape)} "
            f"{labels.dtype}"
        )
    if chunk_size < 1:
        raise ValueError(f"{_OP}: chunk_size must be positive, got {chunk_size}")
    check_same_device(_OP, hidden=hidden, weight=weight, labels=labels)


def _liger(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as err:
        raise RuntimeError(
            f"{_OP}: backend='liger' needs liger-kernel (`pip install liger-kernel`, pure Python + "
            "Triton, CUDA); or use backend='chunked'"
        ) from err
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, accum_dtype=torch.float32)
    return loss_fn(weight, hidden, labels).float()


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 4096,
    backend: str = "chunked",
    process_group=None,
    vocab_start: int = 0,
    rows_impl: str = "auto",
) -> torch.Tensor:
    """Mean token cross-entropy (fp32 scalar) of the logits hidden @ weight.T, differentiable in both.

    Rows whose label is `ignore_index` are left out of the sum and the count. The matmuls run in autocast's
    dtype when autocast is on (as `nn.Linear`), else in hidden's dtype; softmax statistics are fp32.
    `process_group` / `vocab_start`: vocab-parallel ("chunked" only), see kernels/linear_cross_entropy/chunked.py.
    `rows_impl` ("chunked"): the per-row softmax work in Triton kernels or PyTorch ops (auto: Triton on CUDA).
    """
    _check(hidden, weight, labels, chunk_size)
    if backend not in BACKENDS:
        raise ValueError(f"{_OP}: backend={backend!r}; expected one of {BACKENDS}")
    if process_group is not None and backend != "chunked":
        raise ValueError(
            f"{_OP}: vocab-parallel (process_group) runs with backend='chunked' only, not {backend!r}"
        )
    if backend == "reference":
        return linear_cross_entropy_reference(hidden, weight, labels, ignore_index=ignore_index)
    if backend == "liger":
        return _liger(hidden, weight, labels, ignore_index)
    return chunked_linear_cross_entropy(
        hidden,
        weight,
        labels,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        process_group=process_group,
        vocab_start=vocab_start,
        rows_impl=rows_impl,
    )
