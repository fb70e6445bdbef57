"""Megatron-style tensor and sequence parallelism for based_layers models, on DTensor.

Layout on the `tp` mesh dimension (size P):
- the embedding is vocab-parallel (rows of the vocabulary); its output is reduce-scattered over the sequence, so
  the residual stream between blocks is the local sequence shard [B, T/P, D] (sequence parallelism);
- norms run on that shard (`SequenceParallel`); each mixer and MLP input is all-gathered to [B, T, D];
- input projections are column-parallel: q/k/v by heads, the feature projections, MLP fc1, the BaseConv and
  Mamba in_proj by channel, so every kernel runs unchanged on its P-th of the heads/channels (mixers infer the
  head count from shapes); output projections are row-parallel and reduce-scatter back to the sequence shard;
- BaseConv's and Mamba's per-channel parameters (conv taps, conv bias, dt_proj, A_log, D) are split by channel
  (`LocalShards`); Mamba's x_proj, a reduction over channels, is row-parallel with an all-reduced output;
- the head is column-parallel over the vocabulary and the loss runs on the vocabulary shards: `loss_parallel`
  over DTensor logits (`model.loss_impl: plain`), or the chunked fused head + loss on this rank's vocabulary
  rows with the softmax statistics all-reduced (`VocabParallelLinearCrossEntropy`, `fused_chunked`);
- the RMSNorms run in plain PyTorch on DTensors (`SequenceParallel`): the fused norm kernel is not used.

Fused projections hold several row blocks in one Linear (Wqkv [Q|K|V], fc1 [value|gate], in_proj [u1|u2] or
[x|z]). Each rank needs its slice of every block, so before sharding the rows are reordered into the
"tensor-parallel order" [Q_0 K_0 V_0 | Q_1 K_1 V_1 | ...] and split contiguously (`Shard(0)`). The parameter
keeps its name and shape; `checkpoint_view` maps every local row range back to the published order, so a
checkpoint is the same whatever the layout that wrote it (`FUSED_ROWS_ATTR` on the model lists such tensors).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from based_layers.loss import IGNORE_INDEX
from based_layers.mixers import BaseConv, CausalSelfAttention, LinearAttention, Mamba, SlidingWindowAttention
from based_layers.norm import RMSNorm
from kernels.linear_cross_entropy import linear_cross_entropy

# name of the attribute of the (unwrapped) model: {parameter name: (number of row blocks, tp size)}
FUSED_ROWS_ATTR = "tp_fused_rows"


def tensor_parallel_order(rows: int, chunks: int, tp: int) -> torch.Tensor:
    """[rows] long: the published-order row held at each row of the tensor-parallel order."""
    per_chunk = rows // chunks
    return torch.arange(rows).view(chunks, tp, per_chunk // tp).transpose(0, 1).reshape(-1)


class LocalShards(ParallelStyle):
    """Split parameters that the module reads directly (not by calling a Linear) by channel: dim 0.

    The parameters stay DTensors (for the optimizer, FSDP and checkpoints); during the module's forward,
    reading them gives their local shards, so plain tensor code runs on the local channels.
    """

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = names

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        slots = []
        for name in self.names:
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            param = getattr(owner, attr)
            if param is None:
                continue
            dist_param = distribute_tensor(param.detach(), device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
            owner.register_parameter(attr, nn.Parameter(dist_param, requires_grad=param.requires_grad))
            slots.append((owner, attr))
        module.register_forward_pre_hook(partial(_expose_local_shards, slots))
        module.register_forward_hook(partial(_clear_local_shards, slots))
        return module


def _expose_local_shards(slots, module: nn.Module, args) -> None:
    # An instance attribute shadows the registered parameter for attribute access only: parameters(),
    # state_dict() and FSDP keep seeing the DTensor. The local view keeps the autograd link, so its gradient
    # becomes the DTensor parameter's (Shard(0)) gradient. Refreshed at every call: a forward that activation
    # checkpointing stops early never runs the forward hook that clears it.
    for owner, attr in slots:
        owner.__dict__[attr] = owner._parameters[attr].to_local()


def _clear_local_shards(slots, module: nn.Module, args, output) -> None:
    for owner, attr in slots:
        owner.__dict__.pop(attr, None)


class RowwiseToLocalChannels(RowwiseParallel):
    """Row-parallel Linear whose all-reduced output is then used on each rank's own channels only.

    The consumers' gradients are partial sums over the channel shards, so the output's gradient is declared
    Partial and summed over the tensor-parallel group (Megatron's copy-to-region after the all-reduce).
    """

    def __init__(self) -> None:
        super().__init__(input_layouts=Shard(-1), output_layouts=Replicate())

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        outputs = outputs.redistribute(placements=output_layouts)
        return outputs.to_local(grad_placements=[Partial()])


def _row_out() -> RowwiseParallel:
    # row-parallel output projection: reduce-scatter onto the sequence shard of the residual stream
    return RowwiseParallel(output_layouts=Shard(1))


def _gather_sequence() -> PrepareModuleInput:
    return PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))


def mixer_plan(mixer: nn.Module) -> tuple[dict[str, ParallelStyle], dict[str, int], list[str]]:
    """(plan relative to the mixer, fused Linear -> number of row blocks, per-channel parameters)."""
    if isinstance(mixer, (CausalSelfAttention, SlidingWindowAttention)):
        return {"Wqkv": ColwiseParallel(), "out_proj": _row_out()}, {"Wqkv": 3}, []
    if isinstance(mixer, LinearAttention):
        plan = {name: ColwiseParallel() for name in ("proj_q", "proj_k", "proj_v")}
        return {**plan, "out_proj": _row_out()}, {}, []
    if isinstance(mixer, BaseConv):
        return {"in_proj": ColwiseParallel(), "out_proj": _row_out()}, {"in_proj": 2}, ["conv.conv.weight"]
    if isinstance(mixer, Mamba):
        plan = {"in_proj": ColwiseParallel(), "x_proj": RowwiseToLocalChannels(), "out_proj": _row_out()}
        local = ["conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_proj.bias", "A_log", "D"]
        return plan, {"in_proj": 2}, local
    raise NotImplementedError(f"tensor parallelism has no plan for the mixer {type(mixer).__name__}")


@torch.no_grad()
def _reorder_rows(linear: nn.Linear, chunks: int, tp: int) -> None:
    order = tensor_parallel_order(linear.out_features, chunks, tp).to(linear.weight.device)
    linear.weight.copy_(linear.weight[order])
    if linear.bias is not None:
        linear.bias.copy_(linear.bias[order])


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> dict[str, tuple[int, int]]:
    """Shard `model` (a LanguageModel or a pipeline stage of one) over `tp_mesh`, in place.

    Returns {parameter name: (row blocks, tp size)} for the fused parameters stored in tensor-parallel order.
    """
    tp = tp_mesh.size()
    fused_rows: dict[str, tuple[int, int]] = {}
    for key, block in model.transformer.layers.items():
        plan, fused, local = mixer_plan(block.mixer)
        for name, chunks in fused.items():
            linear = block.mixer.get_submodule(name)
            _reorder_rows(linear, chunks, tp)
            for pname, _ in linear.named_parameters():
                fused_rows[f"transformer.layers.{key}.mixer.{name}.{pname}"] = (chunks, tp)
        block_plan = {"norm1": SequenceParallel(), "mixer": _gather_sequence(),
                      **{f"mixer.{name}": style for name, style in plan.items()}}
        if block.mlp is not None:
            _reorder_rows(block.mlp.fc1, 2, tp)
            fused_rows[f"transformer.layers.{key}.mlp.fc1.weight"] = (2, tp)
            block_plan.update({"norm2": SequenceParallel(), "mlp": _gather_sequence(), "mlp.fc1": ColwiseParallel(),
                               "mlp.fc2": _row_out()})
        parallelize_module(block, tp_mesh, block_plan, src_data_rank=None)
        if local:
            parallelize_module(block.mixer, tp_mesh, LocalShards(local), src_data_rank=None)
    _parallelize_ends(model, tp_mesh)
    _plain_norms(model)
    return fused_rows


class VocabParallelLinearCrossEntropy(nn.Module):
    """The chunked head + cross-entropy on this rank's vocabulary rows (replaces the model's `loss_head`).

    hidden: the final norm's output, a DTensor sharded on the sequence (Shard(1)); it is all-gathered, and
    its gradient, a partial sum over the vocabulary shards, is reduce-scattered back (declared Partial).
    weight: the head, a DTensor Shard(0) over the vocabulary. Every rank returns the same mean loss.
    """

    def __init__(self, tp_mesh: DeviceMesh, chunk_size: int) -> None:
        super().__init__()
        self.tp_mesh = tp_mesh
        self.chunk_size = chunk_size

    def forward(self, hidden: torch.Tensor, weight: DTensor, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(hidden, DTensor):
            hidden = DTensor.from_local(hidden, self.tp_mesh, [Shard(1)], run_check=False)
        h = hidden.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
        w = weight.to_local()
        vocab_start = self.tp_mesh.get_local_rank() * w.shape[0]
        return linear_cross_entropy(h.flatten(0, 1), w, labels.flatten(), ignore_index=IGNORE_INDEX,
                                    chunk_size=self.chunk_size, backend="chunked",
                                    process_group=self.tp_mesh.get_group(), vocab_start=vocab_start)


def _plain_norms(model: nn.Module) -> None:
    """Norms under sequence parallelism see DTensors, which the fused norm kernel does not take."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.backend = "reference"


def _parallelize_ends(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Vocab-parallel embedding and head, sequence-parallel final norm; keeps a tied head tied."""
    backbone = model.transformer
    tied = model.cfg.tie_embeddings and backbone.embeddings is not None and model.lm_head is not None
    plan: dict[str, ParallelStyle] = {}
    if backbone.embeddings is not None:
        plan["transformer.embeddings.word_embeddings"] = RowwiseParallel(input_layouts=Replicate(),
                                                                         output_layouts=Shard(1))
    if backbone.ln_f is not None:
        plan["transformer.ln_f"] = SequenceParallel()
    if model.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, plan, src_data_rank=None)
    if tied:
        # both styles shard the [V, D] matrix by vocabulary rows (Shard(0)), so one DTensor serves both
        model.lm_head.weight = backbone.embeddings.word_embeddings.weight
    if model.lm_head is not None:
        model.loss_head = VocabParallelLinearCrossEntropy(tp_mesh, model.cfg.loss_chunk_size)


def _published_order_view(value: DTensor, chunks: int, tp: int) -> DTensor:
    """The local part of a fused tensor stored in tensor-parallel order, as boxes of the published order."""
    sizes, offsets = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
    start, count = offsets[0], sizes[0]
    if count == 0:
        return value
    local = value.to_local()
    rows = value.shape[0]
    per_rank, block = rows // tp, rows // chunks // tp
    shards, boxes = [], []
    row = start
    while row < start + count:
        end = min(start + count, (row // block + 1) * block)
        rank, within = divmod(row, per_rank)
        chunk, offset = divmod(within, block)
        shards.append(local[row - start:end - start])
        boxes.append((chunk * (rows // chunks) + rank * block + offset, *offsets[1:]))
        row = end
    wrapper = LocalShardsWrapper(shards, boxes)
    return DTensor.from_local(wrapper, value.device_mesh, value.placements, run_check=False, shape=value.shape,
                              stride=value.stride())


def checkpoint_view(model: nn.Module, state: dict) -> dict:
    """`state` ({"model": ..., "optim": ...} of DCP) with fused tensors as boxes of the published row order.

    The boxes are views of the tensors in `state`, so `dcp.load` into the result fills `state` in place.
    """
    fused: dict[str, tuple[int, int]] = getattr(model, FUSED_ROWS_ATTR, {})
    if not fused:
        return state

    def convert(name: str, value):
        if name in fused and isinstance(value, DTensor):
            return _published_order_view(value, *fused[name])
        return value

    out = dict(state)
    out["model"] = {k: convert(k, v) for k, v in state["model"].items()}
    if "optim" in state:
        out["optim"] = {k: {s: convert(k, v) for s, v in per_param.items()} if isinstance(per_param, dict) else per_param
                        for k, per_param in state["optim"].items()}
    return out
