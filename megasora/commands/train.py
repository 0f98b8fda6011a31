"""`megasora train`: train the DiT with DeepSpeed; one process per device, any launcher."""
from __future__ import annotations

import argparse

from megasora.config import load_config
from megasora.train.preemption import process_flag
from megasora.train.trainer import train

EPILOG = """examples:
  megasora train --config configs/tiny.yaml --set train.steps=20 --set run.dir=runs/try
  torchrun --standalone --nproc_per_node 2 -m megasora train --config configs/tiny.yaml
  srun python -m megasora train --config configs/7b.yaml --resume auto     (see docs/slurm.md)

The run directory gets config.yaml, metrics.jsonl, tensorboard/, loss.png and checkpoints/.
Exit status 3 means a preemption signal (SIGTERM/SIGUSR1) arrived and a checkpoint was saved."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a spacetime DiT (rectified flow) with DeepSpeed",
                              description=__doc__, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p, "configs/tiny.yaml")
    p.set_defaults(func=run)


def add_training_arguments(p: argparse.ArgumentParser, example_config: str) -> None:
    """--config / --set / --resume, shared by every training command."""
    p.add_argument("--config", required=True, help=f"YAML preset, e.g. {example_config}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 (repeatable; keys in docs/config.md)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="`auto`: continue from the newest complete checkpoint in run.dir if any; or a "
                        "checkpoint path. A different parallel layout or node count is resharded automatically")


def run(args: argparse.Namespace) -> int:
    process_flag().install()  # before DeepSpeed starts (seconds): an early SIGUSR1/SIGTERM still saves
    cfg = load_config(args.config, args.overrides)  # fails before any process group starts
    return train(cfg, resume=args.resume).exit_code
