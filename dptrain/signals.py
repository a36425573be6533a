"""SIGTERM, SIGUSR1 (what Slurm and schedulers send before they kill a job) and the first
Ctrl-C (SIGINT) as a flag.

``install()`` runs first thing in the command line, before anything slow, so a signal
that arrives during start-up is never fatal: it is recorded, and training stops at its
first step boundary with a checkpoint. The loop reads ``received()``; every rank agrees
on it in the per-step allreduce. A second Ctrl-C ends the process at once (the default
action is back after the first): checkpoints are written atomically, so none is torn.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from .parallel.launch import launcher_rank

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_received: int | None = None
_installed = False
_on_first: list[Callable[[int], None]] = []


def _handler(signum: int, frame: Any) -> None:
    global _received
    if _received is None:
        _received = signum
        for fn in _on_first:
            fn(signum)
    if signum == signal.SIGINT:  # the next Ctrl-C ends the process at once
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if launcher_rank() == 0:
            os.write(2, b"interrupted: stopping with a checkpoint at the end of this step "
                        b"(Ctrl-C again to stop at once)\n")


def install() -> None:
    """Record the first stop signal from now on instead of dying of it; then accept any
    that is pending. A launcher may start the process with SIGTERM/SIGUSR1 blocked
    (``env --block-signal``, as slurm/train.sbatch does), so that one arriving before
    Python runs stays pending: it is delivered now, to the handler."""
    global _installed
    if not _installed:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _handler)
        _installed = True
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGUSR1))


def on_first_signal(fn: Callable[[int], None]) -> None:
    """Call ``fn(signum)`` when the first stop signal arrives (test pause points)."""
    _on_first.append(fn)


def installed() -> bool:
    return _installed


def received() -> int | None:
    """The first stop signal received since ``install()``, or None."""
    return _received


def interrupted(signum: int | None) -> bool:
    """The stop came from Ctrl-C (a person at the terminal), not from a scheduler."""
    return signum == signal.SIGINT


def name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "a signal on another rank"
