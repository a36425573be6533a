"""Sums of one epoch on this rank (loss, correct, samples, phase times), reduced on demand.

The loss and correct-count sums stay on the device and are read back only when a report
asks for them, so a GPU step never waits for the host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..parallel import Communicator

PHASES = ("data", "forward", "backward", "sync_wait", "optimizer")


@dataclass
class Reduced:
    """An epoch's (or its first steps') figures over every rank."""

    loss_sum: float
    correct: float
    samples: float
    steps: int
    timing_ms: dict[str, float]
    top5: float = 0.0        # samples with the label among the 5 highest outputs

    @property
    def loss(self) -> float:
        """Mean loss per step (each step's loss is already the mean over its batch)."""
        return self.loss_sum / max(1, self.steps)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1.0, self.samples)

    @property
    def top5_accuracy(self) -> float:
        return self.top5 / max(1.0, self.samples)


@dataclass
class EpochMeter:
    """What the steps of the current epoch add up to on this rank."""

    loss_sum: float = 0.0
    correct: float = 0.0
    top5: float = 0.0
    samples: float = 0.0
    steps: int = 0
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    #: [loss, correct, top-5 correct] summed on the device since the last read-back
    pending: Any = None
    started: float = field(default_factory=time.perf_counter)
    #: seconds from the meter's start to ``stop_clock()`` (the epoch's last step)
    elapsed: float = 0.0

    def stop_clock(self) -> None:
        self.elapsed = time.perf_counter() - self.started

    def add(self, report: Any) -> None:
        """Count one step (its phase times always; its loss only if it was not skipped:
        a NaN loss would poison the epoch's mean, and the skip is counted instead)."""
        for phase, t in report.times.items():
            self.times[phase] += t
        if report.skipped:
            return
        if self.pending is None:
            self.pending = report.sums.copy()
        else:
            self.pending += report.sums
        self.samples += report.samples
        self.steps += 1

    def local_mean_loss(self, to_host: Any, global_batch: int) -> float:
        """This rank's samples' mean loss so far (each step's loss is this rank's share of
        the global-batch mean: its sum over the rank's samples / the global batch). Reads
        the device sums without a collective; for displays."""
        loss = self.loss_sum
        if self.pending is not None:
            loss += float(to_host(self.pending)[0])
        return loss * global_batch / self.samples if self.samples else float("nan")

    def reduce(self, comm: Communicator, to_host: Any) -> Reduced:
        """Sums over ranks (collective: every rank calls it at the same step)."""
        if self.pending is not None:  # the device sums come back here, once per report
            loss, correct, top5 = to_host(self.pending)
            self.loss_sum += float(loss)
            self.correct += float(correct)
            self.top5 += float(top5)
            self.pending = None
        sums = comm.allreduce_scalars([self.loss_sum, self.correct, self.samples, self.top5])
        tmax = comm.allreduce_scalars([self.times[p] for p in PHASES], "max")
        per = max(1, self.steps)
        timing = {f"{p}_ms": round(1000 * t / per, 3) for p, t in zip(PHASES, tmax, strict=True)}
        return Reduced(float(sums[0]), float(sums[1]), float(sums[2]), self.steps, timing,
                       float(sums[3]))
