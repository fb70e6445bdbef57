"""Shared pieces of the parallelism tests: tiny models, fixed batches, the single-process reference, launching.

Workers (tests/parallel/worker.py) run under torchrun with gloo on CPU; they compare every rank's loss and
gradients with a single-process run of the same model on the same global batch, and write what they measured
to a JSON file that the pytest side checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from based_layers.config import (
    AttentionConfig,
    BaseConvConfig,
    LinearAttnConfig,
    MambaConfig,
    ModelConfig,
    SlidingWindowConfig,
)
from pretrain.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN = 16
MICRO_BATCH = 2
ACCUM = 2

def device() -> torch.device:
    """CPU (gloo), or this rank's GPU when PARALLEL_TEST_DEVICE=cuda (NCCL, bf16: test_parallel_gpu.py)."""
    if os.environ.get("PARALLEL_TEST_DEVICE", "cpu") == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def autocast():
    """bf16 autocast on GPU (as the trainer does), nothing on CPU."""
    if device().type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# float32 tolerance of a parallel run against one process: a different summation order only
LOSS_RTOL = 1e-6
GRAD_RTOL = 2e-6  # of the largest |gradient| of the parameter, plus GRAD_ATOL
GRAD_ATOL = 1e-8
TIED_EMBEDDING = "transformer.embeddings.word_embeddings.weight"


def model_config(family: str) -> ModelConfig:
    """Tiny Based (conv, LA, SWA, conv), Transformer++ and Mamba models with 4 layers and 4 heads."""
    common = dict(d_model=32, n_layer=4, vocab_size=60, pad_vocab_size_multiple=8)
    if family == "based":
        return ModelConfig(family="based", default_mixer="base_conv", mlp_hidden=48,
                           mixer_layers={"linear_attn": [1], "sliding_window": [2]},
                           base_conv=BaseConvConfig(expand=4, kernel_size=3),
                           linear_attn=LinearAttnConfig(num_heads=4, feature_dim=4),
                           sliding_window=SlidingWindowConfig(num_heads=4, window=5), **common)
    if family == "attn":
        return ModelConfig(family="attn", default_mixer="attention", mlp_hidden=48,
                           attention=AttentionConfig(num_heads=4, rotary_fraction=0.5), **common)
    if family == "mamba":
        return ModelConfig(family="mamba", default_mixer="mamba", mlp_hidden=0, init_scheme="mamba_ssm",
                           mamba=MambaConfig(d_state=4, d_conv=4, expand=2, bias=True), **common)
    raise ValueError(family)


def train_config(family: str, dp: int = 1, tp: int = 1, pp: int = 1, schedule: str = "1f1b", virtual: int = 1,
                 fsdp: bool = False, activation_checkpoint: bool = False, accum: int = ACCUM) -> TrainConfig:
    """fp32 on CPU; `accum` micro-batches of MICRO_BATCH rows per data-parallel rank and step."""
    gpu = device().type == "cuda"
    cfg = TrainConfig(device="cuda" if gpu else "cpu", precision="bf16" if gpu else "fp32", model=model_config(family))
    cfg.data.seq_len, cfg.data.micro_batch_size = SEQ_LEN, MICRO_BATCH
    cfg.data.global_batch_size = MICRO_BATCH * accum * dp
    cfg.data.reset_state_at_doc_boundaries = True
    par = cfg.parallel
    par.dp, par.tp, par.pp, par.pp_schedule, par.virtual_stages, par.fsdp = dp, tp, pp, schedule, virtual, fsdp
    par.activation_checkpoint = activation_checkpoint
    # the layout comparisons run eager on GPU too (parallel.compile=auto would compile there);
    # tests/parallel/test_compile.py covers compiled runs
    par.compile = "false"
    cfg.optim.lr = 1e-2
    return cfg


def global_batches(vocab: int, n_micro: int, step: int = 0) -> list[dict[str, torch.Tensor]]:
    """The `n_micro` micro-batches of step `step`'s global batch, in the loader's order."""
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(n_micro):
        ids = torch.randint(0, vocab, (MICRO_BATCH, SEQ_LEN + 1), generator=gen)
        # packed documents: 1-3 boundaries per row
        starts = torch.rand(MICRO_BATCH, SEQ_LEN, generator=gen) < 0.15
        starts[:, 0] = True
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_ids": starts.long().cumsum(1).int()})
    return out


def rank_batches(batches: list[dict], dp_rank: int, dp: int) -> list[dict]:
    """The micro-batches data-parallel rank `dp_rank` reads (rows [r*G/R, (r+1)*G/R) of the global batch)."""
    per_rank = len(batches) // dp
    return [{k: v.to(device()) for k, v in b.items()} for b in batches[dp_rank * per_rank:(dp_rank + 1) * per_rank]]


def canonical_name(name: str) -> str:
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def full_grads(module: torch.nn.Module, fused_rows: dict) -> dict[str, torch.Tensor]:
    """{parameter name: whole gradient in the published layout} of this rank's parameters."""
    from torch.distributed.tensor import DTensor

    from pretrain.tensor_parallel import tensor_parallel_order

    out = {}
    for name, p in module.named_parameters():
        name = canonical_name(name)
        if p.grad is None:
            continue
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        if name in fused_rows:
            order = tensor_parallel_order(g.shape[0], *fused_rows[name]).to(g.device)
            published = torch.empty_like(g)
            published[order] = g
            g = published
        out[name] = g.detach().clone()
    return out


def n_micro(cfg: TrainConfig) -> int:
    """Micro-batches in one global batch."""
    return cfg.data.global_batch_size // cfg.data.micro_batch_size


def reference(cfg: TrainConfig, steps: int) -> tuple[list[float], list[float], dict]:
    """Single-process losses and grad norms of `steps` steps, and the gradients of the first step."""
    from based_layers import build_model
    from pretrain.optim import build_optimizer
    from pretrain.parallelize import Layout, ParallelModel

    torch.manual_seed(cfg.seed)
    model = ParallelModel(build_model(cfg.model).to(device()), Layout(1, 1, 1, 1, False, None), device())
    opt = build_optimizer(model.module, cfg.optim, device())
    losses, norms, grads = [], [], {}
    for step in range(steps):
        batches = rank_batches(global_batches(cfg.model.padded_vocab_size, n_micro(cfg), step), 0, 1)
        losses.append(float(model.forward_backward(batches, autocast=autocast)))
        norms.append(model.clip_grad_norm_(cfg.optim.grad_clip))
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, norms, grads


def grad_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, float, str]:
    """(largest |g - g_ref| / (GRAD_RTOL * max|g_ref| + GRAD_ATOL): <= 1 passes, where, largest |g - g_ref|,
    largest |g - g_ref| / max|g_ref|)."""
    worst, where, worst_abs, worst_rel = 0.0, "", 0.0, 0.0
    for name, g in got.items():
        # a tied head's gradient is the embedding's (one parameter in the reference)
        r = ref[name] if name in ref else ref[TIED_EMBEDDING]
        diff = float((g - r).abs().max())
        err = diff / (GRAD_RTOL * float(r.abs().max()) + GRAD_ATOL)
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(float(r.abs().max()), GRAD_ATOL))
        if err > worst:
            worst, where = err, name
    return worst, where, worst_abs, worst_rel


def launch(scenario: str, nproc: int, out: Path, *args: str, timeout: int = 240) -> dict:
    """Run tests.parallel.worker under torchrun with `nproc` gloo processes; returns rank 0's JSON report."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "tests.parallel.worker", scenario, str(out), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{scenario} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def build(cfg: TrainConfig, seed: int | None = None):
    """(ParallelModel, AdamW) for `cfg` on the current process group (or on one process without one)."""
    import torch.distributed as dist

    from based_layers import build_model
    from pretrain.config import derive
    from pretrain.distributed import DistInfo
    from pretrain.optim import build_optimizer
    from pretrain.parallelize import parallelize, unwrap

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(cfg.seed if seed is None else seed)
    info = DistInfo(rank=rank, world_size=world, local_rank=device().index or 0, device=device())
    model = parallelize(build_model(cfg.model).to(device()), cfg, derive(cfg, world), info)
    return model, build_optimizer(unwrap(model), cfg.optim, device())


def train_steps(model, opt, cfg: TrainConfig, steps: range, checkpointer=None, save_after: tuple = (),
                async_save: bool = False) -> list[float]:
    """Train `steps` (global-batch indices) at a constant learning rate; the mean loss of each step.

    With `checkpointer`, a checkpoint is written after each step in `save_after` (named by the next step).
    """
    from pretrain.config import to_yaml
    from pretrain.distributed import all_reduce_mean
    from pretrain.parallelize import unwrap

    losses = []
    for step in steps:
        batches = global_batches(cfg.model.padded_vocab_size, n_micro(cfg), step)
        loss = model.forward_backward(rank_batches(batches, model.dp_rank, model.layout.dp), autocast=autocast)
        losses.append(float(all_reduce_mean(loss)))
        model.clip_grad_norm_(cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in save_after:
            checkpointer.save(step + 1, unwrap(model), opt, {"step": step + 1, "tokens_seen": 0}, to_yaml(cfg),
                              async_save=async_save)
    return losses
