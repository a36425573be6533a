"""Input batches: gather a rank's samples into reusable buffers and move them to the device.

On CPU a batch is one ``np.take`` into a reused buffer (no allocation per step). On GPU
there are two slots, each a pinned host buffer and a device buffer: the host gathers the
next batch into one slot and queues its upload on a copy stream while the GPU still
computes on the other slot, so the input transfer overlaps the previous step. Events
keep the reuse safe: a slot's device buffer is refilled only after the work that read it,
and its host buffer only after its last upload has finished.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import Backend


class _Slot:
    """One pinned host buffer and one device buffer for (x, y), with their events."""

    def __init__(self, backend: Backend, x: np.ndarray, y: np.ndarray, rows: int) -> None:
        xp = backend.xp
        self.hx = backend.pinned_empty((rows, *x.shape[1:]), x.dtype)
        self.hy = backend.pinned_empty((rows, *y.shape[1:]), y.dtype)
        self.hr = backend.pinned_empty(rows, np.int64)  # the sample indices (for dropout)
        self.dx = xp.empty(self.hx.shape, dtype=x.dtype)
        self.dy = xp.empty(self.hy.shape, dtype=y.dtype)
        self.dr = xp.empty(rows, dtype=np.int64)
        self.uploaded = backend.event()  # the host buffer is free once this has passed
        self.released = backend.event()  # the device buffer is free once this has passed
        self.rows: np.ndarray | None = None


class BatchUploader:
    """``get(rows)`` gives (x, y) of those samples on the backend; ``prefetch`` starts early."""

    def __init__(self, backend: Backend, x: np.ndarray, y: np.ndarray, max_rows: int) -> None:
        self.backend, self.x, self.y = backend, x, y
        #: True when ``prefetch`` does anything (worth telling it the next rows)
        self.asynchronous = backend.is_gpu
        #: on GPU, the rows of the last ``get`` on the device (None on CPU)
        self.device_rows: Any = None
        self._alloc(max(int(max_rows), 1))

    def _alloc(self, rows: int) -> None:
        self.max_rows = rows
        x, y = self.x, self.y
        if self.asynchronous:
            self.slots = [_Slot(self.backend, x, y, rows) for _ in range(2)]
            self.current: _Slot | None = None
        else:
            self.bx = np.empty((rows, *x.shape[1:]), x.dtype)
            self.by = np.empty((rows, *y.shape[1:]), y.dtype)

    def get(self, rows: np.ndarray) -> tuple[Any, Any]:
        """The samples ``rows`` (host indices), as arrays of the backend."""
        n = len(rows)
        if n > self.max_rows:  # larger than announced: new buffers, once queued work is done
            if self.asynchronous:
                self.backend.copy_stream.synchronize()
                self.backend.synchronize()
            self._alloc(n)
        if not self.asynchronous:
            np.take(self.x, rows, axis=0, out=self.bx[:n], mode="clip")
            np.take(self.y, rows, axis=0, out=self.by[:n], mode="clip")
            return self.bx[:n], self.by[:n]
        slot = next((s for s in self.slots if s is not self.current and s.rows is not None
                     and np.array_equal(s.rows, rows)), None)
        if slot is None:
            slot = self._other()
            self._upload(slot, rows)
        if self.current is not None:  # all work queued so far read the previous slot
            self.current.released.record(self.backend.stream())
        self.backend.stream().wait_event(slot.uploaded)
        self.current, slot.rows = slot, None
        self.device_rows = slot.dr[:n]
        return slot.dx[:n], slot.dy[:n]

    def prefetch(self, rows: np.ndarray | None) -> None:
        """Start moving ``rows`` to the device now (GPU only; a no-op on CPU)."""
        if not self.asynchronous or rows is None or len(rows) > self.max_rows:
            return
        self._upload(self._other(), rows)

    def close(self) -> None:
        """Nothing to release: the buffers go with the object."""

    def _other(self) -> _Slot:
        return self.slots[1] if self.current is self.slots[0] else self.slots[0]

    def _upload(self, slot: _Slot, rows: np.ndarray) -> None:
        n = len(rows)
        slot.uploaded.synchronize()  # the previous upload from this host buffer is done
        np.take(self.x, rows, axis=0, out=slot.hx[:n], mode="clip")
        np.take(self.y, rows, axis=0, out=slot.hy[:n], mode="clip")
        slot.hr[:n] = rows
        copy = self.backend.copy_stream
        copy.wait_event(slot.released)  # nothing queued still reads the device buffer
        if n:
            self.backend.copy_to_device_async(slot.hx[:n], slot.dx[:n], copy)
            self.backend.copy_to_device_async(slot.hy[:n], slot.dy[:n], copy)
            self.backend.copy_to_device_async(slot.hr[:n], slot.dr[:n], copy)
        slot.uploaded.record(copy)
        slot.rows = np.array(rows, copy=True)
