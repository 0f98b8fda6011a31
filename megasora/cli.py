"""`megasora` command line: one subcommand per module in COMMAND_MODULES.

Each module defines `register(subparsers)`, which adds its subparser (with its own --help)
and sets `func` to a callable taking the parsed args and returning an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMAND_MODULES = [
    "megasora.commands.train",
    "megasora.commands.sample",
    "megasora.commands.ckpt",
    "megasora.commands.config_docs",
    "megasora.commands.env",
    "megasora.data.preprocess",
    "megasora.commands.train_vae",
    "megasora.launcher.submit",
    "megasora.commands.scale",
    "megasora.commands.plan",
    "megasora.eval.command",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megasora",
        description="Train and sample Sora-style spacetime diffusion transformers. "
                    "Run `megasora COMMAND --help` for each command's options.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def setup_logging() -> None:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "PIL", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    """Run one command. A UserError (megasora/errors.py) becomes one line on global rank 0 and
    exit status 2 on every rank; any other exception is a bug and keeps its traceback."""
    from megasora.errors import UserError, report
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        code = args.func(args)
    except UserError as err:
        code = report(err)
    sys.exit(code or 0)
