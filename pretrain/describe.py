"""`python -m pretrain.describe CONFIG [--json]`: parameters, layer pattern, recurrent state, FLOPs per token,
and the estimated wall time and GPU-hours of the whole run (`--nodes`, `--gpus-per-node`, `--device`, or a
`--tokens-per-s` of your own; see pretrain/cost.py)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import torch

from based_layers import build_model
from pretrain.config import ConfigError, TrainConfig, derive, load_config
from pretrain.cost import CostError, estimate_cost
from pretrain.flops import forward_flops_breakdown, training_flops_per_token


def state_bytes_per_sequence(model, cfg: TrainConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of recurrent state for one sequence at inference, as our step form holds it.

    Linear-attention state and the SSM state are fp32; conv tails and the sliding window are in `dtype`.
    Full attention's KV cache grows with length: counted at `data.seq_len` tokens.
    """
    state = model.init_state(1, "meta", dtype)
    total = sum(t.numel() * t.element_size() for layer in state for t in layer.values())
    n_attn = cfg.model.layer_mixers().count("attention")
    total += n_attn * 2 * cfg.model.d_model * cfg.data.seq_len * torch.tensor([], dtype=dtype).element_size()
    return int(total)


def describe(cfg: TrainConfig) -> dict:
    with torch.device("meta"):
        model = build_model(cfg.model)
    seq_len = cfg.data.seq_len
    return {
        "params_total": model.num_parameters(),
        "params_non_embedding": model.num_parameters(exclude_embeddings=True),
        "layers": cfg.model.layer_mixers(),
        "state_bytes_per_sequence": state_bytes_per_sequence(model, cfg),
        "flops_per_token": training_flops_per_token(cfg.model, seq_len),
        "forward_flops_per_token_breakdown": forward_flops_breakdown(cfg.model, seq_len),
        "seq_len": seq_len,
    }


def _print_human(info: dict, path: str) -> None:
    counts = Counter(info["layers"])
    pattern = "".join({"base_conv": "C", "linear_attn": "L", "sliding_window": "W", "attention": "A",
                       "mamba": "M"}[m] for m in info["layers"])
    print(f"config                    {path}")
    print(f"parameters (unique)       {info['params_total']:,}")
    print(f"  non-embedding           {info['params_non_embedding']:,}")
    print(f"layers                    {len(info['layers'])}: " + ", ".join(f"{n} x{c}" for n, c in counts.items()))
    print(f"  pattern                 {pattern}  (C conv, L linear attn, W sliding window, A attention, M mamba)")
    print(f"recurrent state/sequence  {info['state_bytes_per_sequence']:,} bytes")
    print(f"training FLOPs/token      {info['flops_per_token']:.4g} (seq_len {info['seq_len']}; 3 x forward)")
    for key, value in info["forward_flops_per_token_breakdown"].items():
        print(f"  forward {key:<16s} {value:.4g}")


def cost_lines(cfg: TrainConfig, args: argparse.Namespace) -> tuple[list[str], dict]:
    """The cost section (lines to print, JSON fields) for the layout of `args`."""
    nodes = args.nodes or cfg.launch.nodes
    per_node = cfg.launch.gpus_per_node if args.gpus_per_node is None else args.gpus_per_node
    gpus = nodes * per_node
    if cfg.device == "cpu" and args.tokens_per_s is None:
        return ["estimated cost            config runs on CPU (device: cpu); pass --tokens-per-s to estimate"], {}
    try:
        est = estimate_cost(cfg, gpus, args.device, args.tokens_per_s)
    except CostError as err:
        return [f"estimated cost            not available: {err}"], {"error": str(err)}
    lines = [f"estimated cost            {est.total_tokens / 1e9:.2f}B tokens on {gpus} GPUs ({nodes} node{'s' if nodes != 1 else ''} x {per_node}) "
             f"of {args.device} at {est.tokens_per_s_per_gpu:,.0f} tokens/s/GPU",
             f"  wall time               {est.wall_s / 3600:,.1f} h ({est.wall_s / 86400:.2f} days; training steps only, "
             "validation and checkpoints add to it)",
             f"  GPU-hours               {est.gpu_hours:,.0f}",
             f"  throughput              {est.basis}",
             "  assumption              the per-GPU rate holds at any GPU count (multi-GPU scaling not measured yet)"]
    try:
        derive(cfg, gpus)
    except ConfigError as err:
        lines.append(f"  warning                 this layout cannot run the config: {err}")
    fields = {"gpus": gpus, "device": args.device, "tokens_per_s_per_gpu": est.tokens_per_s_per_gpu,
              "total_tokens": est.total_tokens, "wall_s": est.wall_s, "gpu_hours": est.gpu_hours, "basis": est.basis}
    return lines, fields


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--nodes", type=int, default=None, help="nodes of the run (default: launch.nodes)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="default: launch.gpus_per_node")
    parser.add_argument("--device", default="H100", help="GPU whose measured throughput to use (docs/throughput.csv)")
    parser.add_argument("--tokens-per-s", type=float, default=None,
                        help="training tokens/s per GPU to use instead of the measured table")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = describe(cfg)
    lines, cost = cost_lines(cfg, args)
    if args.json:
        print(json.dumps({**info, "cost": cost}, indent=2))
    else:
        _print_human(info, args.config)
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
