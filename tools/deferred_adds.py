"""The decode step with each block's last residual add deferred into the next block's fused add + RMSNorm.

A decode step is launch-bound (docs/PERFORMANCE.md, issue 17): a Based-1.3B step runs ~380 kernels of a few
microseconds each. `Block.step` ends with x + mlp(...) as its own kernel, and the next block's norm1 then
reads x alone; here the block returns the residual stream and the output still to be added (`pending`), and
the next block's norm1 (or the final norm) adds it in its fused add + RMSNorm kernel, the one norm2 already
uses for the add after the mixer: one launch fewer per block, the same arithmetic (the fp32 add of the same
two values, rounded the same way).
"""

from __future__ import annotations

import torch
from torch import nn


def _add_norm(block: nn.Module, norm: nn.Module, x: torch.Tensor, pending: torch.Tensor | None):
    """(norm(x + pending), x + pending) with the block's residual dtype; (norm(x), x) when nothing is pending."""
    return (norm(x), x) if pending is None else block.add_norm(norm, x, pending)


def block_step_deferred(block: nn.Module, x: torch.Tensor, pending: torch.Tensor | None, state: dict):
    """One block's step on the residual stream x [B, D] plus `pending` [B, D] (None: nothing) ->
    (x', pending', state): Block.step(x + pending, state) is x' + pending'."""
    h, x = _add_norm(block, block.norm1, x, pending)
    mixed, state = block.mixer.step(h, state)
    if block.mlp is None:
        return x, mixed, state
    h, x = block.add_norm(block.norm2, x, mixed)
    return x, block.mlp(h), state


def head_step_deferred(model: nn.Module, x: torch.Tensor, pending: torch.Tensor | None, vocab: int, greedy: bool):
    """The final norm of x + pending and the LM head -> (logits [B, V_padded], greedy token [B] or None)."""
    last = next(reversed(model.transformer.layers.values()))  # for the residual dtype (all blocks share it)
    h, _ = _add_norm(last, model.transformer.ln_f, x, pending)
    logits = model.lm_head(h)
    return logits, (logits[:, :vocab].argmax(-1) if greedy else None)
