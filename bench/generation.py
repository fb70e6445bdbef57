"""Generation benchmark: Based-1.3B vs Transformer++-1.3B vs Mamba-1.3B shapes (random weights, bf16), one GPU.

    python bench/generation.py --out runs/bench/generation.json            # the whole grid, a few minutes
    python bench/generation.py --quick --out runs/bench/generation_quick.json

Models: configs/based_1b_10b.yaml (d 1792, 36 layers: 22 BaseConv, 7 Taylor linear attention with 16 heads x
dv 112, 7 sliding window 128), configs/attn_1b_10b.yaml (d 1680, 36 layers, 24 heads x 70, SDPA) and
configs/mamba_1b_10b.yaml (d 2048, 46 layers; mamba-ssm's step kernels when the package imports).

- decode, the long-context grid: for each cache length in --contexts (1024 = the default comparison, 4k, 16k,
  32k) and batch in --batches, --steps greedy tokens are timed after one warm-up step that captures the CUDA
  graph (and compiles the step: --step compiled). The step is tools/generate.py's `StaticStep`: static buffers,
  the greedy head inside the graph, one graph replay per token and nothing else on the host.
  The cache is not filled by a prefill of the whole context (32k x 128 tokens of prefill would take minutes and,
  for attention, twice the cache's memory): a decode step's cost does not depend on the values it reads, so
  * attention gets a preallocated KV cache of `context` random N(0, 1) keys and values (valid, position
    `context`: every step reads all of them, as after a real prefill);
  * Based and Mamba get the state of a real --fill-len-token prefill (the sliding-window ring is then full and
    the linear-attention state and conv tails are those of real tokens), copied to every row, with the window's
    positions moved on to `context`. Their state has the same size at every context length.
  A combination whose state does not fit in the free GPU memory is skipped with a note; one that fails records
  its error. Every measurement is written to --out as soon as it is taken.
- floor: the decode step's memory-bandwidth bound, (weight bytes read + batch x state bytes read and written
  per step) / the bandwidth of a device-to-device copy measured in the same run. The KV cache counts its
  unpadded head dim and the tokens cached on average over the timed steps.
  Transformer++ reads its cache with torch SDPA by default (--attn-core sdpa: measured faster than the split-K
  kernel of kernels/decode_attention on the H200; --attn-core triton|auto times the kernel, with SDPA beside it
  at two cells).
- most sequences that fit (after every model's grid, since it fills the GPU): per model and context,
  predicted from the measured per-sequence memory (state plus the step's activations, the slope of peak memory
  over batch in the grid) and the free memory, then checked by allocating that many sequences and running one
  eager step (on out-of-memory, a bisection towards the largest batch known to fit, at most --fit-tries
  tries); then the decode is timed at that batch (the throughput of a full GPU).
- prefill: `prefill` (logits of every position + the state) of --prefill-batches x --prefill-len tokens for
  Based and Transformer++, eager and captured as one CUDA graph; median of CUDA-event timings.
- graph check: greedy tokens of tools.generate with the chosen decode step against the eager `model.step` path.
- 24x: where Based's decode tokens/s reaches 24x Transformer++'s, at the same batch and per GPU.
Based's mixers run the Triton kernels that pass a probe against their references (a child process). The run
keeps to --budget-s (each model an equal share of what is left; later measurements are skipped with a note).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# the repository root first: bench/kernels.py would otherwise shadow the `kernels` package
sys.path.insert(0, str(ROOT))

from based_layers import build_model  # noqa: E402
from based_layers.mixers import CausalSelfAttention  # noqa: E402
from kernels._pdl import DEFAULT_GROUPS as DEFAULT_PDL_GROUPS  # noqa: E402
from tools import generate as tools_generate  # noqa: E402
from tools.generate import ATTENTION_BUCKET, StaticKVAttention, StaticStep, static_attention  # noqa: E402
from tools.model_io import model_config_from_dict  # noqa: E402

CONFIGS = {"based": "based_1b_10b", "attn": "attn_1b_10b", "mamba": "mamba_1b_10b"}
LABELS = {"based": "Based", "attn": "Transformer++", "mamba": "Mamba"}
GIB = 2**30
# memory kept free beside the state: the step's activations, the CUDA graph pool, cuBLAS workspaces
FIT_MARGIN_BYTES = 3 * GIB
# seconds of a model's share of --budget-s kept for its graph check (a compile at one more batch size)
GRAPH_CHECK_RESERVE_S = 30
# share of the time budget (after the probe) for the decode grids; the rest is for the "most sequences" phase
FIT_PHASE_SHARE_GRID = 0.75


def model_config(name: str, backend: str, mamba_backend: str = "reference"):
    import yaml

    values = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["model"]
    for section in ("base_conv", "linear_attn", "sliding_window"):
        if section in values:
            values[section] = {**values[section], "backend": backend}
    if "mamba" in values:
        values["mamba"] = {**values["mamba"], "backend": mamba_backend}
    return model_config_from_dict(values)


def make_model(name: str, backend: str, device: str = "cuda", mamba_backend: str = "reference"):
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(model_config(name, backend, mamba_backend))
    return model.to(torch.bfloat16).eval()


def mamba_ssm_error() -> str | None:
    """None when mamba-ssm's step kernels import, else why not (Mamba then decodes on the PyTorch step)."""
    try:
        from causal_conv1d import causal_conv1d_update  # noqa: F401
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update  # noqa: F401
    except Exception as err:  # ImportError, or a wheel built for another torch
        return f"{type(err).__name__}: {err}"[:300]
    return None


def copy_bandwidth(device: str = "cuda") -> float:
    """Bytes per second of a 2 GiB device-to-device copy (bytes read + written)."""
    src = torch.randn(256 * 1024 * 1024, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    bw = 2 * src.numel() * 4 / statistics.median(times[1:])
    del src, dst
    torch.cuda.empty_cache()
    return bw


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: every parameter once (a tied embedding is read by the head),
    but an untied input embedding only at the batch's rows (counted as nothing)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.transformer.embeddings.word_embeddings.weight
    if model.lm_head is not None and model.lm_head.weight is not emb:
        total -= emb.numel() * emb.element_size()
    return total


def _attention_geometry(mixer) -> tuple[int, int]:
    inner = mixer.inner if isinstance(mixer, StaticKVAttention) else mixer
    return inner.Wqkv.out_features // (3 * inner.head_dim), inner.head_dim


def state_traffic_per_seq(model, state: list[dict], context: int, steps: int) -> int:
    """Bytes of state one decode step must read and write per sequence, averaged over `steps` steps that start
    with `context` cached tokens: a KV cache reads its tokens (unpadded head dim) and writes one; the
    sliding-window ring is read and one slot written; linear-attention, conv and SSM states are read and written."""
    total = 0.0
    for block, layer in zip(model.transformer.layers.values(), state, strict=True):
        batch = next(iter(layer.values())).shape[0]
        if "valid" in layer:
            heads, head_dim = _attention_geometry(block.mixer)
            per_token = 2 * heads * head_dim * layer["k"].element_size()
            total += per_token * (context + steps / 2 + 1)
        elif "pos" in layer:
            total += (layer["k"].numel() + layer["v"].numel()) * layer["k"].element_size() / batch
        else:
            total += 2 * sum(t.numel() * t.element_size() for t in layer.values()) / batch
    return int(total)


class StateTemplate:
    """One sequence's decode state for a model, from which states of any batch and cache length are built.

    Non-attention layers: the state after a real prefill of `fill_len` random tokens (batch 1). Attention
    layers: geometry only; `build` allocates a static KV cache and fills `context` slots with N(0, 1).
    """

    def __init__(self, model, fill_len: int, seed: int = 0) -> None:
        self.model = model
        self.blocks = list(model.transformer.layers.values())
        self.fill_len = fill_len
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.rows: list[dict | None] = [None] * len(self.blocks)
        self.has_attention = any(isinstance(b.mixer, CausalSelfAttention) for b in self.blocks)
        if not all(isinstance(b.mixer, CausalSelfAttention) for b in self.blocks):
            gen = torch.Generator(device=self.device).manual_seed(seed)
            ids = torch.randint(0, model.cfg.vocab_size, (1, fill_len), device=self.device, generator=gen)
            with torch.inference_mode():
                _, state = model.prefill(ids)
            self.rows = [
                None if isinstance(b.mixer, CausalSelfAttention) else s
                for b, s in zip(self.blocks, state, strict=True)
            ]

    @staticmethod
    def capacity(context: int, steps: int) -> int:
        """KV slots for `context` cached tokens and `steps` more, a multiple of the attention bucket."""
        return -(-(context + steps + 1) // ATTENTION_BUCKET) * ATTENTION_BUCKET

    def bytes_per_seq(self, context: int, steps: int) -> int:
        """Resident state bytes of one sequence (the KV cache at its padded, bucketed size)."""
        total = 0
        for block, row in zip(self.blocks, self.rows, strict=True):
            if row is None:
                heads, head_dim = _attention_geometry(block.mixer)
                padded = -(-head_dim // 8) * 8
                slots = self.capacity(context, steps)
                # k and v, the valid flags; `next` (int64) per sequence
                total += slots * (2 * heads * padded * torch.finfo(self.dtype).bits // 8 + 1) + 8
            else:
                total += sum(t.numel() * t.element_size() for t in row.values())
        return total

    def build(self, batch: int, context: int, steps: int, seed: int = 0) -> list[dict]:
        state = []
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for block, row in zip(self.blocks, self.rows, strict=True):
            if row is None:
                heads, head_dim = _attention_geometry(block.mixer)
                layer = StaticKVAttention.allocate(
                    batch, self.capacity(context, steps), heads, head_dim, self.dtype, self.device
                )
                layer["k"][:, :context, :, :head_dim].normal_(generator=gen)
                layer["v"][:, :context, :, :head_dim].normal_(generator=gen)
                layer["valid"][:, :context] = True
                layer["length"].fill_(context)
                layer["next"].fill_(context)
            else:
                layer = {k: t.expand(batch, *t.shape[1:]).contiguous() for k, t in row.items()}
                if "pos" in layer:  # sliding-window ring: the same keys, at positions up to `context`
                    shift = max(context - self.fill_len, 0)
                    layer["pos"] = torch.where(layer["pos"] >= 0, layer["pos"] + shift, layer["pos"])
                    layer["next"] = layer["next"] + shift
            state.append(layer)
        return state


def _sync_seconds(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.inference_mode()
def bench_decode(
    model,
    template: StateTemplate,
    batch: int,
    context: int,
    steps: int,
    bandwidth: float,
    mode: str,
    compile_mode: str | None,
    core: str = "sdpa",
) -> dict:
    """Greedy decode of `steps` tokens after `context` cached tokens. mode: graph (CUDA graphs) or eager;
    core: how attention reads its KV cache (tools.generate.StaticKVAttention)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    state = template.build(batch, context, steps + 1, seed=batch)
    traffic = state_traffic_per_seq(model, state, context, steps)
    gen = torch.Generator(device="cuda").manual_seed(batch)
    first = torch.randint(0, model.cfg.vocab_size, (batch,), device="cuda", generator=gen)
    with static_attention(model, state, context + steps + 1, core) as static_state:
        # no save/restore around the capture's warm-up: decode cost does not depend on the values, and a copy
        # of the whole state would not fit at the most sequences per GPU
        step = StaticStep(
            model,
            static_state,
            batch,
            use_graphs=mode == "graph",
            compile_mode=compile_mode,
            greedy=True,
            warm_up_restores=False,
        )
        setup = _sync_seconds(lambda: step(first))  # compiles and captures: not timed
        capture = 0.0

        def loop() -> None:
            nonlocal capture
            for _ in range(steps):
                if step.will_capture():  # a new attention bucket: keep the capture out of the time
                    capture += _sync_seconds(step)
                else:
                    step()

        seconds = _sync_seconds(loop) - capture
        graphs = len(step.graphs)
    floor_s = (weight_bytes_per_step(model) + batch * traffic) / bandwidth
    return {
        "batch": batch,
        "context": context,
        "steps": steps,
        "mode": mode,
        "compile": compile_mode,
        "attention_core": core if template.has_attention else None,
        "ms_per_step": 1e3 * seconds / steps,
        "tokens_per_second": batch * steps / seconds,
        "floor_ms_per_step": 1e3 * floor_s,
        "step_over_floor": seconds / steps / floor_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB,
        "state_gib": batch * template.bytes_per_seq(context, steps + 1) / GIB,
        "state_traffic_bytes_per_seq_step": traffic,
        "weight_bytes": weight_bytes_per_step(model),
        "setup_seconds": setup,
        "capture_seconds": capture,
        "graphs": graphs,
    }


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def fits(model, template: StateTemplate, batch: int, context: int, steps: int, core: str) -> tuple[bool, str]:
    """Allocate `batch` sequences at `context` and run one eager step: (True, "") or (False, why)."""
    torch.cuda.empty_cache()
    try:
        with torch.inference_mode():
            state = template.build(batch, context, steps + 1)
            with static_attention(model, state, context + steps + 1, core) as static_state:
                StaticStep(model, static_state, batch, use_graphs=False, greedy=True)()
            torch.cuda.synchronize()
        return True, ""
    except Exception as err:
        return False, ("OOM" if _is_oom(err) else f"{type(err).__name__}: {err}")[:300]
    finally:
        state = static_state = None  # noqa: F841
        torch.cuda.empty_cache()


def per_seq_bytes(
    template: StateTemplate, points: list[tuple[int, float]], context: int, steps: int
) -> float:
    """Memory per sequence: the resident state plus the step's activations per row, the slope of the grid's
    peak memory beyond the state over batch (0 when fewer than two batches were measured)."""
    state = template.bytes_per_seq(context, steps + 1)
    extra = [(b, peak * GIB - b * state) for b, peak in points]
    if len(extra) < 2:
        return float(state)
    (b0, m0), (b1, m1) = min(extra), max(extra)
    return state + max((m1 - m0) / (b1 - b0), 0.0)


def search_max(predicted: int, known_fit: int, tries: int, check) -> tuple[int, list[dict]]:
    """The largest batch that `check(batch) -> (fits, why)` accepts, starting at `predicted`: at most `tries`
    checks, bisecting between the largest batch known to fit and the smallest that ran out of memory (within
    1%). A failure other than out-of-memory ends the search. -> (largest batch seen to fit, the checks)."""
    lo, hi, checked = known_fit, None, []
    batch = predicted
    for _ in range(tries):
        if batch <= lo:
            break
        ok, why = check(batch)
        checked.append({"batch": batch, "fits": ok, **({} if ok else {"why": why})})
        if ok:
            lo = batch
            if hi is None or hi - lo <= max(1, lo // 100):  # the prediction held, or within 1% of the bound
                break
        elif why != "OOM":
            break
        else:
            hi = batch
        batch = (lo + hi) // 2
    return lo, checked


def max_sequences(
    model,
    template: StateTemplate,
    context: int,
    steps: int,
    points: list[tuple[int, float]],
    tries: int,
    core: str,
) -> dict:
    """The most sequences at `context` that fit on this GPU: predicted, then checked (and bisected on OOM)."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    per_seq = per_seq_bytes(template, points, context, steps)
    predicted = max(int((free - FIT_MARGIN_BYTES) / per_seq), 0)
    known_fit = max([b for b, _ in points], default=0)  # a batch the grid ran
    verified, checked = search_max(
        predicted, known_fit, tries, lambda batch: fits(model, template, batch, context, steps, core)
    )
    return {
        "context": context,
        "free_gib": free / GIB,
        "total_gib": total / GIB,
        "per_seq_mib": per_seq / 2**20,
        "predicted": predicted,
        "verified": verified,
        "checks": checked,
    }


@torch.inference_mode()
def bench_prefill(model, batch: int, seqlen: int, repeats: int = 3, graph: bool = False) -> dict:
    """Median seconds of `model.prefill` (logits + state) on batch x seqlen random tokens; with `graph`, the
    prefill is captured once as a CUDA graph over a static input and replayed (no per-kernel launch cost:
    at batch 1 the eager prefill is bound by the host's ~2,000 kernel launches)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seqlen), device="cuda")
    run = (lambda: model.prefill(ids)) if not graph else _prefill_graph(model, ids)
    times = []
    for i in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = run()
        end.record()
        torch.cuda.synchronize()
        del out
        if i >= 1:
            times.append(start.elapsed_time(end) / 1e3)
    seconds = statistics.median(times)
    return {
        "batch": batch,
        "seqlen": seqlen,
        "graph": graph,
        "seconds": seconds,
        "ms": 1e3 * seconds,
        "tokens_per_second": batch * seqlen / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB,
    }


def _prefill_graph(model, ids: torch.Tensor):
    """A replay function of `model.prefill(ids)` captured as one CUDA graph (after a warm-up run)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        model.prefill(ids)  # compiles and autotunes the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = model.prefill(ids)

    def replay():
        graph.replay()
        return outputs

    return replay


@torch.inference_mode()
def graph_check(model, mode: str, compile_mode: str | None, core: str = "sdpa", steps: int = 24) -> dict:
    """tools.generate with the benchmarked step (CUDA graphs, static buffers, compile) vs the eager step."""
    from tools.generate import generate

    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in (40, 17, 29, 8)]
    eager = generate(model, prompts, steps, keep_logits=True)
    fast = generate(
        model,
        prompts,
        steps,
        keep_logits=True,
        cuda_graph=mode == "graph",
        compile_mode=compile_mode,
        attention_core=core,
    )
    same = sum(
        a == b for ra, rb in zip(eager.tokens, fast.tokens, strict=True) for a, b in zip(ra, rb, strict=True)
    )
    first = (fast.logits[:, :2] - eager.logits[:, :2]).norm() / eager.logits[:, :2].norm()
    return {"tokens_equal_fraction": same / (len(prompts) * steps), "first_steps_rel_err": first.item(),
            **divergences(eager.tokens, fast.tokens, eager.logits, fast.logits)}


def divergences(eager_tokens: list[list[int]], fast_tokens: list[list[int]], eager_logits: torch.Tensor,
                fast_logits: torch.Tensor) -> dict:
    """Where each row's greedy tokens first differ, and whether an error of the usual size explains it.

    Up to a row's first difference both paths saw the same tokens, so those steps compare like for like: the
    largest logit difference over all of them is the paths' usual error. A first difference is a near-tie when
    eager's margin between its two best tokens there is below twice that usual error (rounding of differently
    fused sums can flip such a choice); a wrong step would instead show a margin the usual error cannot bridge.
    Steps after a difference see other contexts and are not compared.
    """
    firsts = [next((t for t, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
              for a, b in zip(eager_tokens, fast_tokens, strict=True)]
    usual = 0.0
    for row, first in enumerate(firsts):
        steps = len(eager_tokens[row]) if first is None else first
        if steps:
            diff = (fast_logits[row, :steps].float() - eager_logits[row, :steps].float()).abs().max().item()
            usual = max(usual, diff)
    rows = []
    for row, step in enumerate(firsts):
        if step is None:
            continue
        top2 = eager_logits[row, step].float().topk(2).values
        margin = (top2[0] - top2[1]).item()
        error = (fast_logits[row, step].float() - eager_logits[row, step].float()).abs().max().item()
        rows.append({"row": row, "step": step, "eager_margin": margin, "logit_max_diff": error,
                     "near_tie": margin < 2 * usual})
    return {"rows_equal": firsts.count(None), "usual_logit_diff": usual, "first_divergences": rows,
            "all_divergences_near_ties": all(r["near_tie"] for r in rows)}


PROBE = """
import sys
sys.path.insert(0, {root!r})
from bench.generation import probe_kernels
probe_kernels({shapes!r})
"""


def probe_kernels(shapes=((1, 4096), (8, 4096))) -> dict:
    """{mixer section: "triton" or "reference"}: each Triton kernel at the prefill shapes vs its reference.

    Runs in a child process (see `kernel_backends`): a kernel that faults leaves the CUDA context unusable.
    """
    from based_layers.mixers import MIXER_CLASSES

    choice = probe_decode_attention()
    print("PROBE" + json.dumps(choice), flush=True)
    cfg = model_config("based_1b_10b", "triton")
    for section in ("base_conv", "sliding_window", "linear_attn"):
        torch.manual_seed(0)
        with torch.device("cuda"):
            mixer = MIXER_CLASSES[section](cfg.d_model, getattr(cfg, section)).to(torch.bfloat16)
        err = 0.0
        for batch, seqlen in shapes:
            x = torch.randn(batch, seqlen, cfg.d_model, device="cuda", dtype=torch.bfloat16)
            with torch.inference_mode():
                mixer.backend = "triton"
                fast, _ = mixer(x, return_state=True)
                mixer.backend = "reference"
                ref, _ = mixer(x, return_state=True)
                torch.cuda.synchronize()
            err = max(err, ((fast.float() - ref.float()).norm() / ref.float().norm()).item())
        choice[section] = "triton" if err < 2e-2 else "reference"
        choice[f"{section}_rel_err"] = err
        print("PROBE" + json.dumps({section: choice[section], f"{section}_rel_err": err}), flush=True)
    return choice


def probe_decode_attention(batch: int = 8, context: int = 4100, heads: int = 24, dim: int = 70) -> dict:
    """{"decode_attention": "triton" or "sdpa"}: the split-K kernel at Transformer++'s decode shapes (the static
    cache's padded head dim 72, a bucketed limit with invalid slots past the context) vs its reference."""
    from kernels.decode_attention import decode_attention

    capacity = -(-(context + 1) // ATTENTION_BUCKET) * ATTENTION_BUCKET
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, capacity, heads, 72, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    valid = torch.zeros(batch, capacity, dtype=torch.bool, device="cuda")
    valid[:, :context] = True
    fast = decode_attention(q, k, v, valid, capacity, dim**-0.5, backend="triton").float()
    ref = decode_attention(q, k, v, valid, capacity, dim**-0.5, backend="reference").float()
    err = ((fast - ref).norm() / ref.norm()).item()
    return {"decode_attention": "triton" if err < 2e-2 else "sdpa", "decode_attention_rel_err": err}


def kernel_backends(shapes) -> dict:
    """Probe the Triton kernels in a child process; a kernel that failed or was not reached is not used."""
    choice = {
        "base_conv": "reference",
        "linear_attn": "reference",
        "sliding_window": "reference",
        "decode_attention": "sdpa",
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-c", PROBE.format(root=str(ROOT), shapes=tuple(shapes))],
            capture_output=True,
            text=True,
            timeout=150,
        )
        for line in proc.stdout.splitlines():
            if line.startswith("PROBE"):
                choice.update(json.loads(line[5:]))
        if proc.returncode != 0:
            choice["error"] = proc.stderr.strip().splitlines()[-1][:400] if proc.stderr.strip() else "crashed"
    except subprocess.TimeoutExpired:
        choice["error"] = "probe timed out"
    return choice


def set_backends(model, backends: dict) -> None:
    """Switch Based's mixers between Triton and reference (they read `backend` at call time)."""
    from based_layers.mixers import BaseConv, LinearAttention, SlidingWindowAttention

    sections = {
        BaseConv: "base_conv",
        LinearAttention: "linear_attn",
        SlidingWindowAttention: "sliding_window",
    }
    for block in model.transformer.layers.values():
        section = sections.get(type(block.mixer))
        if section is not None:
            block.mixer.backend = backends.get(section, "reference")


class Recorder:
    """Results as nested dicts, written to `path` after every measurement; errors recorded, never raised.

    `deadline` (perf_counter seconds): measurements asked for after it are skipped with a note, so that the
    run ends in its time budget with every earlier result kept.
    """

    def __init__(self, path: Path, results: dict, deadline: float = float("inf")) -> None:
        self.path, self.results, self.deadline = path, results, deadline
        path.parent.mkdir(parents=True, exist_ok=True)

    def out_of_time(self, where: dict, key: str) -> bool:
        if time.perf_counter() <= self.deadline:
            return False
        where[key] = {"skipped": "time budget (--budget-s) spent"}
        print(f"  {key}: skipped (time budget)", flush=True)
        self.save()
        return True

    def save(self) -> None:
        self.path.write_text(json.dumps(self.results, indent=1, default=float) + "\n")

    def guard(self, where: dict, key: str, fn, *args) -> dict:
        if self.out_of_time(where, key):
            return where[key]
        start = time.perf_counter()
        try:
            where[key] = fn(*args)
            print(f"  {key}: {json.dumps(where[key], default=float)[:240]}", flush=True)
        except Exception as err:  # keep the other measurements
            where[key] = {"error": f"{type(err).__name__}: {err}"[:800], "oom": _is_oom(err)}
            print(f"  {key}: ERROR {where[key]['error'][:300]}", flush=True)
            torch.cuda.empty_cache()
        where[key]["wall_seconds"] = time.perf_counter() - start
        self.save()
        return where[key]


def _fits_prediction(template: StateTemplate, batch: int, context: int, steps: int) -> tuple[bool, str]:
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    need = batch * template.bytes_per_seq(context, steps + 1) + FIT_MARGIN_BYTES
    if need <= free:
        return True, ""
    return (
        False,
        f"does not fit: state {need / GIB - FIT_MARGIN_BYTES / GIB:.1f} GiB + margin > {free / GIB:.1f} GiB free",
    )


def decode_grid(rec: Recorder, name: str, model, template: StateTemplate, args, bandwidth: float) -> None:
    """Every context x batch for one model; the step mode falls back (compiled -> graph -> eager) on errors."""
    entry = rec.results[name]
    mode = "eager" if args.step == "eager" else "graph"
    compile_mode = args.compile_mode if args.step == "compiled" else None
    core = args.attention_core
    for context in args.contexts:
        for batch in args.batches:
            key = f"decode_c{context}_b{batch}"
            if rec.out_of_time(entry, key):
                continue
            ok, why = _fits_prediction(template, batch, context, args.steps)
            if not ok:
                entry[key] = {"skipped": why, "batch": batch, "context": context}
                print(f"  {key}: skipped ({why})", flush=True)
                rec.save()
                continue
            run = (model, template, batch, context, args.steps, bandwidth)
            result = rec.guard(entry, key, bench_decode, *run, mode, compile_mode, core)
            while "error" in result and not result["oom"] and (compile_mode is not None or mode == "graph"):
                failed = f"{mode}{'+compile ' + compile_mode if compile_mode else ''}"
                if compile_mode is not None:
                    compile_mode = None  # keep the eager kernels inside the graph for the rest of this model
                else:
                    mode = "eager"
                entry.setdefault("fallbacks", []).append(
                    {"at": key, "failed": failed, "error": result["error"]}
                )
                result = rec.guard(entry, key, bench_decode, *run, mode, compile_mode, core)
    entry["step_mode"] = {"mode": mode, "compile": compile_mode, "core": core}
    if template.has_attention and core != "sdpa":
        attention_ab(rec, name, model, template, args, bandwidth)


def attention_ab(rec: Recorder, name: str, model, template: StateTemplate, args, bandwidth: float) -> None:
    """The same decode with torch SDPA reading the cache, at the largest measured batch of the shortest and
    the longest cache length: what the split-K kernel changes."""
    entry, mode = rec.results[name], rec.results[name]["step_mode"]
    measured = _decode(rec.results, name)
    for context in sorted({min(args.contexts), max(args.contexts)}):
        batches = [b for (c, b), e in measured.items() if c == context and "tokens_per_second" in e]
        if batches:
            run = (model, template, max(batches), context, args.steps, bandwidth)
            rec.guard(
                entry,
                f"sdpa_c{context}_b{max(batches)}",
                bench_decode,
                *run,
                mode["mode"],
                mode["compile"],
                "sdpa",
            )


def fit_table(rec: Recorder, name: str, model, template: StateTemplate, args) -> None:
    entry = rec.results[name]
    constant = not any(isinstance(b.mixer, CausalSelfAttention) for b in template.blocks)
    for context in args.contexts[:1] if constant else args.contexts:
        points = [
            (r["batch"], r["peak_memory_gib"])
            for k, r in entry.items()
            if k.startswith(f"decode_c{context}_b") and "peak_memory_gib" in r
        ]
        result = rec.guard(
            entry,
            f"max_sequences_c{context}",
            max_sequences,
            model,
            template,
            context,
            args.steps,
            points,
            args.fit_tries,
            entry["step_mode"]["core"],
        )
        if constant:
            result["same_at_every_context"] = "constant-size state: the same count at every cache length"
            rec.save()
        grid_max = max([b for b, _ in points], default=0)
        if result.get("verified", 0) > grid_max:  # the throughput of a full GPU at this cache length
            mode, steps = entry["step_mode"], min(args.steps, 16)
            run = (
                model,
                template,
                result["verified"],
                context,
                steps,
                rec.results["copy_bandwidth_bytes_per_s"],
            )
            rec.guard(
                entry,
                f"decode_max_c{context}",
                bench_decode,
                *run,
                mode["mode"],
                mode["compile"],
                mode["core"],
            )


def bench_model(
    rec: Recorder, name: str, args, backends: dict, bandwidth: float, model_end: float, phase: str
) -> None:
    """phase "grid": prefill, the decode grid and the graph check of one model; phase "fit": the most sequences
    per GPU and the decode at that batch. Both by `model_end`."""
    results = rec.results
    model = make_model(CONFIGS[name], "reference", mamba_backend=results["mamba_backend"])
    set_backends(model, backends)
    entry = results.setdefault(name, {})
    entry.update(parameters=model.num_parameters(), weight_bytes_per_step=weight_bytes_per_step(model))
    print(f"{name} ({phase}): {entry['parameters']:,} parameters", flush=True)
    rec.deadline = model_end
    if phase == "grid" and name in (
        "based",
        "attn",
    ):  # Mamba's prefill: issue 13's selective_scan_fn, not here
        for batch in args.prefill_batches:
            rec.guard(entry, f"prefill_b{batch}", bench_prefill, model, batch, args.prefill_len)
            rec.guard(
                entry, f"prefill_graph_b{batch}", bench_prefill, model, batch, args.prefill_len, 3, True
            )
    template = StateTemplate(model, args.fill_len)
    if phase == "grid":
        # keep time for the graph check
        rec.deadline = model_end - (0 if args.no_graph_check else GRAPH_CHECK_RESERVE_S)
        decode_grid(rec, name, model, template, args, bandwidth)
        rec.deadline = model_end
        mode = entry["step_mode"]
        if not args.no_graph_check:
            rec.guard(entry, "graph_check", graph_check, model, mode["mode"], mode["compile"], mode["core"])
    else:
        fit_table(rec, name, model, template, args)


def run(args) -> dict:
    end = time.perf_counter() + args.budget_s - 20  # the summary and the last save after the models
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
        "git": _git_rev(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    rec = Recorder(args.out, results)
    results["copy_bandwidth_bytes_per_s"] = bandwidth = copy_bandwidth()
    print(f"device {results['device']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    backends = {}
    if "based" in args.models or "attn" in args.models:
        results["kernel_backends"] = backends = kernel_backends(
            [(b, args.prefill_len) for b in args.prefill_batches]
        )
        print(f"kernel probe: {backends}", flush=True)
    args.attention_core = (
        backends.get("decode_attention", "sdpa") if args.attn_core == "auto" else args.attn_core
    )
    results["attention_core"] = args.attention_core
    mamba_error = mamba_ssm_error() if "mamba" in args.models else None
    results["mamba_backend"] = "reference" if mamba_error else "mamba_ssm"
    if mamba_error:
        results["mamba_ssm_error"] = mamba_error
    # the grids of every model first: the "most sequences" checks allocate nearly the whole GPU, and a kernel
    # that faults at such a batch leaves the CUDA context unusable for whatever runs after it
    grid_end = time.perf_counter() + FIT_PHASE_SHARE_GRID * (end - time.perf_counter())
    phases = (("grid", end),) if args.no_fit else (("grid", grid_end), ("fit", end))
    for phase, phase_end in phases:
        for i, name in enumerate(args.models):
            start = time.perf_counter()
            model_end = start + (phase_end - start) / (len(args.models) - i)  # an equal share of what is left
            try:
                bench_model(rec, name, args, backends, bandwidth, model_end, phase)
            except Exception as err:  # building the model or its state failed: keep the other models
                results.setdefault(name, {})[f"{phase}_error"] = f"{type(err).__name__}: {err}"[:800]
                print(f"{name}: ERROR {results[name][f'{phase}_error']}", flush=True)
            results[name][f"{phase}_wall_seconds"] = time.perf_counter() - start
            torch.cuda.empty_cache()
    rec.deadline = float("inf")
    results["claim_24x"] = claim_24x(results)
    rec.save()
    return results


def _git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def _decode(results: dict, name: str) -> dict[tuple[int, int], dict]:
    """{(context, batch): decode entry} of one model."""
    out = {}
    for key, entry in results.get(name, {}).items():
        if key.startswith("decode_c") and isinstance(entry, dict):
            context, batch = key[len("decode_c") :].split("_b")
            out[(int(context), int(batch))] = entry
    return out


def _per_gpu(results: dict, name: str, context: int) -> tuple[float, int]:
    """(best tokens/s, its batch) of a model at a cache length: the grid's batches and the most sequences that
    fit (measured once for a constant-size state, then valid at every cache length)."""
    entries = [e for (c, _), e in _decode(results, name).items() if c == context]
    for key, e in results.get(name, {}).items():
        if key.startswith("decode_max_c") and (
            e.get("context") == context
            or "same_at_every_context" in results[name].get(key.replace("decode_max", "max_sequences"), {})
        ):
            entries.append(e)
    scored = [(e["tokens_per_second"], e["batch"]) for e in entries if "tokens_per_second" in e]
    return max(scored, default=(0.0, 0))


def claim_24x(results: dict) -> dict:
    """Where Based's decode tokens/s reaches 24x Transformer++'s: at the same batch, and per GPU (each model at
    its best batch at that cache length, the most sequences that fit included); else the largest ratios and why
    not."""
    based, attn = _decode(results, "based"), _decode(results, "attn")
    same, best = [], []
    for (context, batch), b in sorted(based.items()):
        a = attn.get((context, batch), {})
        if "tokens_per_second" in b and "tokens_per_second" in a:
            same.append(
                {
                    "context": context,
                    "batch": batch,
                    "ratio": b["tokens_per_second"] / a["tokens_per_second"],
                    "floor_ratio": a["floor_ms_per_step"] / b["floor_ms_per_step"],
                }
            )
    for context in sorted({c for c, _ in based}):
        (vb, bb), (va, ba) = _per_gpu(results, "based", context), _per_gpu(results, "attn", context)
        if vb and va:
            best.append({"context": context, "based_batch": bb, "attn_batch": ba, "ratio": vb / va})
    reached = [r for r in same if r["ratio"] >= 24]
    out = {"same_batch": same, "best_batch": best}
    if reached:
        r = min(reached, key=lambda r: (r["context"], r["batch"]))
        out["answer"] = f"24x reached at cache {r['context']}, batch {r['batch']} ({r['ratio']:.1f}x)"
    elif same:
        r = max(same, key=lambda r: r["ratio"])
        too_big = [
            k[len("decode_") :]
            for k, e in results.get("attn", {}).items()
            if k.startswith("decode_c") and str(e.get("skipped", "")).startswith("does not fit")
        ]
        out["answer"] = (
            f"24x not reached at the same batch: at most {r['ratio']:.1f}x (cache {r['context']}, batch "
            f"{r['batch']}; the floors differ by {r['floor_ratio']:.1f}x there). Transformer++ "
            f"cells that do not fit: {', '.join(too_big) or 'none'}"
        )
    else:
        out["answer"] = "no Based/Transformer++ pair measured"
    per_gpu = [b for b in best if b["ratio"] >= 24]
    if per_gpu:
        b = min(per_gpu, key=lambda b: b["context"])
        out["answer"] += (
            f"; per GPU (each at its best batch) 24x is reached at cache {b['context']}: Based batch "
            f"{b['based_batch']} vs Transformer++ batch {b['attn_batch']} ({b['ratio']:.1f}x)"
        )
    elif best:
        b = max(best, key=lambda b: b["ratio"])
        out["answer"] += f"; per GPU at most {b['ratio']:.1f}x (cache {b['context']})"
    return out


def _cell(entry: dict | None) -> str:
    if not entry:
        return "-"
    if "skipped" in entry:
        return "does not fit" if str(entry["skipped"]).startswith("does not fit") else "skipped (time budget)"
    if "error" in entry:
        return "OOM" if entry.get("oom") else "error: " + entry["error"][:40]
    return (
        f"{entry['tokens_per_second']:,.0f} tok/s, {entry['ms_per_step']:.2f} ms "
        f"({entry['step_over_floor']:.2f}x floor {entry['floor_ms_per_step']:.2f}), {entry['peak_memory_gib']:.1f} GiB"
    )


def table(results: dict) -> str:
    """A short Markdown summary: the decode grid, the most sequences per GPU, prefill, the 24x answer."""
    names = [n for n in CONFIGS if n in results]
    rows = [
        "| cache | batch | " + " | ".join(LABELS[n] for n in names) + " | Based / Transformer++ |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    grids = {n: _decode(results, n) for n in names}
    for context, batch in sorted({cb for g in grids.values() for cb in g}):
        b, a = (grids.get(n, {}).get((context, batch), {}) for n in ("based", "attn"))
        ratio = (
            f"{b['tokens_per_second'] / a['tokens_per_second']:.2f}x"
            if "tokens_per_second" in b and "tokens_per_second" in a
            else "-"
        )
        rows.append(
            f"| {context} | {batch} | "
            + " | ".join(_cell(grids[n].get((context, batch))) for n in names)
            + f" | {ratio} |"
        )
    rows += [
        "",
        "| most sequences on one GPU | cache | predicted | verified | MiB per sequence | decode at that batch |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        for key, e in results[n].items():
            if key.startswith("max_sequences_c") and "verified" in e:
                note = " (every cache length)" if "same_at_every_context" in e else ""
                full = results[n].get(key.replace("max_sequences", "decode_max"), {})
                speed = f" | {_cell(full)}" if full else " | -"
                rows.append(
                    f"| {LABELS[n]} | {e['context']}{note} | {e['predicted']:,} | {e['verified']:,} | "
                    f"{e['per_seq_mib']:.1f}{speed} |"
                )
    rows.append("")
    for key in sorted(k for k in results.get("based", {}) if k.startswith("prefill_")):
        b, a = results["based"][key], results.get("attn", {}).get(key, {})
        ratio = f"{a['seconds'] / b['seconds']:.2f}x faster" if "seconds" in b and "seconds" in a else "-"
        label = key[len("prefill_") :].replace("graph_b", "b").lstrip("b")
        graphed = " (CUDA graph)" if "graph" in key else ""
        rows.append(
            f"prefill{graphed} batch {label} x {results['args']['prefill_len']}: Based "
            f"{b.get('ms', float('nan')):.1f} ms, Transformer++ {a.get('ms', float('nan')):.1f} ms ({ratio})"
        )
    for key, sdpa in sorted(results.get("attn", {}).items()):
        if key.startswith("sdpa_c") and "ms_per_step" in sdpa:
            split = results["attn"].get(f"decode_c{sdpa['context']}_b{sdpa['batch']}", {})
            rows.append(
                f"Transformer++ cache {sdpa['context']} batch {sdpa['batch']}: split-K kernel "
                f"{split.get('ms_per_step', float('nan')):.2f} ms/step, SDPA {sdpa['ms_per_step']:.2f} ms/step"
            )
    for n in names:
        check = results[n].get("graph_check", {})
        if "tokens_equal_fraction" in check:
            ties = "" if "rows_equal" not in check else (
                f"; rows equal {check['rows_equal']}, first differences "
                f"{'all near-ties' if check['all_divergences_near_ties'] else 'NOT all near-ties'}")
            rows.append(f"{LABELS[n]} graph check: greedy tokens equal {check['tokens_equal_fraction']:.3f}{ties}")
    if "claim_24x" in results:
        rows.append(f"24x: {results['claim_24x']['answer']}")
    return "\n".join(rows)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="based,attn,mamba")
    parser.add_argument(
        "--contexts",
        default="1024,16384,32768,4096",
        help="cache lengths at the first timed step, in the order they are measured (a run cut short by "
        "--budget-s keeps the first ones)",
    )
    parser.add_argument("--batches", default="1,16,64,128")
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per combination")
    parser.add_argument(
        "--fill-len", type=int, default=256, help="real prefill tokens of Based's/Mamba's state"
    )
    parser.add_argument(
        "--step",
        default="compiled",
        choices=["compiled", "graph", "eager"],
        help="compiled: torch.compile'd blocks in a CUDA graph; graph: eager kernels in a CUDA "
        "graph (the earlier step); eager: no graph",
    )
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of --step compiled")
    parser.add_argument(
        "--attn-core",
        default="sdpa",
        choices=["auto", "triton", "sdpa"],
        help="Transformer++'s attention over the KV cache: torch SDPA (default: on the H200, 2026-12-01, "
        "4.7 vs 8.5 ms/step at batch 16 / 1k cache and 29 vs 87 ms at 16k for the split-K kernel), the "
        "split-K Triton kernel, or auto (the kernel when it passes the probe)",
    )
    parser.add_argument(
        "--linears",
        default="gated",
        choices=tools_generate.LINEAR_CHOICES,
        help="the decode step's Linear layers: decode_linear at the shapes kernels/tiles.py lists, each "
        "linear-attention layer's q, k, v as one product, each block's last residual add deferred into the "
        "next fused add + RMSNorm, and fc1 and the SwiGLU gate as one kernel (gated, the default); the same "
        "without the fused gate (fused); without the deferred adds either (table); decode_linear alone "
        "(unfused); or cuBLAS everywhere",
    )
    parser.add_argument(
        "--pdl",
        default="on",
        help="programmatic dependent launch of our decode kernels (kernels/_pdl.py): the default groups (on: "
        "the products and the fused norm), every group (all), the default groups with the products' L2 "
        "prefetch of their first weight tiles before the wait (prefetch), none (off), or a comma list of "
        "kernels._pdl.GROUPS; sets BASED_PDL and BASED_PDL_PREFETCH for the run",
    )
    parser.add_argument("--fit-tries", type=int, default=5, help="allocations per 'most sequences' check")
    parser.add_argument("--no-fit", action="store_true", help="no 'most sequences' phase: the grids get the budget")
    parser.add_argument("--no-graph-check", action="store_true", help="no greedy-token check of the graph step")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420,
        help="wall-clock budget: each model gets an equal share of what is left; measurements "
        "past it are skipped with a note",
    )
    parser.add_argument("--prefill-len", type=int, default=4096)
    parser.add_argument("--prefill-batches", default="1,8")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="batches 1,16 at caches 1024,16384, 32 steps, 2 fit tries, prefill batch 1",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "generation.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.contexts, args.steps, args.fit_tries, args.prefill_batches = (
            "1,16",
            "1024,16384",
            32,
            2,
            "1",
        )
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in CONFIGS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(CONFIGS)}")
    args.batches, args.contexts, args.prefill_batches = (
        _ints(args.batches),
        _ints(args.contexts),
        _ints(args.prefill_batches),
    )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/generation.py needs a CUDA GPU", file=sys.stderr)
        return 1
    tools_generate.set_linears(args.linears)  # every StaticStep of the run: grid, graph check, fit
    forms = {"on": DEFAULT_PDL_GROUPS, "prefetch": DEFAULT_PDL_GROUPS, "all": "1", "off": "0"}
    os.environ["BASED_PDL"] = forms.get(args.pdl, args.pdl)
    os.environ["BASED_PDL_PREFETCH"] = "1" if args.pdl == "prefetch" else "0"
    start = time.perf_counter()
    results = run(args)
    results["pdl"] = args.pdl
    results["wall_seconds"] = time.perf_counter() - start
    args.out.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(table(results))
    print(f"[bench/generation.py: {results['wall_seconds']:.0f} s; results in {args.out}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
