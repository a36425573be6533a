"""Gradient synchronisation over a flat gradient buffer, in buckets.

The model calls ``on_ready(offset)`` during backward when ``grads[:offset]`` are final
(the buffer is laid out in reverse layer order). With overlap, each bucket's non-blocking
allreduce starts as soon as it is complete; ``finish()`` waits for all of them before the
optimizer step. Without overlap, ``finish()`` does one blocking allreduce of the buffer.
"""

from __future__ import annotations

import time
from typing import Any

from .comm import Communicator


def bucket_bounds(n: int, itemsize: int, bucket_bytes: int) -> list[tuple[int, int]]:
    """Split ``n`` elements into contiguous buckets of at most ``bucket_bytes`` each."""
    if n == 0:
        return []
    per = max(1, bucket_bytes // itemsize)
    return [(s, min(s + per, n)) for s in range(0, n, per)]


class GradSync:
    """Sums a flat gradient buffer over ranks, bucket by bucket."""

    def __init__(self, comm: Communicator, grads: Any, bucket_bytes: int = 4 << 20,
                 overlap: bool = True) -> None:
        self.comm, self.grads, self.overlap = comm, grads, overlap
        self.buckets = bucket_bounds(grads.size, grads.itemsize, bucket_bytes)
        self.calls = 0           # MPI calls made in the last step
        self.wait_seconds = 0.0  # time spent waiting in the last finish()
        self._next = 0
        self._requests: list[Any] = []

    @property
    def active(self) -> bool:
        return self.comm.size > 1

    def start(self) -> None:
        """Begin a step: nothing is in flight yet."""
        self._next = 0
        self._requests = []
        self.calls = 0

    def on_ready(self, offset: int) -> None:
        """Backward has finished ``grads[:offset]``: launch every bucket now complete."""
        if not (self.overlap and self.active):
            return
        while self._next < len(self.buckets) and self.buckets[self._next][1] <= offset:
            s, e = self.buckets[self._next]
            self._requests.append(self.comm.iallreduce_sum(self.grads[s:e]))
            self.calls += 1
            self._next += 1

    def finish(self) -> None:
        """Complete the sum: launch what is left (or everything) and wait for it all."""
        t0 = time.perf_counter()
        if self.active:
            if self.overlap:
                self.on_ready(self.grads.size)
                for r in self._requests:
                    r.wait()
            else:
                self.comm.allreduce_sum(self.grads)
                self.calls = 1
        self._requests = []
        self.wait_seconds = time.perf_counter() - t0
