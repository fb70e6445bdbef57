"""Plain-PyTorch sliding-window causal softmax attention: ground truth for the Triton kernels, the CPU path.

Layouts: q, k, v [B, T, H, D]; doc_ids [B, T]. Query t attends keys max(doc_start(t), t - window) .. t.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _docs(doc_ids: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if doc_ids is None:
        return torch.zeros(q.shape[:2], dtype=torch.long, device=q.device)
    return doc_ids.long()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sliding_window_attention_reference(q, k, v, *, window: int, doc_ids=None, scale=None):
    """Banded form in blocks of `window` queries (O(T * window) memory); differentiable through autograd."""
    batch, seqlen, heads, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    cdt = _compute_dtype(v)
    block = max(1, window)
    n_blocks = -(-seqlen // block)
    pad = n_blocks * block - seqlen
    docs = F.pad(_docs(doc_ids, q), (0, pad), value=-1)
    qf, kf, vf = (F.pad(t.to(cdt), (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    # keys of block n: the previous block and block n itself (2 * block >= window + 1 keys)
    kb, vb, db = (_with_previous_block(t, block) for t in (kf, vf, docs))
    qb = qf.view(batch, n_blocks, block, heads, dim)
    scores = torch.einsum("bnihd,bnjhd->bnhij", qb, kb) * scale
    q_pos = torch.arange(n_blocks * block, device=q.device).view(n_blocks, block)
    k_pos = q_pos[:, :1] - block + torch.arange(2 * block, device=q.device)  # [n, 2 * block]
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    allowed = (kp <= qp) & (kp >= qp - window) & (kp >= 0)
    same_doc = docs.view(batch, n_blocks, block)[..., :, None] == db[..., None, :]
    # padded queries (t >= T) keep their own key so that no row is empty
    allowed = (allowed & same_doc) | ((kp == qp) & (qp >= seqlen))
    scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))
    probs = scores.softmax(-1)
    o = torch.einsum("bnhij,bnjhd->bnihd", probs, vb).reshape(batch, n_blocks * block, heads, dim)
    return o[:, :seqlen].to(v.dtype)


def _with_previous_block(t: torch.Tensor, block: int) -> torch.Tensor:
    """[B, n*block, ...] -> [B, n, 2*block, ...]: each block preceded by the block before it (zeros for n=0)."""
    batch, length = t.shape[:2]
    n = length // block
    blocks = t.view(batch, n, block, *t.shape[2:])
    prev = torch.cat([torch.zeros_like(blocks[:, :1]), blocks[:, :-1]], dim=1)
    return torch.cat([prev, blocks], dim=2)


def sliding_window_attention_dense(q, k, v, *, window: int, doc_ids=None, scale=None):
    """The masked T x T form (test oracle; O(T^2) memory)."""
    seqlen, dim = q.shape[1], q.shape[-1]
    scale = dim**-0.5 if scale is None else scale
    cdt = _compute_dtype(v)
    docs = _docs(doc_ids, q)
    scores = torch.einsum("bihd,bjhd->bhij", q.to(cdt), k.to(cdt)) * scale
    pos = torch.arange(seqlen, device=q.device)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pos[:, None] - window)
    allowed = allowed & (docs[:, :, None] == docs[:, None, :])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v.to(cdt)).to(v.dtype)


def sliding_window_step_reference(q, k, v, k_cache, v_cache, pos, *, scale=None):
    """One decode token over a ring buffer of the `W` previous keys/values (slot = position % W).

    q, k, v [B, H, D]; k_cache, v_cache [B, W, H, D] (updated in place: slot pos % W receives k, v after
    the read); pos [B] int: the position of the current token in its document (0 starts a new one).
    Returns o [B, H, D]: softmax attention over the cached tokens at positions pos-W .. pos-1 and itself.
    """
    batch, window = k_cache.shape[:2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cdt = torch.float64 if v.dtype == torch.float64 else torch.float32
    slots = torch.arange(window, device=q.device)
    prev = pos.long()[:, None] - 1
    # the newest earlier position stored in each slot; valid when it exists (>= 0)
    slot_pos = prev - torch.remainder(prev - slots[None, :], window)
    valid = slot_pos >= 0
    scores = torch.einsum("bhd,bshd->bhs", q.to(cdt), k_cache.to(cdt)) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    self_score = (q.to(cdt) * k.to(cdt)).sum(-1, keepdim=True) * scale
    probs = torch.cat([scores, self_score], dim=-1).softmax(-1)
    o = torch.einsum("bhs,bshd->bhd", probs[..., :window], v_cache.to(cdt)) + probs[..., window:] * v.to(cdt)
    rows = torch.arange(batch, device=q.device)
    slot = torch.remainder(pos.long(), window)
    k_cache[rows, slot] = k.to(k_cache.dtype)
    v_cache[rows, slot] = v.to(v_cache.dtype)
    return o.to(v.dtype)
