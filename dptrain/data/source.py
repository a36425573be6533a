"""Per-rank batch sources: the host arrays of a rank's rows of each global batch.

A source is a row reader (stored inputs of given global rows: an array in memory, or an
HDF5 split streamed from disk), the labels, and the one ``BatchTransform`` (decode,
augment for (seed, epoch, row), normalise). Both readers run the same transform, so for
the same rows and epoch the in-memory and the streamed source return the same bytes,
and the bytes of a sample do not depend on which rank or batch asks for it.

``prefetch(rows, epoch)`` starts reading, decoding and augmenting the next batch in a
background thread while the caller computes; ``get`` with the same rows then waits only
for what is left (``data_wait_seconds``). Two buffer slots alternate: the arrays ``get``
returns stay valid until the next ``get``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from .transform import BatchTransform

Alloc = Callable[[tuple[int, ...], Any], np.ndarray]


class BatchSource(Protocol):
    """What the training step asks of its data."""

    data_wait_seconds: float
    #: the rows of the last ``get`` on the device (None where batches stay on the host)
    device_rows: Any

    def __len__(self) -> int: ...

    def get(self, rows: np.ndarray, epoch: int) -> tuple[Any, Any]:
        """Arrays (x, y) for global sample indices ``rows``, in that order."""
        ...

    def prefetch(self, rows: np.ndarray, epoch: int) -> None:
        """Start the ``get`` of these rows now."""
        ...

    def read_into(self, rows: np.ndarray, epoch: int, x_out: np.ndarray,
                  y_out: np.ndarray) -> None:
        """What ``get`` returns, written now into ``x_out[:n]``, ``y_out[:n]`` (buffers of
        the caller's, e.g. pinned memory for an upload)."""
        ...

    def close(self) -> None:
        """Stop the background work and release files."""
        ...


class RowReader(Protocol):
    """Stored inputs of global rows (the part of a source that differs by storage)."""

    sample_shape: tuple[int, ...]
    dtype: np.dtype

    def __len__(self) -> int: ...

    def read(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Stored rows ``rows`` into ``out[:len(rows)]`` in that order; returns that view."""
        ...


class ArrayRows:
    """Rows of an array in memory (a rank's own, or a node's shared copy)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.sample_shape = tuple(int(d) for d in x.shape[1:])
        self.dtype = np.dtype(x.dtype)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def read(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        dest = out[:len(rows)]
        np.take(self.x, rows, axis=0, out=dest, mode="clip")  # bounds checked by the source
        return dest


class _Slot:
    def __init__(self, reader: RowReader, y: np.ndarray, dtype: np.dtype, rows: int,
                 alloc: Alloc) -> None:
        self.raw = np.empty((rows, *reader.sample_shape), reader.dtype)
        self.x = alloc((rows, *reader.sample_shape), dtype)
        self.y = alloc((rows, *y.shape[1:]), y.dtype)


class RowSource:
    """A ``BatchSource`` over any ``RowReader``: read, transform, prefetch in a thread."""

    def __init__(self, reader: RowReader, y: np.ndarray, transform: BatchTransform,
                 max_rows: int, *, training: bool = True, background: bool = True,
                 alloc: Alloc | None = None) -> None:
        if len(y) != len(reader):
            raise ValueError(f"{len(reader)} inputs but {len(y)} labels")
        self.reader, self.transform, self.training = reader, transform, training
        self.y = y if y.ndim == 1 else np.ascontiguousarray(y, dtype=transform.dtype)
        self._alloc: Alloc = alloc or (lambda shape, dtype: np.empty(shape, dtype))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dptrain-data") \
            if background else None
        self._pending: tuple[_Slot, tuple[bytes, int], Future[None]] | None = None
        self._current: _Slot | None = None
        self._raw = np.empty((0, *reader.sample_shape), reader.dtype)  # for read_into
        #: batches stay on the host
        self.device_rows = None
        #: seconds the last ``get`` blocked waiting for its data
        self.data_wait_seconds = 0.0
        #: seconds all ``get`` calls so far blocked
        self.total_wait_seconds = 0.0
        self._grow(max(int(max_rows), 1))

    def _grow(self, rows: int) -> None:
        self.max_rows = rows
        self.slots = [_Slot(self.reader, self.y, self.transform.dtype, rows, self._alloc)
                      for _ in range(2)]
        self._current = None

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.reader.sample_shape)

    @staticmethod
    def _key(rows: np.ndarray, epoch: int) -> tuple[bytes, int]:
        return np.ascontiguousarray(rows, dtype=np.int64).tobytes(), int(epoch)

    def _check(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"rows must be one-dimensional, got shape {rows.shape}")
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(self.reader)):
            raise IndexError(f"row out of range 0..{len(self.reader) - 1}")
        return rows

    def _fill(self, slot: _Slot, rows: np.ndarray, epoch: int) -> None:
        n = len(rows)
        raw = self.reader.read(rows, slot.raw)
        self.transform(raw, rows, epoch, self.training, out=slot.x[:n])
        np.take(self.y, rows, axis=0, out=slot.y[:n], mode="clip")

    def _other(self) -> _Slot:
        return self.slots[1] if self._current is self.slots[0] else self.slots[0]

    def _settle(self) -> None:
        """Wait for the background job, if any, and drop it (a failed read is re-raised by
        the ``get`` that asks for its rows, which reads them again)."""
        job, self._pending = self._pending, None
        if job is not None:
            with contextlib.suppress(Exception):
                job[2].result()

    def prefetch(self, rows: np.ndarray, epoch: int) -> None:
        """Start reading and transforming ``rows`` of ``epoch`` in the background."""
        rows = self._check(rows)
        if self._pool is None or len(rows) > self.max_rows:
            return
        key = self._key(rows, epoch)
        if self._pending is not None:
            if self._pending[1] == key:
                return
            self._settle()
        slot = self._other()
        fut = self._pool.submit(self._fill, slot, rows.copy(), int(epoch))
        self._pending = (slot, key, fut)

    def get(self, rows: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of ``rows`` in ``epoch``: decoded, augmented (when training), normalised."""
        t0 = time.perf_counter()
        rows = self._check(rows)
        n = len(rows)
        key = self._key(rows, epoch)
        job = self._pending
        if job is not None and job[1] == key:
            self._pending = None
            job[2].result()  # a failed read raises here, in the caller's thread
            slot = job[0]
        else:
            self._settle()
            if n > self.max_rows:
                self._grow(n)
            slot = self._other()
            self._fill(slot, rows, epoch)
        self._current = slot
        self.data_wait_seconds = time.perf_counter() - t0
        self.total_wait_seconds += self.data_wait_seconds
        return slot.x[:n], slot.y[:n]

    def read_into(self, rows: np.ndarray, epoch: int, x_out: np.ndarray,
                  y_out: np.ndarray) -> None:
        """``get``'s arrays written into ``x_out[:n]`` and ``y_out[:n]``, in this thread."""
        rows = self._check(rows)
        n = len(rows)
        self._settle()
        if len(self._raw) < n:
            self._raw = np.empty((n, *self.reader.sample_shape), self.reader.dtype)
        raw = self.reader.read(rows, self._raw)
        self.transform(raw, rows, epoch, self.training, out=x_out[:n])
        np.take(self.y, rows, axis=0, out=y_out[:n], mode="clip")

    def close(self) -> None:
        """Finish the background job and stop the thread; close the reader's files."""
        self._settle()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        close = getattr(self.reader, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> RowSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def memory_source(x: np.ndarray, y: np.ndarray, transform: BatchTransform, max_rows: int,
                  **kw: Any) -> RowSource:
    """A source over arrays in memory (stored values, e.g. uint8, or already decoded)."""
    return RowSource(ArrayRows(x), y, transform, max_rows, **kw)


def stream_source(source: Any, transform: BatchTransform, max_rows: int,
                  split: str = "train", **kw: Any) -> RowSource:
    """A source that streams ``split`` of an HDF5 file or directory of shards."""
    from .h5rows import H5Rows  # noqa: PLC0415

    rows = H5Rows(source, split)
    try:
        return RowSource(rows, rows.y, transform, max_rows, **kw)
    except BaseException:
        rows.close()
        raise
