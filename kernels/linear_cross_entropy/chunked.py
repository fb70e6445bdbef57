"""Head + cross-entropy over chunks of tokens: the [tokens, vocab] logits never exist at once.

Per chunk of `chunk_size` tokens: logits in the compute dtype (one matmul), the row max, sum of exponentials
and target logit in fp32, the loss, and, when a gradient is needed, the gradients w.r.t. hidden and weight
right away (liger-kernel's FusedLinearCrossEntropy schedule): softmax - one-hot, scaled by 1/valid tokens,
times the weight (d hidden) and accumulated in fp32 against the hidden chunk (d weight). Backward only scales
the stored gradients by the incoming scalar. Three matmuls per chunk, as the plain forward + backward; the
alternative (recompute the logits in backward) costs a fourth matmul of the head for nothing here, because a
training step always runs backward after forward. The per-row softmax work runs in two Triton kernels over the
chunk's logits in the compute dtype (triton_impl.py; the gradient overwrites the logits), or in PyTorch ops on
an fp32 copy where Triton cannot run.

Vocab-parallel (`process_group`): `weight` is this rank's rows [V/P, D] starting at `vocab_start`, `hidden`
the whole (replicated) [N, D]. Per chunk the max is all-reduced (MAX), then the sum of exponentials and the
target logit (SUM, one call); every rank returns the same loss, and its d hidden is this rank's partial sum
(the caller reduces it over the group, e.g. a DTensor declared Partial).
"""

from __future__ import annotations

import importlib.util
import os

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


def _chunk_torch(logits, labels, valid, scale, vocab_start: int, group, need_grad: bool, ignore_index: int):
    """(loss sum of the chunk, d loss / d logits [c, V] in logits' dtype or None) in PyTorch ops."""
    probs = logits.float()
    lse, inv_sum, target, col, here = _row_stats(probs, labels, valid, vocab_start, group)
    loss = ((lse - target) * valid).sum()
    return loss, _chunk_grads(probs, inv_sum, col, here, scale, logits.dtype) if need_grad else None


def _chunk_triton(logits, labels, valid, scale, vocab_start: int, group, need_grad: bool, ignore_index: int):
    """The same with the Triton row kernels; the gradient overwrites `logits` in place."""
    from .triton_impl import ce_grad_, ce_row_stats

    row_max, sums, target = ce_row_stats(logits, labels, vocab_start, ignore_index)
    if group is not None:
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        stacked = torch.stack([sums * torch.exp(row_max - global_max), target])
        dist.all_reduce(stacked, group=group)
        row_max, (sums, target) = global_max, stacked
    lse = row_max + sums.log()
    loss = ((lse - target) * valid).sum()
    return loss, ce_grad_(logits, labels, lse, scale, vocab_start) if need_grad else None


def _rows_impl(choice: str, t: torch.Tensor) -> str:
    """auto: the Triton row kernels on CUDA (and under the Triton CPU interpreter), PyTorch ops otherwise."""
    if choice != "auto":
        return choice
    triton_ok = importlib.util.find_spec("triton") is not None
    return "triton" if triton_ok and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") else "torch"


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
        rows_impl: str,
    ) -> torch.Tensor:
        chunk_fn = _chunk_triton if rows_impl == "triton" else _chunk_torch
        with torch.autocast(hidden.device.type, enabled=False):
            h, w, labels = hidden.to(cdt), weight.to(cdt), labels.contiguous()
            valid = labels != ignore_index
            count = valid.sum().float()
            loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
            dh = torch.empty_like(hidden) if need_grad else None
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
            for start in range(0, h.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                h_c, valid_c = h[rows], valid[rows]
                loss_c, grad = chunk_fn(
                    h_c @ w.t(),
                    labels[rows],
                    valid_c,
                    valid_c / count,
                    vocab_start,
                    group,
                    need_grad,
                    ignore_index,
                )
                loss_sum += loss_c
                if need_grad:
                    dh[rows] = grad @ w
                    _accumulate_fp32(dw, grad.t(), h_c)
                    del grad
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        dh, dw = ctx.saved_tensors
        dh = dh * grad_loss.to(dh.dtype) if ctx.needs_input_grad[0] else None
        dw = (dw * grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 4096,
    process_group=None,
    vocab_start: int = 0,
    rows_impl: str = "auto",
) -> torch.Tensor:
    """Mean cross-entropy of hidden [N, D] @ weight [V(_local), D].T at labels [N]; see the module docstring.

    rows_impl: "triton" (row kernels of triton_impl.py), "torch" (PyTorch ops), "auto" (`_rows_impl`).
    """
    if rows_impl not in ("auto", "triton", "torch"):
        raise ValueError(f"linear_cross_entropy: rows_impl={rows_impl!r}; expected auto, triton or torch")
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
        _rows_impl(rows_impl, hidden),
    )
