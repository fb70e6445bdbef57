"""Document boundaries of packed sequences (`doc_ids [B, T]`, see docs/DESIGN.md)."""

from __future__ import annotations

import torch


def doc_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: True where a document starts (position 0 and every change of doc id)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def positions_in_doc(doc_ids: torch.Tensor | None, batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """Long [B, T]: the position of each token inside its own document (0 at every start)."""
    idx = torch.arange(seqlen, device=device).expand(batch, seqlen)
    if doc_ids is None:
        return idx
    start_idx = torch.where(doc_starts(doc_ids), idx, torch.zeros_like(idx))
    return idx - torch.cummax(start_idx, dim=1).values


def same_doc_shifted(doc_ids: torch.Tensor, shift: int) -> torch.Tensor:
    """Bool [B, T]: True where token t and token t - shift exist and belong to the same document."""
    same = torch.zeros_like(doc_ids, dtype=torch.bool)
    if shift < doc_ids.shape[1]:
        same[:, shift:] = doc_ids[:, shift:] == doc_ids[:, :-shift] if shift else True
    return same


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          doc_ids: torch.Tensor | None = None, initial: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise convolution with resets at document starts.

    x [B, T, C]; weight [C, K] (tap K-1 multiplies the current token, tap 0 the token K-1 back);
    initial [B, C, K-1]: the inputs before position 0 (oldest first), or None for zeros.
    Returns [B, T, C]. Taps that would reach into another document read zeros.
    """
    _, seqlen, _ = x.shape
    k = weight.shape[1]
    if initial is not None:
        x_ext = torch.cat([initial.transpose(1, 2).to(x.dtype), x], dim=1)
    else:
        x_ext = torch.nn.functional.pad(x, (0, 0, k - 1, 0))
    out = torch.zeros_like(x) if bias is None else bias.to(x.dtype).expand_as(x).clone()
    for shift in range(k):
        tap = x_ext[:, k - 1 - shift: k - 1 - shift + seqlen]
        if doc_ids is not None and shift:
            tap = tap * _reaches_same_doc(doc_ids, shift, initial is not None).unsqueeze(-1).to(x.dtype)
        out = out + tap * weight[:, k - 1 - shift].to(x.dtype)
    return out


def _reaches_same_doc(doc_ids: torch.Tensor, shift: int, has_initial: bool) -> torch.Tensor:
    """Bool [B, T]: tap `shift` of token t may be read (same document, or the initial state of doc 0)."""
    same = same_doc_shifted(doc_ids, shift)
    if has_initial:
        # positions t < shift read the initial state; allowed while t is still in the first document
        first = doc_ids == doc_ids[:, :1]
        head = torch.zeros_like(same)
        head[:, :shift] = True
        same = same | (head & first)
    return same


def conv_history(x: torch.Tensor, kernel_size: int, doc_ids: torch.Tensor | None = None,
                 initial: torch.Tensor | None = None) -> torch.Tensor:
    """The recurrent state of a causal conv after the last position: [B, C, K], oldest input first.

    x [B, T, C]; initial [B, C, K-1] (inputs before position 0) or None. Entries that precede the start
    of each row's last document are zero, so the state belongs to that document alone.
    """
    batch, seqlen, channels = x.shape
    k = kernel_size
    prev = initial if initial is not None else x.new_zeros(batch, channels, k - 1)
    # only the last k inputs can reach the state: concatenating the whole [B, C, T] history cost a copy of x
    # per conv layer in prefill (25 of 288 ms for 8 x 4096 tokens of the 1.3B model, docs/PERFORMANCE.md)
    hist = torch.cat([prev.to(x.dtype), x[:, -k:].transpose(1, 2)], dim=2)[..., -k:]
    if doc_ids is None:
        return hist
    pos = torch.arange(seqlen - k, seqlen, device=x.device)
    inside = pos >= 0
    valid = torch.zeros(batch, k, dtype=torch.bool, device=x.device)
    valid[:, inside] = doc_ids[:, pos[inside]] == doc_ids[:, -1:]
    if initial is not None:
        one_doc = (doc_ids == doc_ids[:, :1]).all(dim=1, keepdim=True)
        valid[:, ~inside] = one_doc.expand(-1, int((~inside).sum()))
    return hist * valid.unsqueeze(1).to(hist.dtype)
