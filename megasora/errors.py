"""User errors: what a person can fix, reported as one line instead of a traceback.

Every mistake a user can make (a bad config, an impossible layout, a missing checkpoint, an
empty data directory, a machine that cannot run the chosen option) raises a `UserError`.
`megasora/cli.py` turns it into

    megasora: <kind> error: <what went wrong>; <how to fix it>

on stderr and exit status 2; under torchrun / srun / mpirun only global rank 0 prints it.
Anything else is a programming error and keeps its traceback.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Mapping

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """Base of every error the user can fix. `kind` names the area ("config", "data", ...)."""

    kind = "usage"

    def __init__(self, what: str, fix: str = "", kind: str | None = None) -> None:
        super().__init__(f"{what}; {fix}" if fix else what)
        self.what, self.fix = what, fix
        if kind:
            self.kind = kind

    def line(self) -> str:
        """The one line the CLI prints; newlines inside the message are folded away."""
        text = " ".join(str(self).split())
        return f"megasora: {self.kind} error: {text}"


class DataError(UserError, ValueError):
    """Training/preprocessing inputs are empty, unreadable or inconsistent."""

    kind = "data"


class MissingPathError(UserError, FileNotFoundError):
    """A path the user gave (config key or argument) does not exist; `kind` says where it came from."""

    kind = "data"


class EnvironmentProblem(UserError):
    """This machine cannot run what the config asks for (missing extension, GPU, package)."""

    kind = "environment"


def launcher_rank(environ: Mapping[str, str] | None = None) -> int:
    """Global rank from the launcher's environment, without any rendezvous (0 when unknown).

    Same precedence as megasora.launcher.env.discover: torchrun/deepspeed, then MPI, then srun.
    """
    env = os.environ if environ is None else environ
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if key == "SLURM_PROCID" and "SLURM_STEP_ID" not in env:
            continue  # a batch script or salloc shell is one process, not rank N of a step
        value = env.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


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
