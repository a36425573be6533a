"""SIGTERM and SIGUSR1 (what Slurm and schedulers send before they kill a job) as a flag.

``install()`` runs first thing in the command line, before anything slow, so a signal
that arrives during start-up is never fatal: it is recorded, and training stops at its
first step boundary with a checkpoint. The loop reads ``received()``; every rank agrees
on it in the per-step allreduce.
"""

from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: int | None = None
_installed = False


def _handler(signum: int, frame: Any) -> None:
    global _received
    if _received is None:
        _received = signum


def install() -> None:
    """Record the first SIGTERM/SIGUSR1 from now on instead of dying of it."""
    global _installed
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)
    _installed = True


def installed() -> bool:
    return _installed


def received() -> int | None:
    """The first stop signal received since ``install()``, or None."""
    return _received


def name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "a signal on another rank"
