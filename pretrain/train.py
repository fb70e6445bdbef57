"""`python -m pretrain.train CONFIG [key=value ...]`: build, train, close. Under torchrun for several processes."""

from __future__ import annotations

# First, before torch is imported (seconds): a checkpoint request (SIGUSR1/SIGTERM) during start-up is
# remembered and acted on at the first step boundary, and a worker whose torchrun is gone stops.
from pretrain.signals import install_at_start

install_at_start()

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from pretrain.checkpoint import CheckpointError  # noqa: E402
from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.distributed import init_distributed, shutdown  # noqa: E402
from pretrain.trainer import NonFiniteError, Trainer  # noqa: E402


def tensorboard_command() -> str:
    """`tensorboard` next to this interpreter (the venv's, not on PATH unless the venv is active)."""
    beside = Path(sys.executable).parent / "tensorboard"
    return str(beside) if beside.is_file() else "tensorboard"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="YAML file under configs/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value, e.g. optim.lr=3e-4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides, for_training=True)
        dist_info = init_distributed(cfg.device)
        trainer = Trainer(cfg, dist_info)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        code = trainer.fit()
    except (NonFiniteError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    if dist_info.is_main and code == 0:
        run = cfg.resolved_run_dir
        print(f"run folder: {run}\n  metrics:     {run / 'metrics.jsonl'}\n  checkpoints: {run / 'checkpoints'}\n"
              f"  TensorBoard: {tensorboard_command()} --logdir {run / 'tb'}")
    shutdown(exit_code=code if dist_info.world_size > 1 else None)
    return code


if __name__ == "__main__":
    sys.exit(main())
