"""Text generation with the recurrent step forms: `python tools/generate.py --checkpoint PATH --prompt TEXT`.

The prompt runs once through the parallel form (`LanguageModel.prefill`); every new token then runs
through `LanguageModel.step`: a constant-size state for Based (linear-attention state, conv tails, a
ring buffer of the window) and Mamba (conv + SSM state), a KV cache for attention.

Batches are left-padded. The pads form their own document (`doc_ids` 0, the prompt 1), so every
recurrent state, the window, the KV cache and the RoPE positions restart at the first prompt token:
no pad token reaches the state, and a padded row produces what it would alone.

On CUDA, the decode step can run as a CUDA graph (`--cuda-graph auto`, the default there): the state
lives in static buffers that the graph updates in place. Attention layers then use a preallocated KV
cache (`StaticKVAttention`), one graph per 128-token bucket of cache length.

CHECKPOINT is a run folder or checkpoint folder of the trainer, a folder written by
tools/export_hf.py, or a published-format folder (config.json + pytorch_model.bin / model.safetensors).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from based_layers.mixers.attention import CausalSelfAttention  # noqa: E402
from based_layers.mixers.linear_attention import LinearAttention  # noqa: E402
from based_layers.mlp import GatedMLP  # noqa: E402
from kernels.decode_attention import decode_attention  # noqa: E402
from kernels.decode_linear import decode_linear, decode_swiglu, swiglu_applies  # noqa: E402
from kernels.tiles import decode_linear_tiles  # noqa: E402
from tools.deferred_adds import block_step_deferred, head_step_deferred  # noqa: E402

ATTENTION_BUCKET = 128
# what StaticKVAttention attends the cache with (see its docstring)
ATTENTION_CORES = ("sdpa", "triton", "reference")
# the static KV cache's head dim is padded to a multiple of this (SDPA's efficient kernels need it)
HEAD_DIM_MULTIPLE = 8


@dataclass
class Sampling:
    """temperature 0 = greedy (argmax); otherwise softmax(logits / temperature) after top-k and top-p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """logits [B, V] (fp32) -> token ids [B]."""
        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        logits = logits / self.temperature
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # drop a token when the tokens before it already hold top_p of the mass (the first always stays)
            drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    """tokens: the new tokens of each row (up to and including eos); logits: [B, new, V] fp32 when kept."""

    tokens: list[list[int]]
    logits: torch.Tensor | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stats: dict = field(default_factory=dict)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu"):
    """-> input_ids [B, L], doc_ids [B, L] (0 on pads, 1 on the prompt) or None when nothing is padded."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    docs = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        docs[row, length - len(prompt):] = 1
    padded = any(len(p) != length for p in prompts)
    return ids.to(device), (docs.to(device) if padded else None)


def doc_ids_from_attention_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, T] 0/1 mask -> doc ids [B, T] (a new id wherever the mask changes: each run of pads is its own
    document), or None when there is no mask or it is all ones. Same rule as the exported modeling code."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    mask = attention_mask.long()
    change = torch.zeros_like(mask)
    change[:, 1:] = (mask[:, 1:] != mask[:, :-1]).long()
    return change.cumsum(dim=1)


@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling | None = None,
             eos_id: int | None = None, pad_id: int = 0, vocab_size: int | None = None,
             generator: torch.Generator | None = None, cuda_graph: bool = False, keep_logits: bool = False,
             stop_at_eos: bool = True, should_stop=None, check_every: int = 4,
             compile_mode: str | None = None, attention_core: str = "sdpa") -> Generation:
    """Generate `max_new_tokens` per prompt (fewer for a row that emits `eos_id`).

    should_stop(rows: list[list[int]]) -> bool, called every `check_every` tokens with the new tokens so
    far, ends generation early (lm-eval's stop strings). Whether every row has emitted eos is also read back
    only every `check_every` tokens (a read is a host-device sync); the rows are cut at their eos either way.
    compile_mode: with cuda_graph, the step's blocks and head run through torch.compile (StaticStep).
    attention_core: with cuda_graph, how attention layers read their static KV cache (StaticKVAttention).

    model: a based_layers LanguageModel (eval mode, any device/dtype). prompts: token ids per row.
    vocab_size: logits beyond it (padded vocabulary rows) are never sampled (default: model.cfg.vocab_size).
    """
    sampling = sampling or Sampling()
    device = next(model.parameters()).device
    vocab = vocab_size or model.cfg.vocab_size
    input_ids, doc_ids = left_pad(prompts, pad_id, device)
    batch = input_ids.shape[0]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    logits, state = model.prefill(input_ids, doc_ids=doc_ids)
    last = _upcast(logits[:, -1, :vocab])
    sync()
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    capacity = input_ids.shape[1] + max_new_tokens
    with _decoder(model, state, batch, capacity, cuda_graph, compile_mode, attention_core) as step:
        out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
        kept = [] if keep_logits else None
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        produced = 0
        for t in range(max_new_tokens):
            if kept is not None:
                # a copy: with CUDA graphs `last` may be a view of the graph's static output, which the next
                # replay overwrites (fp32 logits are not upcast, so no new tensor is made on the way)
                kept.append(last.clone())
            token = sampling.pick(last, generator)
            if eos_id is not None and stop_at_eos:
                token = torch.where(finished, torch.full_like(token, pad_id), token)
                finished |= token == eos_id
            out[:, t] = token
            produced = t + 1
            if t + 1 == max_new_tokens:
                break
            if eos_id is not None and stop_at_eos and (t + 1) % check_every == 0 and bool(finished.all()):
                break
            if should_stop is not None and (t + 1) % check_every == 0 and should_stop(out[:, : t + 1].tolist()):
                break
            last = _upcast(step(token)[:, :vocab])
    sync()
    decode_s = time.perf_counter() - start
    rows = out[:, :produced].tolist()
    if eos_id is not None and stop_at_eos:
        rows = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]
    logits_out = torch.stack(kept, dim=1) if kept is not None else None
    return Generation(rows, logits_out, prefill_s, decode_s, {"batch": batch, "prompt_len": input_ids.shape[1]})


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """fp32 logits (fp64 stays fp64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@contextlib.contextmanager
def _decoder(model, state, batch: int, capacity: int, cuda_graph: bool, compile_mode: str | None = None,
             attention_core: str = "sdpa"):
    """Yields step(token [B]) -> logits [B, V]; eager, or CUDA graphs over static buffers."""
    if not cuda_graph:
        holder = {"state": state}

        def eager(token: torch.Tensor) -> torch.Tensor:
            logits, holder["state"] = model.step(token, holder["state"])
            return logits

        yield eager
        return
    with static_attention(model, state, capacity, attention_core) as static_state:
        yield StaticStep(model, static_state, batch, use_graphs=True, compile_mode=compile_mode)


def padded_head_dim(head_dim: int) -> int:
    """The head dim of the static KV cache: the next multiple of HEAD_DIM_MULTIPLE."""
    return -(-head_dim // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE


class StaticKVAttention(nn.Module):
    """Decode-time stand-in for a CausalSelfAttention: a preallocated KV cache written in place.

    State: k, v [B, C, H, Dp] (C = capacity; Dp = the head dim Dh padded to a multiple of 8 with zeros),
    valid [B, C] bool, length [] long (entries used), next [B] (position of the next token). `limit` (a Python
    int, a multiple of ATTENTION_BUCKET) is how much of the cache the step reads; a CUDA graph is captured per
    limit. `core` picks the attention over the cache: "sdpa" (torch SDPA with a mask), "triton" (the split-K
    kernel of kernels.decode_attention, which spreads each row's cache over several programs) or "reference".
    SDPA's memory-efficient kernel (the one that takes a mask) needs a head dim divisible by 8 (4 in
    fp32); otherwise PyTorch takes its math path (the 1.3B Transformer++ has Dh = 70). The zero padding leaves
    q.k unchanged; the softmax scale stays Dh^-0.5 and the output is cut back to Dh.
    """

    def __init__(self, inner: CausalSelfAttention, core: str = "sdpa") -> None:
        super().__init__()
        if core not in ATTENTION_CORES:
            raise ValueError(f"StaticKVAttention: core={core!r}; expected one of {ATTENTION_CORES}")
        self.inner = inner
        self.core = core
        self.limit = ATTENTION_BUCKET

    @staticmethod
    def allocate(batch: int, capacity: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> dict:
        """An empty static cache (length 0) of `capacity` tokens, rounded up to a multiple of ATTENTION_BUCKET."""
        capacity = -(-capacity // ATTENTION_BUCKET) * ATTENTION_BUCKET
        k = torch.zeros(batch, capacity, heads, padded_head_dim(head_dim), dtype=dtype, device=device)
        return {"k": k, "v": torch.zeros_like(k), "valid": torch.zeros(batch, capacity, dtype=torch.bool, device=device),
                "length": torch.tensor(0, device=device), "next": torch.zeros(batch, dtype=torch.long, device=device)}

    @staticmethod
    def from_prefill(state: dict, capacity: int) -> dict:
        batch, length, heads, dim = state["k"].shape
        static = StaticKVAttention.allocate(batch, capacity, heads, dim, state["k"].dtype, state["k"].device)
        static["k"][:, :length, :, :dim], static["v"][:, :length, :, :dim] = state["k"], state["v"]
        static["valid"][:, :length] = state["valid"]
        static["length"].fill_(length)
        static["next"].copy_(state["next"])
        return static

    def step(self, x: torch.Tensor, state: dict, reset: torch.Tensor | None = None):
        if reset is not None:
            raise ValueError("StaticKVAttention: resets inside generation are not supported")
        q, k, v = self.inner._qkv(x.unsqueeze(1), state["next"].unsqueeze(1))
        y = self.inner.out_proj(self._attend(q, k, v, state))
        return y, {**state, "length": state["length"] + 1, "next": state["next"] + 1}

    # Opaque to torch.compile: `limit` is a Python int that changes every ATTENTION_BUCKET tokens (a compiled
    # region would recompile at each), and SDPA gains nothing from fusion. The projections around it stay compiled.
    @torch.compiler.disable
    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: dict) -> torch.Tensor:
        """q, k, v [B, 1, H, Dh] of this token: write k, v at slot `length`, attend the first `limit` slots.
        Returns o [B, H * Dh]."""
        dim, padded = q.shape[-1], state["k"].shape[-1]
        at = state["length"].view(1)
        state["k"][..., :dim].index_copy_(1, at, k.to(state["k"].dtype))
        state["v"][..., :dim].index_copy_(1, at, v.to(state["v"].dtype))
        state["valid"].index_fill_(1, at, True)
        lim = self.limit
        if self.core != "sdpa":  # kernels.decode_attention reads the cache in place (its first `dim` lanes)
            o = decode_attention(q[:, 0], state["k"], state["v"], state["valid"], lim, dim**-0.5, backend=self.core)
            return o.reshape(q.shape[0], -1)
        keys = state["k"][:, :lim].transpose(1, 2).to(q.dtype)
        values = state["v"][:, :lim].transpose(1, 2).to(q.dtype)
        query = F.pad(q, (0, padded - dim)).transpose(1, 2)
        o = F.scaled_dot_product_attention(query, keys, values, attn_mask=state["valid"][:, None, None, :lim],
                                           scale=dim**-0.5)
        return o[..., :dim].transpose(1, 2).reshape(q.shape[0], -1)


@contextlib.contextmanager
def static_attention(model, state: list[dict], capacity: int, core: str = "sdpa"):
    """Swap every attention mixer for a StaticKVAttention (restored on exit); yields the converted state.

    A layer state that is already static (it has "length", e.g. built by `StaticKVAttention.allocate`) is kept.
    """
    blocks = list(model.transformer.layers.values())
    swapped = []
    new_state = []
    try:
        for block, layer_state in zip(blocks, state, strict=True):
            if isinstance(block.mixer, CausalSelfAttention):
                swapped.append((block, block.mixer))
                block.mixer = StaticKVAttention(block.mixer, core)
                if "length" not in layer_state:  # a prefill's cache; a static one (benchmarks) is used as is
                    layer_state = StaticKVAttention.from_prefill(layer_state, capacity)
            new_state.append(layer_state)
        yield new_state
    finally:
        for block, original in swapped:
            block.mixer = original


def _flat(state: list[dict]) -> list[torch.Tensor]:
    return [t for layer in state for _, t in sorted(layer.items())]


def _block_step(block, x: torch.Tensor, state: dict):
    """One block's recurrent step: the region that `compiled_regions` compiles (once per mixer type)."""
    return block.step(x, state)


def _head_step(model, h: torch.Tensor, vocab: int, greedy: bool):
    """Final norm + LM head on h [B, D] -> (logits [B, V_padded], greedy token [B] or None)."""
    logits = model._head(h)
    return logits, (logits[:, :vocab].argmax(-1) if greedy else None)


class _DecodeLinear(nn.Module):
    """A Linear layer's parameters on decode_linear (backend "auto": our kernel where kernels/tiles.py lists the
    shape, else cuBLAS). A separate module object, not a class swap of the nn.Linear: Dynamo remembers what it
    traced for a module object, so the same object must not change its forward between compiled steps."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight, self.bias)


# one _DecodeLinear per nn.Linear for the layer's lifetime: every StaticStep of a model swaps in the same objects,
# so its compiled regions' guards hold across steps and batch sizes (new objects could mean a recompile each)
_DECODE_LINEARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decode_linear_of(linear: nn.Linear) -> _DecodeLinear:
    fast = _DECODE_LINEARS.get(linear)
    if fast is None or fast.weight is not linear.weight or fast.bias is not linear.bias:
        fast = _DECODE_LINEARS[linear] = _DecodeLinear(linear)
    return fast


class _FusedQKV(nn.Module):
    """A LinearAttention layer whose decode step runs its q, k, v projections as one product (decode_linear,
    backend "auto") over the three weights stacked: one launch instead of three. The stack is a copy of the
    three weights (2 H F + H Dv rows of d_model), made once per layer and remade when a weight changes."""

    def __init__(self, mixer: LinearAttention) -> None:
        super().__init__()
        # weak: the cache below maps the mixer to this object, which must not keep the mixer alive
        self._base = weakref.ref(mixer)
        projections = (mixer.proj_q, mixer.proj_k, mixer.proj_v)
        self.sizes = [p.out_features for p in projections]
        self.sources = _weight_versions(mixer)  # the weights stacked, each with its in-place version
        with torch.no_grad():
            self.register_buffer("weight", torch.cat([p.weight for p in projections]), persistent=False)

    def step(self, x: torch.Tensor, state: dict, reset: torch.Tensor | None = None):
        base = self._base()
        q, k, v = decode_linear(x, self.weight).split(self.sizes, dim=-1)
        return base.step_qkv(*base.heads(q, k, v), state, reset)


def _weight_versions(mixer: LinearAttention) -> list:
    """The three projection weights, each with its in-place version (load_state_dict copies in place and bumps
    it) and its storage (model.to() gives a parameter new storage without a version bump)."""
    return [(p.weight, p.weight._version, p.weight.data_ptr()) for p in (mixer.proj_q, mixer.proj_k, mixer.proj_v)]


def _stack_is_current(fused: _FusedQKV, mixer: LinearAttention) -> bool:
    return all(w is now and rest == now_rest for (w, *rest), (now, *now_rest)
               in zip(fused.sources, _weight_versions(mixer), strict=True))


_FUSED_QKV: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fused_qkv_layers(model) -> list[tuple[nn.Module, str, LinearAttention, _FusedQKV]]:
    """(block, "mixer", LinearAttention, its _FusedQKV) for the model's linear-attention layers, each _FusedQKV
    kept per layer (like _DecodeLinear) and remade when the layer's weights changed since it was made."""
    swaps = []
    for block in model.transformer.layers.values():
        mixer = block.mixer
        if type(mixer) is not LinearAttention:
            continue
        fused = _FUSED_QKV.get(mixer)
        if fused is None or not _stack_is_current(fused, mixer):
            fused = _FUSED_QKV[mixer] = _FusedQKV(mixer)
        swaps.append((block, "mixer", mixer, fused))
    return swaps


class _DecodeGatedMLP(nn.Module):
    """A GatedMLP whose decode step runs fc1 and the SwiGLU gate as one kernel (decode_swiglu) where it applies
    (at most 16 rows of half-precision inputs), then the MLP's fc2 (under the swap: its _DecodeLinear when the
    table lists it); elsewhere the MLP itself."""

    def __init__(self, mlp: GatedMLP) -> None:
        super().__init__()
        # weak: the cache below maps the MLP to this object, which must not keep the MLP alive
        self._base = weakref.ref(mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self._base()
        if mlp.fc1.bias is None and swiglu_applies(x, mlp.fc1.weight):
            return mlp.fc2(decode_swiglu(x, mlp.fc1.weight))
        return mlp(x)


_GATED_MLPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def gated_mlp_layers(model) -> list[tuple[nn.Module, str, GatedMLP, _DecodeGatedMLP]]:
    """(block, "mlp", GatedMLP, its _DecodeGatedMLP) for every block with a GatedMLP, one object per MLP for its
    lifetime (like _DecodeLinear)."""
    swaps = []
    for block in model.transformer.layers.values():
        if type(getattr(block, "mlp", None)) is GatedMLP:
            fast = _GATED_MLPS.get(block.mlp)
            if fast is None:
                fast = _GATED_MLPS[block.mlp] = _DecodeGatedMLP(block.mlp)
            swaps.append((block, "mlp", block.mlp, fast))
    return swaps


def decode_linear_layers(model) -> list[tuple[nn.Module, str, nn.Linear, _DecodeLinear]]:
    """(parent, attribute, nn.Linear, its _DecodeLinear) for the model's Linear layers whose weight shape has a
    decode_linear entry on their device kind."""
    return [(parent, name, child, _decode_linear_of(child)) for parent in model.modules()
            for name, child in parent.named_children() if type(child) is nn.Linear
            and decode_linear_tiles(child.weight.device, child.in_features, child.out_features)]


@contextlib.contextmanager
def decode_linears(swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]]):
    """While active, each listed module (a Linear layer, a linear-attention mixer, a GatedMLP) is replaced in its
    parent by its decode form (_DecodeLinear, _FusedQKV, _DecodeGatedMLP), and put back after."""
    for parent, name, _, fast in swaps:
        setattr(parent, name, fast)
    try:
        yield
    finally:
        for parent, name, linear, _ in swaps:
            setattr(parent, name, linear)


def _block_step_fast(block, x: torch.Tensor, state: dict):
    """_block_step with the listed Linear layers swapped to _DecodeLinear: its own code object, so that Dynamo
    keeps its compiled graphs apart from _block_step's (its guards need not see the module's class)."""
    return _block_step(block, x, state)


def _head_step_fast(model, h: torch.Tensor, vocab: int, greedy: bool):
    """_head_step under the swap (see _block_step_fast)."""
    return _head_step(model, h, vocab, greedy)


def _region_functions(fast_linears: bool, defer_adds: bool) -> tuple:
    """(block step, head step) of a StaticStep form: the deferred-add steps take (block, x, pending, state)
    and (model, x, pending, vocab, greedy), the others (block, h, state) and (model, h, vocab, greedy)."""
    if defer_adds:
        return block_step_deferred, head_step_deferred
    return (_block_step_fast, _head_step_fast) if fast_linears else (_block_step, _head_step)


_COMPILED: dict[tuple[str, bool, bool], tuple] = {}
# StaticStep's default for `fast_linears` (benches set it False to time cuBLAS everywhere, e.g. --linears cublas)
FAST_LINEARS = True
# Under fast_linears, also the linear-attention layers' q, k, v as one product (benches: --linears unfused off)
FUSE_QKV = True
# Under fast_linears, also each block's last residual add deferred into the next block's fused add + RMSNorm
# (tools/deferred_adds.py; benches: --linears table off)
DEFER_ADDS = True
# Under fast_linears, also fc1 and the SwiGLU gate as one kernel (_DecodeGatedMLP; on the H200, 2026-12-02,
# Based-1.3B 1.71 -> 1.61 ms per step at batch 1: docs/PERFORMANCE.md, tenth session); benches: --linears fused off
FUSE_GATE = True
# The benches' --linears: "gated" (all of the above), "fused" (all but the gate), "table" (decode_linear and the
# stacked q, k, v), "unfused" (decode_linear, the projections apart), "cublas" (none: every product on cuBLAS)
LINEAR_CHOICES = ("gated", "fused", "table", "unfused", "cublas")


def set_linears(choice: str) -> None:
    """FAST_LINEARS, FUSE_QKV, DEFER_ADDS and FUSE_GATE for every StaticStep made after this, by a
    LINEAR_CHOICES name."""
    global FAST_LINEARS, FUSE_QKV, DEFER_ADDS, FUSE_GATE
    if choice not in LINEAR_CHOICES:
        raise ValueError(f"linears={choice!r}; expected one of {LINEAR_CHOICES}")
    FAST_LINEARS, FUSE_QKV = choice != "cublas", choice in ("gated", "fused", "table")
    DEFER_ADDS, FUSE_GATE = choice in ("gated", "fused"), choice == "gated"


def compiled_regions(mode: str, fast_linears: bool = False, defer_adds: bool = False) -> tuple:
    """(block step, head step) compiled by torch.compile with `mode` ("default", "max-autotune-no-cudagraphs", ...;
    "dynamo" traces with the eager backend).

    Regional compilation: the block step is one code object for every layer, so Dynamo compiles it once per
    mixer type (and once more when the batch size first changes, then with a dynamic batch) and reuses it for
    every layer of that type. Inside a region inductor fuses the residual adds, the fp32 RMSNorms and their
    casts, the MLP gate and the mixers' elementwise work around the matrix products and the mixer kernels.
    Not "reduce-overhead": StaticStep captures the CUDA graph itself, over the whole step. `fast_linears`: the
    regions StaticStep runs with the decode_linear swap (separate functions, so separate compiled graphs);
    `defer_adds`: tools/deferred_adds.py's block and head steps (under the swap).
    """
    key = (mode, fast_linears, defer_adds)
    if key not in _COMPILED:
        import torch._dynamo

        # 3 mixer types (Based) + attention + Mamba regions, each static then dynamic, across contexts
        name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
        # "dynamo": Dynamo's tracing and graph breaks with the eager backend (no inductor; fast, for CPU tests)
        options = {"backend": "eager"} if mode == "dynamo" else {"mode": mode}
        block, head = _region_functions(fast_linears, defer_adds)
        _COMPILED[key] = (torch.compile(block, **options), torch.compile(head, **options))
    return _COMPILED[key]


class StaticStep:
    """model.step on static buffers updated in place; replayed from CUDA graphs (one per attention bucket).

    With `use_graphs=False` the same static-buffer step runs eagerly (any device; used by the tests).
    `compile_mode` runs every block's step and the head through torch.compile (`compiled_regions`) instead of
    the eager `model.step` (the same computation: embeddings, each block's step, final norm and head).
    `greedy=True` puts the sampling head inside the step: its argmax is written into the token buffer, so a
    call without a token continues from the previous greedy token with no host work but the replay.
    `warm_up_restores=False` restores only the integer bookkeeping (positions, lengths, the token) around the
    warm-up step before a capture, not the floating-point state (which then holds one more token): for
    benchmarks, where the values do not matter and a copy of the whole state would not fit at the largest
    batches. `fast_linears` (default: the module's FAST_LINEARS) runs the Linear layers whose shapes
    kernels/tiles.py lists on decode_linear (measured faster than cuBLAS at a decode step's few rows; nothing
    changes where the table has no entry) and, with FUSE_QKV, each linear-attention layer's three input
    projections as one product (_FusedQKV). `defer_adds` (default DEFER_ADDS; with fast_linears only) runs
    the blocks in tools/deferred_adds.py's form: each block's last residual add inside the next fused norm.
    `fuse_gate` (default FUSE_GATE; with fast_linears only) runs each GatedMLP's fc1 and gate as one kernel.
    """

    def __init__(self, model, state: list[dict], batch: int, use_graphs: bool = True,
                 compile_mode: str | None = None, greedy: bool = False, warm_up_restores: bool = True,
                 fast_linears: bool | None = None, defer_adds: bool | None = None,
                 fuse_gate: bool | None = None) -> None:
        self.model = model
        fast = FAST_LINEARS if fast_linears is None else fast_linears
        fused = fused_qkv_layers(model) if fast and FUSE_QKV else []
        gated = gated_mlp_layers(model) if fast and (FUSE_GATE if fuse_gate is None else fuse_gate) else []
        self.linears = decode_linear_layers(model) + fused + gated if fast else []
        self.defer_adds = fast and (DEFER_ADDS if defer_adds is None else defer_adds)
        self.warm_up_restores = warm_up_restores
        self.state = state
        self.use_graphs = use_graphs
        self.compile_mode = compile_mode
        self.greedy = greedy
        self.vocab = model.cfg.vocab_size
        device = _flat(state)[0].device
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        blocks = list(model.transformer.layers.values())
        self.static_attn = [b.mixer for b in blocks if isinstance(b.mixer, StaticKVAttention)]
        # The step writes the KV caches only at slot `length` (append-only). The other state tensors are either
        # updated in place by the mixer (the fused Triton steps) or returned new and copied back by `_body`.
        self._append_only = {id(layer[k]) for layer in state if "length" in layer for k in ("k", "v")}
        lengths = [int(layer["length"]) for layer in state if "length" in layer]
        self.host_length = lengths[0] if lengths else 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _forward(self) -> tuple[torch.Tensor, torch.Tensor | None, list[dict]]:
        """-> (logits [B, V], greedy token [B] or None, new state)."""
        if self.compile_mode is None and not self.defer_adds:
            logits, new_state = self.model.step(self.token, self.state)
            return logits, (logits[:, : self.vocab].argmax(-1) if self.greedy else None), new_state
        fast = bool(self.linears)
        if self.compile_mode is None:
            block_step, head_step = _region_functions(fast, self.defer_adds)
        else:
            block_step, head_step = compiled_regions(self.compile_mode, fast, self.defer_adds)
        h = self.model.transformer.embeddings(self.token)
        pending = None
        new_state = []
        for block, layer_state in zip(self.model.transformer.layers.values(), self.state, strict=True):
            if self.defer_adds:
                h, pending, layer_state = block_step(block, h, pending, layer_state)
            else:
                h, layer_state = block_step(block, h, layer_state)
            new_state.append(layer_state)
        head_args = (h, pending) if self.defer_adds else (h,)
        logits, token = head_step(self.model, *head_args, self.vocab, self.greedy)
        return logits, token, new_state

    def _body(self) -> torch.Tensor:
        with decode_linears(self.linears):
            logits, token, new_state = self._forward()
        # a tensor the mixer updated in place comes back as itself: nothing to copy
        for static, fresh in zip(_flat(self.state), _flat(new_state), strict=True):
            if static is not fresh:
                static.copy_(fresh)
        if token is not None:  # the next step's input, written on the device
            self.token.copy_(token)
        return logits

    def _set_limit(self) -> int:
        limit = (self.host_length // ATTENTION_BUCKET + 1) * ATTENTION_BUCKET if self.static_attn else 0
        for mixer in self.static_attn:
            mixer.limit = limit
        return limit

    def will_capture(self) -> bool:
        """True when the next call captures a new graph (first call, or a new attention bucket)."""
        limit = (self.host_length // ATTENTION_BUCKET + 1) * ATTENTION_BUCKET if self.static_attn else 0
        return self.use_graphs and limit not in self.graphs

    def _warm_up(self) -> None:
        """Run one step (so that every kernel is compiled before a capture) and undo what it did to the state.

        The step changes the static state, whether a mixer writes it in place or `_body` copies a new value
        into it: every tensor is cloned before (a clone, so that an in-place write cannot reach the copy) and
        put back after, the token buffer too (a greedy step overwrites it). Not the KV caches: the step only
        writes their slot at `length`, which the next real step overwrites. (The sliding-window ring is not
        append-only: the slot pos % window that the step writes still holds a key that the next step reads,
        so it is saved like the rest.)
        """
        tensors = [t for t in _flat(self.state) if id(t) not in self._append_only] + [self.token]
        if not self.warm_up_restores:  # the bookkeeping only: positions, lengths, the token
            tensors = [t for t in tensors if not t.is_floating_point()]
        saved = [(t, t.clone()) for t in tensors]
        self._body()
        for static, value in saved:
            static.copy_(value)

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._warm_up()
            # a second run: compiled code may finish its setup (e.g. a recompile) on a later call
            if self.compile_mode is not None:
                self._warm_up()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._body()
        self.pool = graph.pool()
        return graph, logits

    def __call__(self, token: torch.Tensor | None = None) -> torch.Tensor:
        """One step on `token` [B] (or, when None, on the token buffer: the previous greedy token) -> logits."""
        limit = self._set_limit()
        if token is not None:
            self.token.copy_(token)
        if not self.use_graphs:
            logits = self._body()
        else:
            if limit not in self.graphs:
                self.graphs[limit] = self._capture()
            graph, logits = self.graphs[limit]
            graph.replay()
        self.host_length += 1
        return logits


def continuation_text(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text that `new` adds after `prompt`: the whole sequence decoded, minus the prompt's text.

    Decoding `new` alone loses what depends on the tokens before it: SentencePiece drops the leading space
    of a first piece "▁Oslo", so "Alice lives in" + decode(new) would read "Alice lives inOslo".
    """
    whole = tokenizer.decode(list(prompt) + list(new))
    head = tokenizer.decode(list(prompt))
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(list(new))


def has_attention(model) -> bool:
    return any(isinstance(b.mixer, CausalSelfAttention) for b in model.transformer.layers.values())


def main(argv: list[str] | None = None) -> int:
    from data_pipeline.errors import TokenizerError
    from tools.model_io import ModelLoadError, load_model, load_tokenizer_for

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder, export or published folder")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch (left-padded)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the one the checkpoint names)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--cuda-graph", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--no-stop-at-eos", action="store_true")
    parser.add_argument("--compile", default="off",
                        help="with CUDA graphs: torch.compile mode of the decode step (default, "
                             "max-autotune-no-cudagraphs, ...; off = eager kernels in the graph)")
    args = parser.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        loaded = load_model(args.checkpoint)
        tokenizer = load_tokenizer_for(loaded, args.tokenizer)
    except (ModelLoadError, TokenizerError) as err:
        print(f"generate: error: {err}", file=sys.stderr)
        return 1
    model = loaded.model.to(device=device, dtype=getattr(torch, dtype_name)).eval()
    prompts = [tokenizer.encode(p) for p in args.prompt]
    graphs = device.startswith("cuda") and args.cuda_graph != "off"
    generator = torch.Generator(device=device).manual_seed(args.seed)
    result = generate(model, prompts, args.max_new_tokens, Sampling(args.temperature, args.top_k, args.top_p),
                      eos_id=tokenizer.eos_id, pad_id=tokenizer.eos_id, generator=generator, cuda_graph=graphs,
                      stop_at_eos=not args.no_stop_at_eos,
                      compile_mode=None if args.compile == "off" or not graphs else args.compile)
    for text, ids, tokens in zip(args.prompt, prompts, result.tokens, strict=True):
        print(f"{text}{continuation_text(tokenizer, ids, [t for t in tokens if t != tokenizer.eos_id])}")
        print("-" * 40)
    new = sum(len(t) for t in result.tokens)
    print(f"[{new} new tokens; prefill {result.prefill_s * 1e3:.1f} ms, decode {result.decode_s * 1e3:.1f} ms, "
          f"{new / max(result.decode_s, 1e-9):.1f} tokens/s, device {device}, {dtype_name}, cuda graphs {graphs}]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
