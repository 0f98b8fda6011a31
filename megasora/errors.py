"""User errors: what a person can fix, reported as one line instead of a traceback.

Every mistake a user can make (a bad config, an impossible layout, a missing checkpoint, an
empty data directory, a machine that cannot run the chosen option) raises a `UserError`.
`megasora/cli.py` turns it into

    megasora: <kind> error: <what went wrong>; <how to fix it>

on stderr and exit status USER_ERROR_EXIT_CODE; under torchrun / srun / mpirun only global rank 0
prints it.
Anything else is a programming error and keeps its traceback.
"""
from __future__ import annotations

# Exit statuses a launcher or script may act on (the sbatch template requeues on PREEMPTED).
USER_ERROR_EXIT_CODE = 2  # a UserError: one line on stderr, nothing to retry until the input changes
PREEMPTED_EXIT_CODE = 3   # SIGTERM/SIGUSR1 during training: checkpoint saved, stopped on purpose


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
