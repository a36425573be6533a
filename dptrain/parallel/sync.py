"""Gradient synchronisation over a flat gradient buffer, in buckets.

The model calls ``on_ready(offset)`` during backward when ``grads[:offset]`` are final
(the buffer is laid out in reverse layer order). With overlap, each bucket's non-blocking
allreduce starts as soon as it is complete; ``finish()`` waits for all of them before the
optimizer step. Without overlap, ``finish()`` does one blocking allreduce of the buffer.

With a timeline attached, each bucket's allreduce is recorded from its launch to the end
of its wait, on its own row, so a trace shows whether communication overlaps backward.

Ranks on one node that share memory sum their gradients with ``SharedSum``
(``parallel/shared.py``) instead, behind the same three calls.
"""

from __future__ import annotations

import time
from typing import Any

from ..timeline import BUCKET_TID, SYNC_TID
from .interface import Communicator


def bucket_bounds(n: int, itemsize: int, bucket_bytes: int) -> list[tuple[int, int]]:
    """Split ``n`` elements into contiguous buckets of at most ``bucket_bytes`` each."""
    if n == 0:
        return []
    per = max(1, bucket_bytes // itemsize)
    return [(s, min(s + per, n)) for s in range(0, n, per)]


class GradSync:
    """Sums a flat gradient buffer over ranks, bucket by bucket."""

    def __init__(self, comm: Communicator, grads: Any, bucket_bytes: int = 4 << 20,
                 overlap: bool = True, timeline: Any = None) -> None:
        self.comm, self.grads, self.overlap = comm, grads, overlap
        self.buckets = bucket_bounds(grads.size, grads.itemsize, bucket_bytes)
        self.calls = 0           # MPI calls made in the last step
        self.wait_seconds = 0.0  # time spent waiting in the last finish()
        #: where per-bucket spans go (``add(name, start, end, cat, tid, **args)``); None
        #: records nothing
        self.timeline = timeline if timeline is not None and timeline.enabled else None
        self._next = 0
        self._requests: list[Any] = []
        self._launched: list[float] = []

    @property
    def active(self) -> bool:
        return self.comm.size > 1

    def start(self) -> None:
        """Begin a step: nothing is in flight yet."""
        self._next = 0
        self._requests = []
        self._launched = []
        self.calls = 0

    def on_ready(self, offset: int) -> None:
        """Backward has finished ``grads[:offset]``: launch every bucket now complete."""
        if not (self.overlap and self.active):
            return
        while self._next < len(self.buckets) and self.buckets[self._next][1] <= offset:
            s, e = self.buckets[self._next]
            self._launched.append(time.perf_counter())
            self._requests.append(self.comm.iallreduce_sum(self.grads[s:e]))
            self.calls += 1
            self._next += 1

    def finish(self) -> None:
        """Complete the sum: launch what is left (or everything) and wait for it all."""
        t0 = time.perf_counter()
        tl = self.timeline
        if self.active:
            if self.overlap:
                self.on_ready(self.grads.size)
                for b, r in enumerate(self._requests):
                    r.wait()
                    if tl is not None:
                        self._record(b, self._launched[b], time.perf_counter())
            else:
                self.comm.allreduce_sum(self.grads)
                self.calls = 1
                if tl is not None:
                    self._record(-1, t0, time.perf_counter())
        self._requests = []
        self.wait_seconds = time.perf_counter() - t0

    def _record(self, bucket: int, start: float, end: float) -> None:
        """One allreduce span on the timeline (bucket -1: the whole buffer, blocking)."""
        s, e = (0, self.grads.size) if bucket < 0 else self.buckets[bucket]
        name = "allreduce (blocking)" if bucket < 0 else f"allreduce bucket {bucket}"
        tid = BUCKET_TID + bucket if bucket >= 0 else SYNC_TID
        self.timeline.add(name, start, end, cat="comm", tid=tid,
                          bytes=(e - s) * self.grads.itemsize, elements=[s, e])
