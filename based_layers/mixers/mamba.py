"""Mamba (S6) mixer with the parameter names of mamba-ssm's `Mamba`.

in_proj: d -> 2*d_inner (x, z); x -> causal depthwise conv (d_conv, with bias) -> SiLU;
x_proj -> (dt_low [dt_rank], B [N], C [N]); delta = softplus(dt_proj(dt_low)); A = -exp(A_log);
h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t; y_t = C_t h_t + D x_t; out = out_proj(y * silu(z)).
`backend: reference` is a plain PyTorch scan; `backend: mamba_ssm` calls mamba-ssm's fused CUDA kernels:
training and plain forwards on `mamba_inner_fn`, prefill (`return_state`) on `selective_scan_fn` with the last
state, and decode steps (no gradients) on `selective_state_update`, updating the state in place. mamba-ssm's
scan cannot reset at document starts nor start from a given state: on CUDA such a call with gradients (a
training run with `data.reset_state_at_doc_boundaries`) raises instead of silently running the sequential
scan (about 100x slower); without gradients (prefill of left-padded prompts) it runs the reference scan and
warns once.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from based_layers.config import MambaConfig
from based_layers.packing import causal_depthwise_conv, conv_history, doc_starts


class Mamba(nn.Module):
    def __init__(self, d_model: int, cfg: MambaConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.d_inner = cfg.expand * d_model
        self.d_state = cfg.d_state
        self.d_conv = cfg.d_conv
        self.dt_rank = cfg.dt_rank or math.ceil(d_model / 16)
        self.backend = cfg.backend
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=cfg.bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, cfg.d_conv, groups=self.d_inner,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * cfg.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(self.d_inner, cfg.d_state))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=cfg.bias)
        self._init_ssm(cfg)

    @torch.no_grad()
    def _init_ssm(self, cfg: MambaConfig) -> None:
        """mamba-ssm's init: dt_proj uniform(+-dt_rank^-1/2), bias = softplus^-1(log-uniform dt), A = 1..N."""
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        self.reset_ssm_parameters(cfg)

    @torch.no_grad()
    def reset_ssm_parameters(self, cfg: MambaConfig) -> None:
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D.fill_(1.0)

    def _ssm_inputs(self, x: torch.Tensor):
        """x [..., d_inner] (post-conv) -> delta [..., d_inner], B [..., N], C [..., N] in fp32."""
        dt_low, b, c = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt_low).float())
        return delta, b.float(), c.float()

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, initial_state: dict | None = None,
                return_state: bool = False):
        """x [B, T, D] -> [B, T, D] (and {"conv": [B, d_inner, d_conv], "ssm": [B, d_inner, N]})."""
        if self.backend == "mamba_ssm":
            if doc_ids is None and initial_state is None:
                return self._prefill_mamba_ssm(x) if return_state else _mamba_inner(self, x)
            self._check_scan_fallback(x, doc_ids, initial_state)
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        conv_init = None if initial_state is None else initial_state["conv"][..., 1:]
        xc = F.silu(causal_depthwise_conv(xs, self.conv1d.weight[:, 0], self.conv1d.bias, doc_ids, conv_init))
        delta, b, c = self._ssm_inputs(xc)
        h0 = None if initial_state is None else initial_state["ssm"]
        y, h = self._scan(xc.float(), delta, b, c, doc_ids, h0)
        y = (y + xc.float() * self.D.float()).to(x.dtype) * F.silu(z)
        out = self.out_proj(y)
        if not return_state:
            return out
        return out, {"conv": conv_history(xs, self.d_conv, doc_ids, conv_init), "ssm": h}

    def _scan(self, u, delta, b, c, doc_ids, h0):
        """Sequential selective scan in fp32. u, delta [B, T, Di]; b, c [B, T, N]; returns y [B, T, Di], h_T."""
        batch, seqlen, d_inner = u.shape
        a = -torch.exp(self.A_log.float())  # [Di, N]
        h = u.new_zeros(batch, d_inner, self.d_state) if h0 is None else h0.float()
        keep = None if doc_ids is None else (~doc_starts(doc_ids)).float()
        if keep is not None and h0 is not None:
            keep[:, 0] = 1.0
        ys = []
        for t in range(seqlen):
            decay = torch.exp(delta[:, t].unsqueeze(-1) * a)
            if keep is not None:
                decay = decay * keep[:, t].view(-1, 1, 1)
            h = decay * h + (delta[:, t] * u[:, t]).unsqueeze(-1) * b[:, t].unsqueeze(1)
            ys.append(torch.einsum("bdn,bn->bd", h, c[:, t]))
        return torch.stack(ys, dim=1), h

    def _check_scan_fallback(self, x: torch.Tensor, doc_ids, initial_state) -> None:
        """backend=mamba_ssm with document resets or an initial state runs the sequential reference scan:
        an error on CUDA when gradients are on (training), one warning without them (prefill)."""
        if not x.is_cuda:
            return
        what = "document resets (doc_ids)" if doc_ids is not None else "a parallel forward from a given state"
        msg = (f"model.mamba.backend=mamba_ssm: mamba-ssm's fused scan has no {what}; the sequential reference "
               "scan would run instead (about 100x slower on GPU)")
        if torch.is_grad_enabled():
            raise ValueError(f"{msg}. For training set data.reset_state_at_doc_boundaries=false (as the published "
                             "Mamba runs), or model.mamba.backend=reference to accept the slow scan.")
        warnings.warn(f"{msg}: running it for this forward (e.g. the prefill of left-padded prompts).", stacklevel=3)

    def _prefill_mamba_ssm(self, x: torch.Tensor):
        """Forward with the state after the last token, on mamba-ssm's scan (return_last_state)."""
        selective_scan_fn = _mamba_ssm("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xc = F.silu(causal_depthwise_conv(xs, self.conv1d.weight[:, 0], self.conv1d.bias))
        dt_low, b, c = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt_low, self.dt_proj.weight)
        # selective_scan_fn takes channels-first [B, Di, T] and B, C as [B, N, T]
        y, last = selective_scan_fn(xc.transpose(1, 2), dt.transpose(1, 2), -torch.exp(self.A_log.float()),
                                    b.transpose(1, 2), c.transpose(1, 2), self.D.float(), z=z.transpose(1, 2),
                                    delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                                    return_last_state=True)
        out = self.out_proj(y.transpose(1, 2).to(x.dtype))
        return out, {"conv": conv_history(xs, self.d_conv), "ssm": last.float().contiguous()}

    def _step_mamba_ssm(self, x: torch.Tensor, state: dict, reset: torch.Tensor | None):
        """One token on mamba-ssm's selective_state_update; state["conv"] and state["ssm"] change in place."""
        update, conv_update = _step_kernels()
        conv, h = state["conv"], state["ssm"]
        if reset is not None:
            conv.masked_fill_(reset.view(-1, 1, 1), 0.0)
            h.masked_fill_(reset.view(-1, 1, 1), 0.0)
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        if conv_update is not None and conv.is_contiguous() and conv.dtype == xs.dtype:
            # causal-conv1d's one kernel: shift the window in place, convolve, add the bias, SiLU
            bias = None if self.conv1d.bias is None else self.conv1d.bias.to(conv.dtype)
            xc = conv_update(xs.contiguous(), conv, self.conv1d.weight[:, 0].to(conv.dtype), bias, "silu")
        else:
            conv.copy_(torch.roll(conv, shifts=-1, dims=-1))
            conv[..., -1] = xs.to(conv.dtype)
            xc = (conv * self.conv1d.weight[:, 0].to(conv.dtype)).sum(-1)
            if self.conv1d.bias is not None:
                xc = xc + self.conv1d.bias.to(xc.dtype)
            xc = F.silu(xc).to(xs.dtype)
        dt_low, b, c = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt_low, self.dt_proj.weight)
        y = update(h, xc, dt, -torch.exp(self.A_log.float()), b, c, D=self.D.float(), z=z,
                   dt_bias=self.dt_proj.bias.float(), dt_softplus=True)
        return self.out_proj(y.to(x.dtype)), {"conv": conv, "ssm": h}

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
        return {"conv": torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype),
                "ssm": torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32)}

    def step(self, x: torch.Tensor, state: dict, reset: torch.Tensor | None = None):
        """One token x [B, D] -> y [B, D]. backend=mamba_ssm on CUDA without gradients: mamba-ssm's
        selective_state_update kernel, the state tensors updated in place and returned."""
        if self.backend == "mamba_ssm" and x.is_cuda and not _records_grad(self, x, state["ssm"]):
            return self._step_mamba_ssm(x, state, reset)
        conv, h = state["conv"], state["ssm"]
        if reset is not None:
            keep = (~reset).to(h.dtype)
            conv, h = conv * keep.view(-1, 1, 1).to(conv.dtype), h * keep.view(-1, 1, 1)
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        conv = torch.cat([conv[..., 1:], xs.unsqueeze(-1).to(conv.dtype)], dim=-1)
        xc = (conv * self.conv1d.weight[:, 0].to(conv.dtype)).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias.to(xc.dtype)
        xc = F.silu(xc).to(xs.dtype)
        delta, b, c = self._ssm_inputs(xc)
        a = -torch.exp(self.A_log.float())
        h = torch.exp(delta.unsqueeze(-1) * a) * h + (delta * xc.float()).unsqueeze(-1) * b.unsqueeze(1)
        y = torch.einsum("bdn,bn->bd", h, c) + xc.float() * self.D.float()
        y = y.to(x.dtype) * F.silu(z)
        return self.out_proj(y), {"conv": conv, "ssm": h}


def _records_grad(module: nn.Module, x: torch.Tensor, state: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or state.requires_grad or any(p.requires_grad for p in module.parameters())


def _mamba_ssm(module: str, name: str):
    """`name` from a mamba-ssm module, or a RuntimeError that says how to install it."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise RuntimeError("model.mamba.backend=mamba_ssm needs the mamba-ssm package (pip install mamba-ssm "
                           "causal-conv1d on a CUDA machine); use backend=reference on CPU") from err


@torch.compiler.disable
@functools.cache
def _step_kernels():
    """(selective_state_update, causal_conv1d_update or None when causal-conv1d is missing), both opaque to
    torch.compile: a compiled decode step runs these third-party launches as they are (a graph break) instead
    of tracing into them."""
    update = _mamba_ssm("mamba_ssm.ops.triton.selective_state_update", "selective_state_update")
    try:
        from causal_conv1d import causal_conv1d_update
    except ImportError:
        causal_conv1d_update = None
    conv_update = None if causal_conv1d_update is None else torch.compiler.disable(causal_conv1d_update)
    return torch.compiler.disable(update), conv_update


@torch.compiler.disable
def _mamba_inner(mixer: Mamba, x: torch.Tensor) -> torch.Tensor:
    """The whole mixer in mamba-ssm's fused `mamba_inner_fn` (in_proj output -> conv -> x_proj -> scan ->
    out_proj). Hidden from torch.compile: its CUDA extension calls cannot be traced, so a compiled block
    runs this one call eagerly and compiles the norms, residuals and MLP around it."""
    mamba_inner_fn = _mamba_ssm("mamba_ssm.ops.selective_scan_interface", "mamba_inner_fn")
    xz = _in_proj_channels_first(mixer.in_proj, x)
    # the out_proj bias is added here, not passed in: mamba-ssm 2.3.2's MambaInnerFn.backward returns a 0-d
    # gradient for it (it sums the 2-D flattened dout over both dims), which autograd rejects
    y = mamba_inner_fn(xz, mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight,
                       mixer.out_proj.weight, None, -torch.exp(mixer.A_log.float()), None, None,
                       mixer.D.float(), delta_bias=mixer.dt_proj.bias.float(), delta_softplus=True)
    return y if mixer.out_proj.bias is None else y + mixer.out_proj.bias.to(y.dtype)


def _in_proj_channels_first(in_proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """in_proj(x) for x [B, L, D] as [B, 2 d_inner, L] with L contiguous (strides (L, B L, 1)), the layout
    mamba_inner_fn reads without a copy: W [2 d_inner, D] @ x^T [D, B L], as mamba-ssm's own Mamba computes it.
    `in_proj(x).transpose(1, 2)` has the same values but L strided, which mamba_inner_fn copies to contiguous,
    and whose gradient autograd transposes back: strided copies of [B, L, 2 d_inner] that took 21% of a
    Mamba-1.3B training step on the H200 (docs/PERFORMANCE.md, tenth session)."""
    batch, length, _ = x.shape
    xz = in_proj.weight @ x.reshape(batch * length, -1).transpose(0, 1)
    if in_proj.bias is not None:
        xz = xz + in_proj.bias.to(xz.dtype)[:, None]
    return xz.view(-1, batch, length).transpose(0, 1)
