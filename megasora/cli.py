"""`megasora` command line: one subcommand per module in COMMAND_MODULES.

Each module defines `register(subparsers)`, which adds its subparser (with its own --help)
and sets `func` to a callable taking the parsed args and returning an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import time
from collections.abc import Mapping

from megasora.errors import USER_ERROR_EXIT_CODE, UserError
from megasora.launcher.env import launcher_rank

COMMAND_MODULES = [
    "megasora.commands.train",
    "megasora.commands.sample",
    "megasora.commands.ckpt",
    "megasora.commands.config_docs",
    "megasora.commands.env",
    "megasora.commands.preprocess",
    "megasora.commands.caption",
    "megasora.commands.train_vae",
    "megasora.commands.submit",
    "megasora.commands.scale",
    "megasora.commands.plan",
    "megasora.commands.eval",
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
    rank = launcher_rank()
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "PIL", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def report(err: UserError, environ: Mapping[str, str] | None = None, grace_s: float = 3.0) -> int:
    """Print `err` as one line on global rank 0 (other ranks stay quiet); returns the exit status.

    Every rank checks the same config, so all of them raise the same error. A launcher tears the
    job down when its first rank exits; if that were rank 1, rank 0 could be killed before it
    printed. So the other ranks first give rank 0 `grace_s` seconds (a SIGTERM from the launcher
    ends the wait: the default handler replaces the preemption flag's).
    """
    if launcher_rank(environ) == 0:
        print(err.line(), file=sys.stderr, flush=True)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(grace_s)
    return USER_ERROR_EXIT_CODE


def main(argv: list[str] | None = None) -> None:
    """Run one command. A UserError (megasora/errors.py) becomes one line on global rank 0 and
    exit status 2 on every rank; any other exception is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        code = args.func(args)
    except UserError as err:
        code = report(err)
    sys.exit(code or 0)
