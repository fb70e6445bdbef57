"""Apply parallelism to a built model (based_layers stays free of distributed code).

One device mesh `(pp, dp, tp)` over all processes (tensor parallel innermost, so a tensor-parallel group is a
run of neighbouring ranks, i.e. GPUs of one node). In this order:
1. pipeline: the layer stack is cut into `pp * virtual_stages` stages (pretrain/pipeline.py);
2. tensor + sequence parallelism on each stage (pretrain/tensor_parallel.py);
3. activation checkpointing and torch.compile per block (`parallel.compile`: auto = on for CUDA runs, see
   `compile_decision`);
4. data parallelism with FSDP2: `fsdp: true` shards parameters, gradients and optimizer state over `dp`;
   `fsdp: false` replicates (all-reduce of gradients). With `precision: bf16` on GPU, parameters are gathered
   in bf16 and gradients reduced in fp32.
`parallelize` returns a `ParallelModel`: the trainer's handle for the forward/backward of a step (the pipeline
schedule, the vocab-parallel loss), gradient clipping over the whole model, and the data-parallel rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn import functional as F

from based_layers.model import LanguageModel
from pretrain.config import ConfigError, Derived, TrainConfig
from pretrain.distributed import DistInfo
from pretrain.pipeline import (
    MULTI_STAGE_SCHEDULES,
    SINGLE_STAGE_SCHEDULES,
    build_schedule,
    cut_model,
    join_parts,
    local_stage_ids,
    stage_layer_ids,
    stage_sizes,
)
from pretrain.tensor_parallel import FUSED_ROWS_ATTR, apply_tensor_parallel

Batch = dict[str, torch.Tensor]


def _divides(problems: list[str], what: str, value: int, tp: int, fix: str) -> None:
    if value % tp:
        problems.append(f"parallel.tp={tp} does not divide {what} ({value}); {fix}")


def layout_problems(cfg: TrainConfig, world_size: int, grad_accum: int | None = None) -> list[str]:
    """Everything wrong with `cfg.parallel` for this model and world size, each line saying what to change."""
    par, model = cfg.parallel, cfg.model
    problems: list[str] = []
    for key in ("dp", "tp", "pp", "virtual_stages"):
        value = getattr(par, key)
        if value < 1 and not (key == "dp" and value == -1):
            problems.append(f"parallel.{key}={value}: expected a positive number" + (" (or -1: infer)" if key == "dp" else ""))
    if problems:
        return problems
    dp = world_size // (par.tp * par.pp) if par.dp == -1 else par.dp
    if dp * par.tp * par.pp != world_size:
        problems.append(f"parallel: dp*tp*pp = {dp}*{par.tp}*{par.pp} = {dp * par.tp * par.pp} processes, but the "
                        f"world size is {world_size}; launch {dp * par.tp * par.pp} processes or change "
                        "parallel.dp/tp/pp (parallel.dp=-1 infers dp)")
    used = set(model.layer_mixers())
    tp = par.tp
    if tp > 1:
        for mixer in ("linear_attn", "sliding_window", "attention"):
            if mixer in used:
                heads = getattr(model, mixer).num_heads
                _divides(problems, f"model.{mixer}.num_heads", heads, tp, "choose a tp that divides the number of heads")
        if "base_conv" in used:
            _divides(problems, "the BaseConv channels (model.base_conv.expand * d_model / 2)",
                     model.base_conv.expand * model.d_model // 2, tp, "choose a tp that divides them")
        if "mamba" in used:
            _divides(problems, "the Mamba channels (model.mamba.expand * d_model)", model.mamba.expand * model.d_model,
                     tp, "choose a tp that divides them")
            if model.mamba.backend == "mamba_ssm":
                problems.append("model.mamba.backend=mamba_ssm fuses x_proj with the scan and cannot run tensor-parallel; "
                                "use model.mamba.backend=reference with parallel.tp > 1, or parallel.tp=1")
        if model.mlp_hidden:
            _divides(problems, "model.mlp_hidden", model.mlp_hidden, tp, "choose a tp that divides it")
        _divides(problems, "the padded vocabulary", model.padded_vocab_size, tp,
                 f"set model.pad_vocab_size_multiple to a multiple of {tp}")
        _divides(problems, "data.seq_len (sequence parallelism splits the sequence)", cfg.data.seq_len, tp,
                 "choose a sequence length divisible by tp")
    problems += _pipeline_problems(cfg, grad_accum)
    return problems


def _pipeline_problems(cfg: TrainConfig, grad_accum: int | None) -> list[str]:
    par = cfg.parallel
    n_stages = par.pp * par.virtual_stages
    problems: list[str] = []
    if par.pp == 1:
        if par.virtual_stages > 1:
            problems.append("parallel.virtual_stages > 1 needs parallel.pp > 1")
        return problems
    if n_stages > cfg.model.n_layer:
        problems.append(f"parallel.pp * parallel.virtual_stages = {par.pp} * {par.virtual_stages} = {n_stages} stages "
                        f"but the model has {cfg.model.n_layer} layers (model.n_layer); every stage needs a layer: "
                        f"use at most {cfg.model.n_layer} stages")
    if par.pp_schedule in SINGLE_STAGE_SCHEDULES and par.virtual_stages > 1:
        problems.append(f"parallel.pp_schedule={par.pp_schedule} runs one stage per rank; with "
                        f"parallel.virtual_stages={par.virtual_stages} use pp_schedule=interleaved_1f1b or zero_bubble")
    if par.pp_schedule not in SINGLE_STAGE_SCHEDULES and par.pp_schedule not in MULTI_STAGE_SCHEDULES:
        problems.append(f"parallel.pp_schedule={par.pp_schedule!r}: expected one of "
                        f"{sorted(SINGLE_STAGE_SCHEDULES) + sorted(MULTI_STAGE_SCHEDULES)}")
    if grad_accum is not None:
        if par.pp_schedule == "1f1b" and grad_accum < par.pp:
            problems.append(f"parallel.pp_schedule=1f1b needs at least pp={par.pp} micro-batches per step, but "
                            f"data.global_batch_size / (micro_batch_size * dp) = {grad_accum}; lower "
                            "data.micro_batch_size or raise data.global_batch_size")
        rounds = max(1, grad_accum // par.pp)
        if par.pp_schedule in MULTI_STAGE_SCHEDULES and grad_accum % rounds:
            problems.append(f"parallel.pp_schedule={par.pp_schedule} needs the micro-batches per step ({grad_accum}) "
                            f"to be a multiple of {rounds} (their number divided by pp, rounded down)")
    explicit = list(par.pp_stage_layers)
    if explicit and (len(explicit) != n_stages or sum(explicit) != cfg.model.n_layer or min(explicit) < 1):
        problems.append(f"parallel.pp_stage_layers={explicit}: expected {n_stages} positive numbers of layers "
                        f"(pp * virtual_stages) summing to model.n_layer={cfg.model.n_layer}")
    return problems


def check_layout(cfg: TrainConfig, derived: Derived) -> None:
    """Raise a ConfigError naming every problem of the parallel layout (before any model is built)."""
    problems = layout_problems(cfg, derived.world_size, derived.grad_accum)
    if problems:
        raise ConfigError("invalid parallel layout:\n  " + "\n  ".join(problems))


@dataclass
class Layout:
    """The sizes of the mesh and this process's coordinates on it."""

    dp: int
    tp: int
    pp: int
    virtual_stages: int
    fsdp: bool
    mesh: DeviceMesh | None

    def size(self, dim: str) -> int:
        return getattr(self, dim)

    def rank(self, dim: str) -> int:
        return 0 if self.mesh is None or self.size(dim) == 1 else self.mesh[dim].get_local_rank()

    def group(self, dim: str):
        return self.mesh[dim].get_group()


def make_layout(cfg: TrainConfig, derived: Derived, device: torch.device) -> Layout:
    par = cfg.parallel
    mesh = None
    if derived.world_size > 1:
        mesh = init_device_mesh(device.type, (par.pp, derived.dp, par.tp), mesh_dim_names=("pp", "dp", "tp"))
    return Layout(dp=derived.dp, tp=par.tp, pp=par.pp, virtual_stages=par.virtual_stages, fsdp=par.fsdp, mesh=mesh)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy; logits [B, T, V] (a vocab-sharded DTensor under tensor parallelism)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def batch_to_device(batch: dict, device: torch.device, with_doc_ids: bool) -> Batch:
    """{input_ids, labels, doc_ids (None unless `with_doc_ids`)} of a loader batch, on `device`."""
    return {"input_ids": batch["input_ids"].to(device, non_blocking=True),
            "labels": batch["labels"].to(device, non_blocking=True),
            "doc_ids": batch["doc_ids"].to(device) if with_doc_ids else None}


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class Pipeline:
    """This rank's pipeline stages and the schedules that run them."""

    def __init__(self, parts: list[LanguageModel], stage_ids: list[int], layout: Layout, n_microbatches: int,
                 schedule: str, loss_fn: Callable, device: torch.device) -> None:
        self.parts, self.stage_ids, self.layout, self.loss_fn, self.device = parts, stage_ids, layout, loss_fn, device
        self.n_stages = layout.pp * layout.virtual_stages
        self.has_first = 0 in stage_ids
        self.has_last = self.n_stages - 1 in stage_ids
        self.group = layout.group("pp")
        self.train = build_schedule(schedule, parts, stage_ids, self.n_stages, n_microbatches, loss_fn, device,
                                    self.group)
        self._eval: dict[tuple, object] = {}

    def eval_schedule(self, shape: torch.Size):
        """A forward-only schedule, one micro-batch, for batches of `shape`.

        Pipeline stages keep the activation shapes they saw first, so each batch shape gets its own stages.
        """
        key = tuple(shape)
        if key not in self._eval:
            self._eval[key] = build_schedule("gpipe", self.parts, self.stage_ids, self.n_stages, 1, self.loss_fn,
                                             self.device, self.group, eval_only=True)
        return self._eval[key]

    def run(self, schedule, batch: Batch, train: bool) -> torch.Tensor:
        """Run `schedule` over `batch`; the mean micro-batch loss, on every rank of the pipeline."""
        args = (batch["input_ids"],) if self.has_first else ()
        target = batch["labels"] if self.has_last else None
        kwargs = {"doc_ids": batch["doc_ids"]} if batch.get("doc_ids") is not None else {}
        losses: list[torch.Tensor] = []
        if train:
            schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        else:
            schedule.eval(*args, target=target, losses=losses, **kwargs)
        mean = torch.zeros((), device=self.device)
        if losses:
            mean = torch.stack([_plain(loss.detach()).float() for loss in losses]).mean()
        # only the last stage has losses: a sum over the pipeline hands its value to every stage
        dist.all_reduce(mean, group=self.group)
        return mean


class ParallelModel(nn.Module):
    """What the trainer trains: this rank's part of the model under `parallel.*`, and how to step it.

    `module` is a LanguageModel with the parameters of this rank (every layer on one process; this rank's
    stages under pipeline parallelism), with the parameter names of the whole model: build the optimizer and
    checkpoints on it (`unwrap`).
    """

    def __init__(self, module: LanguageModel, layout: Layout, device: torch.device) -> None:
        super().__init__()
        self.module = module
        self.layout = layout
        self.device = device
        self.pipeline: Pipeline | None = None
        self.compile_info = CompileDecision(False, "torch.compile off")
        self._poison = False
        self._tied_group = None
        self._tied_param: nn.Parameter | None = None
        self._tied_duplicate = False

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel replicas (the loader's `dp_rank`)."""
        return self.layout.rank("dp")

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.pipeline is not None:
            raise RuntimeError("a pipeline-parallel model runs through loss() and forward_backward(), not forward()")
        return self.module(input_ids, doc_ids=doc_ids)

    def _loss_context(self):
        return loss_parallel() if self.layout.tp > 1 else contextlib.nullcontext()

    def _pipeline_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = cross_entropy(logits, labels)
        if self._poison:
            self._poison = False
            loss = loss * float("nan")
        return loss

    def loss(self, batch: Batch, autocast: Callable = contextlib.nullcontext) -> torch.Tensor:
        """Forward only: the mean loss of `batch` ({input_ids, labels, doc_ids?} on the device), on every rank."""
        if self.pipeline is not None:
            with autocast(), self._loss_context():
                mean = self.pipeline.run(self.pipeline.eval_schedule(batch["input_ids"].shape), batch, train=False)
            self._reshard()
            return mean
        with autocast():
            logits = self.module(batch["input_ids"], doc_ids=batch.get("doc_ids"))
        with self._loss_context():
            return _plain(cross_entropy(logits, batch["labels"]))

    def forward_backward(self, batches: list[Batch], autocast: Callable = contextlib.nullcontext,
                         poison: bool = False) -> torch.Tensor:
        """Forward and backward over the micro-batches of one step: gradients of the mean loss, which is returned.

        `poison` makes the first micro-batch's loss NaN (fault injection for the non-finite policy tests).
        """
        if self.pipeline is not None:
            self._poison = poison
            batch = {key: torch.cat([b[key] for b in batches]) for key in batches[0] if batches[0][key] is not None}
            with autocast(), self._loss_context():
                return self.pipeline.run(self.pipeline.train, batch, train=True)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            self._set_gradient_sync(i == len(batches) - 1)
            with autocast():
                logits = self.module(batch["input_ids"], doc_ids=batch.get("doc_ids"))
            with self._loss_context():
                loss = cross_entropy(logits, batch["labels"]) / len(batches)
                if poison and i == 0:
                    loss = loss * float("nan")
                loss.backward()
            total += _plain(loss.detach())
        return total

    def _set_gradient_sync(self, sync: bool) -> None:
        # replicated data parallelism all-reduces once per step; FSDP reduce-scatters every micro-batch (memory)
        if isinstance(self.module, FSDPModule) and not self.layout.fsdp:
            self.module.set_requires_gradient_sync(sync)

    def _reshard(self) -> None:
        for module in self.module.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the gradients of the whole model (all ranks) to `max_norm`; returns the norm before clipping."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        for p in params:
            # e.g. the vocab-parallel embedding's gradient comes out replicated: lay it out as its parameter
            if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)
        self._sync_tied_grads()
        sharded = any(isinstance(p.grad, DTensor) for p in params)
        if not sharded and self.pipeline is None:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        counted = [p for p in params if not (self._tied_duplicate and p is self._tied_param)]
        total_sq = _squared_norm([p.grad for p in counted], self.device)
        if self.pipeline is not None:
            dist.all_reduce(total_sq, group=self.pipeline.group)
        total = total_sq.sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)

    def _sync_tied_grads(self) -> None:
        """Sum the gradients of the tied embedding/head matrix over the first and the last pipeline stage."""
        if self._tied_group is None or self._tied_param is None or self._tied_param.grad is None:
            return
        grad = self._tied_param.grad
        dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=self._tied_group)


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares of all gradients, each counted once over the ranks that shard or replicate it."""
    by_mesh: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        by_mesh.setdefault(id(g.device_mesh) if isinstance(g, DTensor) else 0, []).append(g)
    total = torch.zeros((), device=device, dtype=torch.float32)
    for group in by_mesh.values():
        norm = _plain(torch.nn.utils.get_total_norm(group, 2.0))
        total = total + norm.float() ** 2
    return total


@dataclass
class CompileDecision:
    """Whether blocks are compiled, and the line the trainer logs about it."""

    enabled: bool
    message: str


def _compile_blocker(cfg: TrainConfig, device: torch.device) -> str | None:
    """Why torch.compile cannot (or should not) run this model on `device`, or None."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401  (inductor generates Triton kernels on CUDA)
        except ImportError:
            return "torch.compile needs the Triton package on CUDA (pip install triton)"
    if "mamba" in cfg.model.layer_mixers() and cfg.model.mamba.backend == "reference":
        # the reference scan is a Python loop over T steps: dynamo would unroll all of them
        return (f"model.mamba.backend=reference runs a Python loop over {cfg.data.seq_len} positions that "
                "torch.compile would unroll (minutes of compile time, no speedup); set model.mamba.backend=mamba_ssm")
    return None


def compile_decision(cfg: TrainConfig, device: torch.device) -> CompileDecision:
    """Resolve `parallel.compile` (auto / true / false) for a run on `device`.

    auto: compile on CUDA unless `_compile_blocker` names a reason (then eager, with that reason in the
    message); eager on CPU. true: compile on any device, and a blocker is a ConfigError. false: eager.
    """
    choice = str(cfg.parallel.compile).lower()
    if choice == "false":
        return CompileDecision(False, "torch.compile off (parallel.compile=false)")
    blocker = _compile_blocker(cfg, device)
    if choice == "true":
        if blocker:
            raise ConfigError(f"parallel.compile=true: {blocker}; or set parallel.compile=auto or false")
        return CompileDecision(True, f"torch.compile on for every block (parallel.compile=true, {device.type})")
    if device.type != "cuda":
        return CompileDecision(False, f"torch.compile off: parallel.compile=auto runs eager on {device.type} "
                                      "(set parallel.compile=true to compile there)")
    if blocker:
        return CompileDecision(False, f"torch.compile off, falling back to eager: {blocker} "
                                      "(parallel.compile=auto; set parallel.compile=false to silence this)")
    return CompileDecision(True, "torch.compile on for every block (parallel.compile=auto on CUDA)")


def compile_seconds() -> float:
    """Seconds spent in torch.compile so far in this process (dynamo and the backend it calls)."""
    from torch._dynamo.utils import compilation_time_metrics

    # graph capture and forward compile, and the backward graphs compiled at their first backward
    keys = ("_compile.compile_inner", "backward._backward_impl")
    return float(sum(sum(compilation_time_metrics.get(key, [])) for key in keys))


def _apply_block_wrappers(part: LanguageModel, cfg: TrainConfig, compile_blocks: bool) -> None:
    """Activation checkpointing and torch.compile, block by block (before FSDP2 wraps each block, so that
    its all-gathers and reduce-scatters stay outside the compiled graphs)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = part.transformer.layers
    if compile_blocks:
        # every block shares Block.forward's code: each kind of mixer, grad mode (validation) and new shape is
        # one more entry of its cache, and past the limit (default 8) dynamo silently runs that block eagerly
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    for key, block in list(layers.items()):
        if cfg.parallel.activation_checkpoint:
            block = checkpoint_wrapper(block)
        if compile_blocks:
            block = torch.compile(block, backend=cfg.parallel.compile_backend)
        layers[key] = block


def _apply_data_parallel(part: LanguageModel, cfg: TrainConfig, layout: Layout, device: torch.device) -> None:
    """FSDP2 sharding (`fsdp: true`) or replication of each block and of the part as the root."""
    mesh = layout.mesh["dp"]
    bf16 = cfg.precision == "bf16" and device.type == "cuda"
    # the residual stream stays fp32 between blocks (residual_in_fp32): do not cast block inputs
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=torch.float32 if bf16 else None, cast_forward_inputs=False)
    if layout.fsdp:
        # under pipelining each micro-batch's backward would gather the blocks again: keep them gathered
        pipelined = layout.pp > 1
        for block in part.transformer.layers.values():
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=not pipelined)
        fully_shard(part, mesh=mesh, mp_policy=mp, reshard_after_forward=False if pipelined else None)
        return
    from torch.distributed._composable.replicate_with_fsdp import replicate

    for block in part.transformer.layers.values():
        replicate(block, mesh=mesh, mp_policy=mp)
    replicate(part, mesh=mesh, mp_policy=mp)


def _split_pipeline(model: LanguageModel, cfg: TrainConfig, layout: Layout) -> tuple[list[LanguageModel], list[int]]:
    n_stages = layout.pp * layout.virtual_stages
    sizes = stage_sizes(cfg.model, cfg.data.seq_len, n_stages, cfg.parallel.pp_stage_layers)
    layer_ids = stage_layer_ids(sizes)
    stage_ids = local_stage_ids(layout.rank("pp"), layout.pp, layout.virtual_stages)
    parts = [cut_model(model, layer_ids[s], first=s == 0, last=s == n_stages - 1) for s in stage_ids]
    return parts, stage_ids


def _tied_group(layout: Layout):
    """Process groups {first stage, last stage} for every (dp, tp) coordinate; this rank's one or None."""
    mine = None
    ranks = layout.mesh.mesh
    for d in range(layout.dp):
        for t in range(layout.tp):
            pair = [int(ranks[0, d, t]), int(ranks[-1, d, t])]
            group = dist.new_group(pair)
            if dist.get_rank() in pair:
                mine = group
    return mine


def parallelize(model: LanguageModel, cfg: TrainConfig, derived: Derived, dist_info: DistInfo) -> ParallelModel:
    """Lay out `model` (built identically on every rank, on its device) as `cfg.parallel` says."""
    check_layout(cfg, derived)
    device = dist_info.device
    layout = make_layout(cfg, derived, device)
    decision = compile_decision(cfg, device)
    parts, stage_ids = _split_pipeline(model, cfg, layout) if layout.pp > 1 else ([model], [0])
    fused_rows: dict[str, tuple[int, int]] = {}
    for part in parts:
        if layout.tp > 1:
            fused_rows.update(apply_tensor_parallel(part, layout.mesh["tp"]))
        _apply_block_wrappers(part, cfg, decision.enabled)
        if layout.dp > 1:
            _apply_data_parallel(part, cfg, layout, device)
    module = parts[0] if len(parts) == 1 else join_parts(parts)
    setattr(module, FUSED_ROWS_ATTR, fused_rows)
    wrapped = ParallelModel(module, layout, device)
    wrapped.compile_info = decision
    if layout.pp > 1:
        wrapped.pipeline = Pipeline(parts, stage_ids, layout, derived.grad_accum, cfg.parallel.pp_schedule,
                                    wrapped._pipeline_loss, device)
        if cfg.model.tie_embeddings:
            wrapped._tied_group = _tied_group(layout)
            pipe = wrapped.pipeline
            if pipe.has_first:
                wrapped._tied_param = module.transformer.embeddings.word_embeddings.weight
            elif pipe.has_last:
                wrapped._tied_param, wrapped._tied_duplicate = module.lm_head.weight, True
    return wrapped


def unwrap(model: nn.Module) -> nn.Module:
    """The LanguageModel (this rank's part, with the whole model's parameter names) inside any wrapper."""
    return model.module if isinstance(model, ParallelModel) else model

