"""Which global batch each optimizer step trains on, the same on every rank.

The plan walks the global sampler from where the trainer state stands (a resume starts
mid-epoch) to the end of the last epoch or ``max_steps``, and tells each step the batch
after it, so the step can start reading and uploading that batch early.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..checkpoint import TrainerState
from ..data import GlobalSampler


@dataclass(frozen=True)
class Batch:
    """One optimizer step's global batch (all its micro-batches)."""

    epoch: int                     # the epoch it belongs to, from 0
    index: int                     # its position in the epoch, from 0
    step: int                      # the global step it is, from 1 (as messages count)
    indices: np.ndarray            # global sample indices
    upcoming: np.ndarray | None    # the next step's indices in this epoch (prefetch), if any
    last_in_epoch: bool


class BatchPlan:
    """Global batches of ``sampler`` for ``epochs`` epochs, at most ``max_steps`` steps."""

    def __init__(self, sampler: GlobalSampler, epochs: int, max_steps: int = 0) -> None:
        self.sampler, self.epochs, self.max_steps = sampler, epochs, max_steps
        self.steps_per_epoch = sampler.num_batches
        total = self.steps_per_epoch * epochs
        self.total_steps = min(total, max_steps) if max_steps else total

    def done(self, state: TrainerState) -> bool:
        """No step is left to train from ``state``."""
        return state.epoch >= self.epochs or state.global_step >= self.total_steps

    def batches(self, state: TrainerState) -> Iterator[Batch]:
        """The batches left from ``state`` (read again at each yield: the caller advances
        it), stopping at the end of the plan."""
        n = self.steps_per_epoch
        while not self.done(state):
            epoch = state.epoch
            first = -(-state.epoch_pos // self.sampler.batch_size)  # batches already done
            for i in range(first, n):
                if state.global_step >= self.total_steps:
                    return
                last = i == n - 1
                yield Batch(epoch, i, state.global_step + 1, self.sampler.batch(epoch, i),
                            None if last else self.sampler.batch(epoch, i + 1), last)
