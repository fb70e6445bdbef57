"""Worker of the multi-process tests: `torchrun ... -m tests.parallel.worker SCENARIO OUT.json [ARGS]`.

Every rank runs the scenario; rank 0 writes the report. Each worker ends with barrier, destroy_process_group
and os._exit (gloo can abort in interpreter teardown otherwise: shared/reference/distributed_on_cpu.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.distributed import all_reduce_mean
from pretrain.parallelize import unwrap
from pretrain.tensor_parallel import FUSED_ROWS_ATTR
from tests.parallel import harness

# world size -> [(name, keyword arguments of harness.train_config)]
LAYOUTS = {
    2: [("tp2", dict(tp=2)),
        ("pp2_1f1b", dict(pp=2, schedule="1f1b")),
        ("pp2_interleaved", dict(pp=2, schedule="interleaved_1f1b", virtual=2)),
        ("pp2_zero_bubble", dict(pp=2, schedule="zero_bubble", virtual=2)),
        ("fsdp2", dict(dp=2, fsdp=True)),
        ("dp2_replicate", dict(dp=2))],
    4: [("tp2_dp2_fsdp", dict(tp=2, dp=2, fsdp=True)),
        ("pp2_tp2", dict(pp=2, tp=2, schedule="1f1b", activation_checkpoint=True)),
        ("pp2_tp2_interleaved", dict(pp=2, tp=2, schedule="interleaved_1f1b", virtual=2)),
        ("pp2_dp2_replicate", dict(pp=2, dp=2, schedule="1f1b"))],
    8: [("pp2_dp2_tp2", dict(pp=2, dp=2, tp=2, fsdp=True, schedule="interleaved_1f1b", virtual=2))],
}
STEPS = 2


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=harness.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def check_layout(family: str, layout: dict, model_overrides: dict | None = None) -> dict:
    """Train STEPS steps under `layout` and against one process: loss, grad norm and every gradient.

    `model_overrides` change the model config of the parallel run only; the reference keeps the plain loss.
    """
    world = dist.get_world_size()
    cfg = harness.train_config(family, **layout)
    dp = layout.get("dp", 1)
    ref_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, loss_impl="plain"))
    ref_losses, ref_norms, ref_grads = harness.reference(ref_cfg if model_overrides else cfg, STEPS)
    if model_overrides:
        cfg.model = dataclasses.replace(cfg.model, **model_overrides)
    model, opt = harness.build(cfg)
    losses, norms = [], []
    for step in range(STEPS):
        batches = harness.global_batches(cfg.model.padded_vocab_size, harness.n_micro(cfg), step)
        loss = model.forward_backward(harness.rank_batches(batches, model.dp_rank, dp), autocast=harness.autocast)
        losses.append(float(all_reduce_mean(loss)))
        norms.append(model.clip_grad_norm_(cfg.optim.grad_clip))
        if step == 0:
            grads = harness.full_grads(unwrap(model), getattr(unwrap(model), FUSED_ROWS_ATTR))
            grad_err, where, grad_abs, grad_rel = harness.grad_error(grads, ref_grads)
            # the tied head may live on another rank than the embedding; every parameter is on some rank
            names = [None] * world
            dist.all_gather_object(names, sorted(grads))
            missing = sorted(set(ref_grads) - set().union(*names) - {"lm_head.weight"})
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
    norm_err = max(abs(a - b) / abs(b) for a, b in zip(norms, ref_norms, strict=True))
    return {"loss_rel_err": _max_over_ranks(loss_err), "norm_rel_err": _max_over_ranks(norm_err),
            "grad_err": _max_over_ranks(grad_err), "grad_abs_err": _max_over_ranks(grad_abs),
            "grad_rel_err": _max_over_ranks(grad_rel), "worst_param": where, "missing": missing,
            "losses": losses, "ref_losses": ref_losses}


def scenario_layouts(out: str, families: str) -> dict:
    report = {}
    for name, layout in LAYOUTS[dist.get_world_size()]:
        for family in families.split(","):
            t0 = time.perf_counter()
            report[f"{name}/{family}"] = {**check_layout(family, layout), "seconds": time.perf_counter() - t0}
    return report


# the chunked fused loss (chunks of 5 tokens: they do not divide the 2 x 16 tokens of a micro-batch)
FUSED_LOSS = {"loss_impl": "fused_chunked", "loss_chunk_size": 5}
FUSED_LOSS_LAYOUTS = [("tp2", dict(tp=2)), ("fsdp2", dict(dp=2, fsdp=True))]


def scenario_fused_loss(out: str, families: str) -> dict:
    """The fused loss under tp2 (vocab-parallel: softmax statistics all-reduced) and FSDP dp2, against one
    process with the plain fp32-logits loss."""
    report = {}
    for name, layout in FUSED_LOSS_LAYOUTS:
        for family in families.split(","):
            report[f"{name}/{family}"] = check_layout(family, layout, FUSED_LOSS)
    return report


# (layout, micro-batches per rank and step): the same global batch of RESHARD_MICRO micro-batches in each
RESHARD_MICRO = 4
RESHARD_SAVED = dict(tp=2, pp=2, schedule="1f1b", accum=RESHARD_MICRO)
RESHARD_LOADED = dict(dp=4, fsdp=True, accum=RESHARD_MICRO // 4)


def scenario_reshard(out: str, root: str, family: str = "based") -> dict:
    """Save under tp2 x pp2 after step 0 (async); load under dp4 (FSDP), train, save after step 1; train on."""
    from pretrain.checkpoint import Checkpointer, load_checkpoint

    root = Path(root)
    cfg = harness.train_config(family, **RESHARD_SAVED)
    model, opt = harness.build(cfg)
    saver = Checkpointer(root / "a", cfg.checkpoint)
    saved = harness.train_steps(model, opt, cfg, range(1), saver, save_after=(0,), async_save=True)
    saver.finalize_pending()
    saved += harness.train_steps(model, opt, cfg, range(1, 3))
    cfg = harness.train_config(family, **RESHARD_LOADED)
    model, opt = harness.build(cfg, seed=12345)
    load_checkpoint(saver.folder(1), unwrap(model), opt)
    saver = Checkpointer(root / "b", cfg.checkpoint)
    loaded = harness.train_steps(model, opt, cfg, range(1, 3), saver, save_after=(1,))
    return {"saved": saved, "loaded": loaded}


SCENARIOS = {"layouts": scenario_layouts, "reshard": scenario_reshard, "fused_loss": scenario_fused_loss}


def main() -> int:
    scenario, out, *args = sys.argv[1:]
    gpu = harness.device().type == "cuda"
    if gpu:
        torch.cuda.set_device(harness.device())
    dist.init_process_group("nccl" if gpu else "gloo", device_id=harness.device() if gpu else None)
    code = 0
    try:
        report = SCENARIOS[scenario](out, *args)
        if dist.get_rank() == 0:
            with open(out, "w") as f:
                json.dump(report, f, indent=1)
    except Exception:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        dist.barrier()
        dist.destroy_process_group()
    os._exit(code)


if __name__ == "__main__":
    main()
