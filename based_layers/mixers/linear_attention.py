"""Taylor-feature-map linear attention (published Based `LinearAttention`).

q, k: d -> heads x feature_dim (no bias); v: d -> heads x head_dim; out_proj back to d.
y_t = sum_{s<=t} (phi(q_t).phi(k_s)) v_s / (sum_{s<=t} phi(q_t).phi(k_s) + eps), with
phi(x) = [1, x / F^(1/4), vec(x x^T) / (sqrt(2) sqrt(F))]: phi(q).phi(k) = 1 + q.k/sqrt(F) + (q.k)^2/(2F).
State and normalizer accumulate in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from based_layers.config import LinearAttnConfig, resolve_backend, use_fused_step
from kernels.taylor_linear_attn.reference import taylor_feature_map


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """State and normalizer accumulate in fp32 (fp64 for fp64 inputs, for tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LinearAttention(nn.Module):
    def __init__(self, d_model: int, cfg: LinearAttnConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.feature_dim = cfg.feature_dim
        self.head_dim = cfg.head_dim or d_model // cfg.num_heads
        self.eps = cfg.eps
        self.backend = cfg.backend
        self.proj_q = nn.Linear(d_model, cfg.num_heads * cfg.feature_dim, bias=False)
        self.proj_k = nn.Linear(d_model, cfg.num_heads * cfg.feature_dim, bias=False)
        self.proj_v = nn.Linear(d_model, cfg.num_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(cfg.num_heads * self.head_dim, d_model, bias=False)

    def _qkv(self, x: torch.Tensor):
        return self.heads(self.proj_q(x), self.proj_k(x), self.proj_v(x))

    def heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """The projections [..., H*F], [..., H*F], [..., H*Dv] viewed per head: [..., H, F], [..., H, Dv]."""
        lead = q.shape[:-1]
        return (q.view(*lead, -1, self.feature_dim), k.view(*lead, -1, self.feature_dim),
                v.view(*lead, -1, self.head_dim))

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, initial_state: dict | None = None,
                return_state: bool = False):
        """x [B, T, D] -> [B, T, D] (and {"kv": [B,H,273,Dv], "k_sum": [B,H,273]} when `return_state`)."""
        from kernels.taylor_linear_attn import taylor_linear_attention

        q, k, v = self._qkv(x)
        init = None if initial_state is None else (initial_state["kv"], initial_state["k_sum"])
        out = taylor_linear_attention(q, k, v, eps=self.eps, doc_ids=doc_ids, initial_state=init,
                                      output_final_state=return_state, backend=resolve_backend(self.backend, x))
        o, final = out if return_state else (out, None)
        y = self.out_proj(o.reshape(*x.shape[:-1], -1))
        if not return_state:
            return y
        # contiguous: the layout the fused step updates in place
        return y, {"kv": final[0].contiguous(), "k_sum": final[1].contiguous()}

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
        heads = self.proj_q.out_features // self.feature_dim
        n_feat = 1 + self.feature_dim + self.feature_dim**2
        acc = _accum_dtype(dtype)
        return {
            "kv": torch.zeros(batch_size, heads, n_feat, self.head_dim, device=device, dtype=acc),
            "k_sum": torch.zeros(batch_size, heads, n_feat, device=device, dtype=acc),
        }

    def step(self, x: torch.Tensor, state: dict, reset: torch.Tensor | None = None):
        """One token x [B, D]: add phi(k) v^T to the state first, then read out with phi(q).

        On the Triton backend one fused kernel updates state["kv"], state["k_sum"] in place and the returned
        state holds the same tensors; otherwise new state tensors are returned.
        """
        return self.step_qkv(*self._qkv(x), state, reset)

    def step_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: dict,
                 reset: torch.Tensor | None = None):
        """`step` from the token's projections q, k [B, H, F], v [B, H, Dv] (`heads`): tools.generate's decode
        step runs the three projections as one product."""
        if use_fused_step(self.backend, self, v, state["kv"], state["k_sum"]):
            return self._step_fused(q, k, v, state, reset)
        kv, k_sum = state["kv"], state["k_sum"]
        if reset is not None:
            keep = (~reset).to(kv.dtype)
            kv, k_sum = kv * keep.view(-1, 1, 1, 1), k_sum * keep.view(-1, 1, 1)
        acc = _accum_dtype(v.dtype)
        phi_q, phi_k = taylor_feature_map(q.to(acc)), taylor_feature_map(k.to(acc))
        kv = kv + phi_k.unsqueeze(-1) * v.to(acc).unsqueeze(-2)
        k_sum = k_sum + phi_k
        num = torch.einsum("bhf,bhfd->bhd", phi_q, kv)
        den = torch.einsum("bhf,bhf->bh", phi_q, k_sum).unsqueeze(-1) + self.eps
        y = self.out_proj((num / den).to(v.dtype).reshape(v.shape[0], -1))
        return y, {"kv": kv, "k_sum": k_sum}

    def _step_fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: dict,
                    reset: torch.Tensor | None):
        from kernels.taylor_linear_attn import taylor_linear_attention_step

        kv, k_sum = state["kv"], state["k_sum"]
        if not (kv.is_contiguous() and k_sum.is_contiguous()):
            kv, k_sum = kv.contiguous(), k_sum.contiguous()
        if reset is not None:
            kv.masked_fill_(reset.view(-1, 1, 1, 1), 0.0)
            k_sum.masked_fill_(reset.view(-1, 1, 1), 0.0)
        o, kv, k_sum = taylor_linear_attention_step(q, k, v, kv, k_sum, self.eps, backend="triton")
        y = self.out_proj(o.reshape(v.shape[0], -1))
        return y, {"kv": kv, "k_sum": k_sum}
