"""Head + cross-entropy over chunks of tokens: the [tokens, vocab] logits never exist at once.

Per chunk of `chunk_size` tokens: logits in the compute dtype (one matmul), the row max, sum of exponentials
and target logit in fp32, the loss, and, when a gradient is needed, the gradients w.r.t. hidden and weight
right away (liger-kernel's FusedLinearCrossEntropy schedule): softmax - one-hot, scaled by 1/valid tokens,
times the weight (d hidden) and accumulated in fp32 against the hidden chunk (d weight). Backward only scales
the stored gradients by the incoming scalar. Three matmuls per chunk, as the plain forward + backward; the
alternative (recompute the logits in backward) costs a fourth matmul of the head for nothing here, because a
training step always runs backward after forward.

Vocab-parallel (`process_group`): `weight` is this rank's rows [V/P, D] starting at `vocab_start`, `hidden`
the whole (replicated) [N, D]. Per chunk the max is all-reduced (MAX), then the sum of exponentials and the
target logit (SUM, one call); every rank returns the same loss, and its d hidden is this rank's partial sum
(the caller reduces it over the group, e.g. a DTensor declared Partial).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for hidden's device, else hidden's own."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with the product accumulated in fp32 (cuBLAS out_dtype on CUDA for bf16/fp16)."""
    if acc.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_((a @ b).to(acc.dtype))


def _row_stats(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, vocab_start: int, group):
    """fp32 logits [c, V_local], overwritten with exp(logit - row max), -> (logsumexp [c], 1 / sum of exp [c],
    target logit [c] (0 where ignored), the target's local column [c], whether it is on this shard [c])."""
    vocab = logits.shape[1]
    local = labels - vocab_start
    here = valid & (local >= 0) & (local < vocab)
    col = local.clamp(0, vocab - 1)
    target = logits.gather(1, col[:, None]).squeeze(1) * here
    row_max = logits.amax(1)
    if group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    logits.sub_(row_max[:, None]).exp_()
    sums = torch.stack([logits.sum(1), target])
    if group is not None:
        dist.all_reduce(sums, group=group)
    return row_max + sums[0].log(), sums[0].reciprocal(), sums[1], col, here


def _chunk_grads(
    exp_logits: torch.Tensor,
    inv_sum: torch.Tensor,
    col: torch.Tensor,
    here: torch.Tensor,
    scale: torch.Tensor,
    cdt: torch.dtype,
) -> torch.Tensor:
    """d loss / d logits of one chunk in `cdt`: (softmax - one-hot) * scale per row ([c] fp32: valid / count)."""
    exp_logits.mul_((inv_sum * scale)[:, None])
    rows = torch.arange(col.shape[0], device=col.device)
    exp_logits[rows, col] -= scale * here
    return exp_logits.to(cdt)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """loss = mean over valid tokens of logsumexp(h W^T) - (h W^T)[label]; gradients computed in forward."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int,
        chunk_size: int,
        cdt: torch.dtype,
        group,
        vocab_start: int,
        need_grad: bool,
    ) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(cdt), weight.to(cdt)
            valid = labels != ignore_index
            count = valid.sum().float()
            loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
            dh = torch.empty_like(hidden) if need_grad else None
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
            for start in range(0, h.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                h_c, valid_c = h[rows], valid[rows]
                probs = (h_c @ w.t()).float()
                lse, inv_sum, target, col, here = _row_stats(probs, labels[rows], valid_c, vocab_start, group)
                loss_sum += ((lse - target) * valid_c).sum()
                if need_grad:
                    grad = _chunk_grads(probs, inv_sum, col, here, valid_c / count, cdt)
                    del probs
                    dh[rows] = grad @ w
                    _accumulate_fp32(dw, grad.t(), h_c)
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        dh, dw = ctx.saved_tensors
        dh = dh * grad_loss.to(dh.dtype) if ctx.needs_input_grad[0] else None
        dw = (dw * grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 4096,
    process_group=None,
    vocab_start: int = 0,
) -> torch.Tensor:
    """Mean cross-entropy of hidden [N, D] @ weight [V(_local), D].T at labels [N]; see the module docstring."""
    # gradients are computed during the forward, so only when a backward can follow (not under no_grad)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return ChunkedLinearCrossEntropy.apply(
        hidden,
        weight,
        labels,
        ignore_index,
        chunk_size,
        compute_dtype(hidden),
        process_group,
        vocab_start,
        need_grad,
    )
