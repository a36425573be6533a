"""SIGTERM and SIGUSR1 caught from dptrain's first moment: a flag the training loop reads.

A batch system's warning (Slurm's ``--signal``, a preemption, ``scontrol requeue``) can
arrive while the process is still importing or setting up; with the default action it
would kill the task (exit 138 for USR1) before any handler existed. ``install()`` runs
first thing in ``cli.main``; the handler only records the first signal, which the loop
turns into a checkpoint and exit 75 at its next step. A launcher may start the process
with the two signals blocked (``env --block-signal``, as slurm/train.sbatch does), so that
one arriving before Python runs stays pending: ``install()`` unblocks them, and a
pending signal is delivered then, to the handler.
"""

from __future__ import annotations

import signal
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_caught: int | None = None
_installed = False


def _handler(signum: int, frame: Any) -> None:
    global _caught
    if _caught is None:
        _caught = signum


def install() -> None:
    """Record SIGTERM/SIGUSR1 from now on (idempotent), then accept any that is pending."""
    global _installed
    if not _installed:
        for sig in SIGNALS:
            signal.signal(sig, _handler)
        _installed = True
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def caught() -> int | None:
    """The first signal received since ``install()`` (None if none)."""
    return _caught
