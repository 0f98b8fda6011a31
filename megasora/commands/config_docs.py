"""`megasora config-docs`: print (or write) the reference of every config key."""
from __future__ import annotations

import argparse
from pathlib import Path

from megasora.config import render_config_docs
from megasora.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("config-docs", help="print the configuration reference (docs/config.md)",
                              description=__doc__)
    p.add_argument("--out", default=None, help="write to this file instead of stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    text = render_config_docs() + "\n"
    if args.out:
        try:
            Path(args.out).write_text(text)
        except OSError as err:
            raise UserError(f"cannot write --out {args.out} ({err.strerror})",
                            "pass a path in an existing, writable directory") from err
    else:
        print(text, end="")
    return 0
