"""Preemption signals: SIGTERM / SIGUSR1 ask the trainer to save and exit cleanly.

The handler only records the request; the training loop checks it after each optimizer
step, saves a checkpoint, and exits with PREEMPTED_EXIT_CODE (megasora/errors.py) so a launcher (Slurm
requeue logic in slurm/) knows the job stopped on purpose and should be requeued.
"""
from __future__ import annotations

import signal
import threading


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; polled by the training loop between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._installed = False
        self.signal_name: str | None = None

    def install(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        if self._installed:
            return
        self._installed = True
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


_PROCESS_FLAG = PreemptionFlag()


def process_flag() -> PreemptionFlag:
    """Signals are process-wide, and so is this flag. Training commands install it first thing,
    so a signal that arrives during start-up (imports, rendezvous) still ends in a clean save."""
    return _PROCESS_FLAG
