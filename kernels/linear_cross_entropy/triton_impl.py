"""Triton row kernels of the chunked cross-entropy: softmax statistics, then the logits' gradient in place.

On a chunk of logits [c, V] in the compute dtype (bf16 in training), written once by the head's matmul:
- `_ce_stats_kernel`: one program per row, one pass over V blocks with an online max and sum of exponentials
  (fp32), and the target's logit: row max, sum exp(logit - max), target logit;
- `_ce_grad_kernel`: one pass that overwrites the logits with (softmax - one-hot) * scale in the same dtype,
  the operand of the two gradient matmuls.
Two reads and one write of the bf16 chunk, against about ten passes over fp32 copies for the same arithmetic
in PyTorch ops (chunked.py's fallback). Under vocab parallelism the statistics are all-reduced between the
two kernels (chunked.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import next_pow2


@triton.jit
def _ce_stats_kernel(
    LOGITS, LABELS, MAX, SUMEXP, TARGET, V, stride, vocab_start, ignore_index, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    label = tl.load(LABELS + row).to(tl.int64)
    local = label - vocab_start
    here = (label != ignore_index) & (local >= 0) & (local < V)
    target = tl.load(base + local, mask=here, other=0.0).to(tl.float32)
    tl.store(MAX + row, m)
    tl.store(SUMEXP + row, s)
    tl.store(TARGET + row, target)


@triton.jit
def _ce_grad_kernel(LOGITS, LABELS, LSE, SCALE, V, stride, vocab_start, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)
    local = tl.load(LABELS + row).to(tl.int64) - vocab_start
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) * scale
        # an ignored row has scale 0; a target on another shard never matches a local column
        g = tl.where(cols == local, g - scale, g)
        tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


def _block(vocab: int) -> int:
    return min(8192, next_pow2(vocab))


def ce_row_stats(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, ignore_index: int):
    """logits [c, V] (unit column stride), labels [c] -> fp32 (row max, sum exp(logit - max), target logit)."""
    rows, vocab = logits.shape
    out = torch.empty(3, rows, dtype=torch.float32, device=logits.device)
    if rows:
        _ce_stats_kernel[(rows,)](
            logits,
            labels,
            out[0],
            out[1],
            out[2],
            vocab,
            logits.stride(0),
            vocab_start,
            ignore_index,
            BLOCK=_block(vocab),
            num_warps=8,
        )
    return out[0], out[1], out[2]


def ce_grad_(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor, vocab_start: int
) -> torch.Tensor:
    """Overwrite logits [c, V] with (softmax - one-hot(labels)) * scale[row]; returns `logits`."""
    rows, vocab = logits.shape
    if rows:
        _ce_grad_kernel[(rows,)](
            logits,
            labels,
            lse.contiguous(),
            scale.contiguous(),
            vocab,
            logits.stride(0),
            vocab_start,
            BLOCK=_block(vocab),
            num_warps=8,
        )
    return logits
