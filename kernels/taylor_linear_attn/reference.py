"""Plain-PyTorch Taylor linear attention: the ground truth for the Triton kernels, and the CPU path.

Layouts: q, k [B, T, H, F]; v [B, T, H, Dv]; doc_ids [B, T]; state kv [B, H, 1+F+F*F, Dv] and
k_sum [B, H, 1+F+F*F] in the published feature layout [1, x/F^(1/4), vec(x x^T)/(sqrt(2) sqrt(F))].
"""

from __future__ import annotations

import math

import torch

CHUNK = 64


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    """x [..., F] -> phi(x) [..., 1 + F + F*F], so that phi(q).phi(k) = 1 + q.k/sqrt(F) + (q.k)^2/(2F)."""
    f = x.shape[-1]
    second = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2.0 * f)
    return torch.cat([torch.ones_like(x[..., :1]), x / f**0.25, second], dim=-1)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _doc_ids_or_zeros(doc_ids: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if doc_ids is None:
        return torch.zeros(q.shape[:2], dtype=torch.long, device=q.device)
    return doc_ids.long()


def taylor_linear_attention_reference(q, k, v, *, eps=1e-12, doc_ids=None, initial_state=None,
                                      output_final_state=False, chunk_size: int = CHUNK):
    """Chunked linear-time form (fp32 state, or fp64 for fp64 inputs); differentiable through autograd.

    Returns o [B, T, H, Dv] in v's dtype, or (o, (kv, k_sum)) when `output_final_state`.
    """
    cdt = _compute_dtype(v)
    batch, seqlen, heads, f = q.shape
    n_feat = 1 + f + f * f
    docs = _doc_ids_or_zeros(doc_ids, q)
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    if initial_state is None:
        kv = torch.zeros(batch, heads, n_feat, v.shape[-1], dtype=cdt, device=q.device)
        k_sum = torch.zeros(batch, heads, n_feat, dtype=cdt, device=q.device)
    else:
        kv, k_sum = (s.to(cdt) for s in initial_state)
    doc_prev = docs[:, 0]
    outputs = []
    for t0 in range(0, seqlen, chunk_size):
        sl = slice(t0, min(seqlen, t0 + chunk_size))
        o_c, kv, k_sum, doc_prev = _chunk_step(qf[:, sl], kf[:, sl], vf[:, sl], docs[:, sl], kv, k_sum,
                                               doc_prev, eps)
        outputs.append(o_c)
    o = torch.cat(outputs, dim=1).to(v.dtype)
    if output_final_state:
        return o, (kv, k_sum)
    return o


def _chunk_step(q, k, v, docs, kv, k_sum, doc_prev, eps):
    """One chunk: intra-chunk quadratic part plus the carried state; then the state update."""
    f = q.shape[-1]
    scores = torch.einsum("bihf,bjhf->bhij", q, k) / math.sqrt(f)
    sim = 1 + scores + 0.5 * scores * scores
    size = q.shape[1]
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    same_doc = docs[:, :, None] == docs[:, None, :]
    sim = sim * (causal & same_doc)[:, None].to(sim.dtype)
    num = torch.einsum("bhij,bjhd->bihd", sim, v)
    den = sim.sum(-1).transpose(1, 2)
    phi_q, phi_k = taylor_feature_map(q), taylor_feature_map(k)
    reads_state = (docs == doc_prev[:, None]).to(q.dtype)[:, :, None]
    num = num + reads_state[..., None] * torch.einsum("bihn,bhnd->bihd", phi_q, kv)
    den = den + reads_state * torch.einsum("bihn,bhn->bih", phi_q, k_sum)
    o = num / (den + eps)[..., None]
    doc_last = docs[:, -1]
    writes_state = (docs == doc_last[:, None]).to(q.dtype)[:, :, None, None]
    carry = (doc_last == doc_prev).to(q.dtype)
    phi_k = phi_k * writes_state
    kv = carry[:, None, None, None] * kv + torch.einsum("bjhn,bjhd->bhnd", phi_k, v)
    k_sum = carry[:, None, None] * k_sum + phi_k.sum(1)
    return o, kv, k_sum, doc_last


def taylor_linear_attention_quadratic(q, k, v, *, eps=1e-12, doc_ids=None, initial_state=None,
                                      output_final_state=False):
    """The masked T x T form: simplest statement of the function (test oracle; O(T^2) memory)."""
    cdt = _compute_dtype(v)
    f = q.shape[-1]
    docs = _doc_ids_or_zeros(doc_ids, q)
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    scores = torch.einsum("bthf,bshf->bhts", qf, kf) / math.sqrt(f)
    sim = 1 + scores + 0.5 * scores * scores
    seqlen = q.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
    mask = causal & (docs[:, :, None] == docs[:, None, :])
    sim = sim * mask[:, None].to(cdt)
    num = torch.einsum("bhts,bshd->bthd", sim, vf)
    den = sim.sum(-1).transpose(1, 2)
    first_doc = (docs == docs[:, :1]).to(cdt)[:, :, None]
    last_doc = (docs == docs[:, -1:]).to(cdt)[:, :, None]
    if initial_state is not None:
        kv0, ks0 = (s.to(cdt) for s in initial_state)
        phi_q = taylor_feature_map(qf)
        num = num + first_doc[..., None] * torch.einsum("bthn,bhnd->bthd", phi_q, kv0)
        den = den + first_doc * torch.einsum("bthn,bhn->bth", phi_q, ks0)
    o = (num / (den + eps)[..., None]).to(v.dtype)
    if not output_final_state:
        return o
    phi_k = taylor_feature_map(kf) * last_doc[..., None]
    kv = torch.einsum("bthn,bthd->bhnd", phi_k, vf)
    k_sum = phi_k.sum(1)
    if initial_state is not None:
        single = (docs[:, 0] == docs[:, -1]).to(cdt)
        kv = kv + single[:, None, None, None] * kv0
        k_sum = k_sum + single[:, None, None] * ks0
    return o, (kv, k_sum)


def taylor_linear_attention_step_reference(q, k, v, kv, k_sum, eps=1e-12):
    """One decode token: q, k [B, H, F], v [B, H, Dv]; kv, k_sum fp32 updated in place, then read out.

    Returns (o [B, H, Dv] in v's dtype, kv, k_sum).
    """
    phi_q, phi_k = taylor_feature_map(q.to(kv.dtype)), taylor_feature_map(k.to(kv.dtype))
    kv.add_(phi_k.unsqueeze(-1) * v.to(kv.dtype).unsqueeze(-2))
    k_sum.add_(phi_k)
    num = torch.einsum("bhn,bhnd->bhd", phi_q, kv)
    den = torch.einsum("bhn,bhn->bh", phi_q, k_sum)
    return (num / (den + eps)[..., None]).to(v.dtype), kv, k_sum
