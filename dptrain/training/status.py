"""Where the run stands after a step, as every rank has agreed it.

The counters follow from the batch plan alone (the same on every rank). What a rank
cannot know by itself (whether any rank caught a stop signal, how long the run has
taken) is agreed in one small allreduce per step. Extensions' triggers read only this,
so no extension can make the ranks take different paths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..parallel import Communicator


@dataclass(frozen=True)
class Status:
    """The agreed state after ``step`` steps."""

    step: int                  # global steps done
    epoch: int                 # the epoch the last step belonged to, from 0
    epoch_end: bool            # the last step completed its epoch
    last: bool                 # no step is left in the plan (epochs or max_steps reached)
    stop_requested: bool       # some rank caught SIGTERM/SIGUSR1
    elapsed: float             # seconds since training started (the slowest rank's clock)
    skipped: bool = False      # the step's update was skipped (non-finite; agreed)
    broken_by: int = 0         # the step whose update made parameters non-finite (0: none)
    grad_norm: float = 0.0     # the summed gradient's global norm (before clipping)

    @property
    def report_due(self) -> bool:
        """An epoch's figures are due: it ended, or the run stops part-way through it."""
        return self.epoch_end or self.last


class Agreement:
    """The per-step allreduce: [stop signal seen, seconds since start], max over ranks."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.started = time.monotonic()

    def __call__(self, signal_seen: bool) -> tuple[bool, float]:
        flag, elapsed = self.comm.allreduce_scalars(
            [1.0 if signal_seen else 0.0, time.monotonic() - self.started], "max")
        return bool(flag > 0), float(elapsed)
