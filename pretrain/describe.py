"""`python -m pretrain.describe CONFIG [--json]`: parameters, layer pattern, recurrent state, FLOPs per token."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import torch

from based_layers import build_model
from pretrain.config import ConfigError, TrainConfig, load_config
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = describe(cfg)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_human(info, args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
