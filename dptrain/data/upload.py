"""Batches on the GPU: a host batch source's output uploaded on a copy stream, two slots.

Each slot is a pinned host buffer and a device buffer for (x, y) and the sample indices
(dropout reads them on the device). ``prefetch(rows, epoch)`` has the host source write
the next batch (read, decoded, augmented, normalised) straight into one slot's pinned
buffers and queues its upload on the copy stream, while the GPU still computes on the
other slot; ``get`` with those rows then only makes the compute stream wait for the
upload. CUDA events keep the reuse safe: a slot's device buffer is refilled only after
the work queued on it has run, and its host buffer only after its upload has finished.
Per batch three copies cross to the device (x, y, the indices), nothing comes back.

On the CPU the host source is the step's source itself: no copy at all.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..backend import Backend


class _Slot:
    """One pinned host buffer and one device buffer for (x, y, rows), with their events."""

    def __init__(self, backend: Backend, sample: tuple[int, ...], xdt: np.dtype,
                 yshape: tuple[int, ...], ydt: np.dtype, rows: int) -> None:
        xp = backend.xp
        self.hx = backend.pinned_empty((rows, *sample), xdt)
        self.hy = backend.pinned_empty((rows, *yshape), ydt)
        self.hr = backend.pinned_empty(rows, np.int64)  # the sample indices (for dropout)
        self.dx = xp.empty(self.hx.shape, dtype=xdt)
        self.dy = xp.empty(self.hy.shape, dtype=ydt)
        self.dr = xp.empty(rows, dtype=np.int64)
        self.uploaded = backend.event()  # the host buffer is free once this has passed
        self.released = backend.event()  # the device buffer is free once this has passed
        self.key: tuple[bytes, int] | None = None


class DeviceBatches:
    """A ``BatchSource`` on the GPU over a host one (``read_into``, ``sample_shape``,
    ``transform``, ``y``), double-buffered.

    ``prefetch`` does the host work now, in the caller's thread, while the GPU computes
    the work queued before it; with ``asynchronous=False`` nothing is prepared early and
    ``get`` does it all."""

    def __init__(self, backend: Backend, host: Any, max_rows: int, *,
                 asynchronous: bool = True) -> None:
        self.backend, self.host = backend, host
        self.asynchronous = asynchronous
        #: the rows of the last ``get`` on the device
        self.device_rows: Any = None
        #: seconds the last ``get`` spent preparing and queueing its batch
        self.data_wait_seconds = 0.0
        self.total_wait_seconds = 0.0
        self._shape, self._xdt = tuple(host.sample_shape), np.dtype(host.transform.dtype)
        self._ydt, self._yshape = host.y.dtype, tuple(host.y.shape[1:])
        self._alloc(max(int(max_rows), 1))

    def __len__(self) -> int:
        return len(self.host)

    def _alloc(self, rows: int) -> None:
        self.max_rows = rows
        self.slots = [_Slot(self.backend, self._shape, self._xdt, self._yshape, self._ydt,
                            rows) for _ in range(2)]
        self.current: _Slot | None = None

    @staticmethod
    def _key(rows: np.ndarray, epoch: int) -> tuple[bytes, int]:
        return np.ascontiguousarray(rows, dtype=np.int64).tobytes(), int(epoch)

    def get(self, rows: np.ndarray, epoch: int) -> tuple[Any, Any]:
        """(x, y) of ``rows`` in ``epoch`` on the device, valid until the next ``get``."""
        t0 = time.perf_counter()
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        if n > self.max_rows:  # larger than announced: new buffers, once queued work is done
            self.backend.copy_stream.synchronize()
            self.backend.synchronize()
            self._alloc(n)
        key = self._key(rows, epoch)
        slot = next((s for s in self.slots if s is not self.current and s.key == key), None)
        if slot is None:
            slot = self._other()
            self._upload(slot, rows, epoch)
        if self.current is not None:  # all work queued so far read the previous slot
            self.current.released.record(self.backend.stream())
        self.backend.stream().wait_event(slot.uploaded)
        self.current, slot.key = slot, None
        self.device_rows = slot.dr[:n]
        self.data_wait_seconds = time.perf_counter() - t0
        self.total_wait_seconds += self.data_wait_seconds
        return slot.dx[:n], slot.dy[:n]

    def prefetch(self, rows: np.ndarray, epoch: int) -> None:
        """Prepare ``rows`` of ``epoch`` now and start their upload."""
        rows = np.asarray(rows, dtype=np.int64)
        if not self.asynchronous or len(rows) > self.max_rows:
            return
        self._upload(self._other(), rows, epoch)

    def read_into(self, rows: np.ndarray, epoch: int, x_out: np.ndarray,
                  y_out: np.ndarray) -> None:
        """The host batch, as the host source makes it (no device involved)."""
        self.host.read_into(rows, epoch, x_out, y_out)

    def close(self) -> None:
        """Stop the host source; the device buffers go with the object."""
        self.host.close()

    def _other(self) -> _Slot:
        return self.slots[1] if self.current is self.slots[0] else self.slots[0]

    def _upload(self, slot: _Slot, rows: np.ndarray, epoch: int) -> None:
        n = len(rows)
        slot.uploaded.synchronize()  # the previous upload from this host buffer is done
        self.host.read_into(rows, epoch, slot.hx, slot.hy)
        slot.hr[:n] = rows
        copy = self.backend.copy_stream
        copy.wait_event(slot.released)  # nothing queued still reads the device buffer
        if n:
            self.backend.copy_to_device_async(slot.hx[:n], slot.dx[:n], copy)
            self.backend.copy_to_device_async(slot.hy[:n], slot.dy[:n], copy)
            self.backend.copy_to_device_async(slot.hr[:n], slot.dr[:n], copy)
        slot.uploaded.record(copy)
        slot.key = self._key(rows, epoch)
