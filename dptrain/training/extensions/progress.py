"""Progress on rank 0: a live line where a person watches a terminal, plain lines in logs.

``progress = auto`` draws a live, full-width line (epoch, a bar, steps, running loss,
samples/s, time left) on stderr when that stderr reaches a terminal, also through
``mpiexec`` or ``srun --pty``; where the output goes to a log (a batch job, a pipe, a
file) it prints a plain ``progress:`` line every ``progress_every`` seconds (30) instead.
``bar`` (or ``on``) forces the live line, ``lines`` the plain ones, ``off`` shows nothing.

The running loss is rank 0's own samples' mean (read on rank 0 alone, so it never costs
the other ranks a collective); the epoch lines report the loss over every rank.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from ...terminal import watched_terminal
from ..extension import Extension
from ..status import Status

LIVE_INTERVAL = 0.2   # seconds between redraws of the live line


def duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03``."""
    s = int(max(0.0, seconds) + 0.5)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class ProgressDisplay(Extension):
    name = "progress"

    def __init__(self, mode: str, steps_per_epoch: int, epochs: int, total_steps: int,
                 global_batch: int, is_root: bool, every: float = 30.0) -> None:
        self.mode, self.is_root, self.every = mode, is_root, every
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.total_steps, self.global_batch = total_steps, global_batch
        self.live: TextIO | None = None   # the stream of a live line, when there is one
        self.columns = 100
        self.enabled = False
        self._t0 = self._last = 0.0
        self._first_step = 0
        self._drawn = 0  # length of the live line on screen

    def start(self, trainer: Any) -> None:
        if not self.is_root or self.mode == "off":
            return
        self.enabled = True
        term = watched_terminal(2) if self.mode in ("auto", "bar", "on") else None
        if term is not None or self.mode in ("bar", "on"):
            self.live = sys.stderr
            self.columns = term.columns if term is not None else \
                int(os.environ.get("COLUMNS", "") or 100)
        self._t0 = time.monotonic()
        # a live line is drawn at the first step already; log lines come every 30 s
        self._last = -LIVE_INTERVAL if self.live is not None else self._t0
        self._first_step = trainer.state.global_step

    def trigger(self, status: Status) -> bool:
        return self.enabled

    def __call__(self, trainer: Any, status: Status) -> None:
        now = time.monotonic()
        if status.report_due:
            self._clear()
            return
        due = LIVE_INTERVAL if self.live is not None else self.every
        if now - self._last < due:
            return
        self._last = now
        text = self._describe(trainer, status, now)
        if self.live is None:
            print(f"progress: {text}", flush=True)
            return
        line = text[:self.columns - 1]
        self.live.write("\r" + line + " " * max(0, self._drawn - len(line)))
        self.live.flush()
        self._drawn = len(line)

    def _describe(self, trainer: Any, status: Status, now: float) -> str:
        spe = self.steps_per_epoch
        in_epoch = status.step - status.epoch * spe
        done = status.step - self._first_step
        rate = done * self.global_batch / max(now - self._t0, 1e-9)
        eta = (self.total_steps - status.step) * (now - self._t0) / max(done, 1)
        loss = trainer.meter.local_mean_loss(trainer.backend.to_host, self.global_batch)
        tail = (f" {in_epoch}/{spe} steps  loss {loss:.4f}  {rate:,.0f} samples/s  "
                f"ETA {duration(eta)}")
        head = f"epoch {status.epoch + 1}/{self.epochs}"
        if self.live is None:
            return (f"{head}, step {in_epoch}/{spe} ({100 * in_epoch / spe:.0f}%), loss "
                    f"{loss:.4f}, {rate:,.0f} samples/s, run ETA {duration(eta)}")
        width = max(10, self.columns - 1 - len(head) - len(tail) - 3)
        filled = int(width * in_epoch / spe)
        return f"{head} [{'#' * filled}{'.' * (width - filled)}]{tail}"

    def _clear(self) -> None:
        if self.live is not None and self._drawn:
            self.live.write("\r" + " " * self._drawn + "\r")
            self.live.flush()
            self._drawn = 0

    def close(self, trainer: Any) -> None:
        self._clear()
