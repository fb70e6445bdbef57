"""Plain-PyTorch head + cross-entropy: the whole [tokens, vocab] logits in fp32 (what the trainer did before).

Layouts: hidden [N, D]; weight [V, D]; labels [N] int (`ignore_index` rows count neither in the sum nor in the
mean). Under autocast the matmul runs in the autocast dtype, exactly like `nn.Linear` does.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    process_group=None,
    vocab_start: int = 0,
    rows_impl: str | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of softmax(hidden @ weight.T) at `labels` (fp32 scalar).

    Takes `kernels.linear_cross_entropy.linear_cross_entropy`'s arguments; the chunking ones change nothing
    here, and there is no vocab-parallel form (`process_group` must be None).
    """
    if process_group is not None:
        raise ValueError("linear_cross_entropy_reference: no vocab-parallel form; use backend='chunked'")
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
