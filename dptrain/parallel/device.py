"""Collectives on device (CuPy) arrays over a host communicator.

``DeviceComm`` wraps an MPI communicator for a GPU backend and takes device arrays in
``allreduce_sum``, ``iallreduce_sum`` and ``bcast`` (host arrays go straight through):

- CUDA-aware MPI (``direct``): the device buffer itself goes to mpi4py, which reads its
  ``__cuda_array_interface__``, after the stream that wrote it has finished.
- Otherwise (``staged``): each buffer is copied into a slice of one pinned host buffer
  on a copy stream, reduced there by MPI, and copied back on the compute stream, so
  device memory never reaches an MPI that cannot read it.

A non-blocking reduction is queued when its bucket is ready and handed to MPI as soon as
its data is (checked without blocking at each later call), so backward keeps running.
Every rank starts its MPI operations in the same order: queued buckets first, in order,
before any other collective. ``NcclComm`` in parallel/nccl.py replaces the MPI part with NCCL.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections import deque
from typing import Any

import numpy as np

from ..backend import Backend
from ..errors import UserError
from .interface import Communicator, Request

_ALIGN = 256


def query_mpi_cuda_support() -> bool | None:
    """What the MPI library says about CUDA support (None when it cannot say).

    mpi4py's ``MPI.Query_cuda_support()`` where it exists, else the ``MPIX_Query_cuda_support``
    extension (Open MPI, MPICH >= 4) looked up in the already loaded MPI library.
    """
    from mpi4py import MPI  # noqa: PLC0415

    query = getattr(MPI, "Query_cuda_support", None)
    if query is not None:
        return bool(query())
    try:
        with open("/proc/self/maps") as f:
            libs = {m.group(0) for m in re.finditer(r"/\S*/libmpi[^/\s]*\.so[^/\s]*", f.read())}
    except OSError:
        return None
    for path in sorted(libs):
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
            fn = lib.MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        return bool(fn())
    return None


def mpi_takes_device_buffers(setting: str) -> tuple[bool, str]:
    """(hand device buffers to MPI?, why) for ``gpu_aware_mpi`` = auto | on | off."""
    if setting not in ("auto", "on", "off"):
        raise UserError(f"gpu_aware_mpi must be auto, on or off, not {setting!r}")
    if setting == "off":
        return False, "staged through pinned host memory (--gpu-aware-mpi off)"
    reported = query_mpi_cuda_support()
    if setting == "on":
        if reported is False:
            raise UserError("--gpu-aware-mpi on, but the MPI library reports no CUDA support "
                            "(MPIX_Query_cuda_support() = 0); passing it device memory would "
                            "crash: use --gpu-aware-mpi auto or off")
        return True, "CUDA-aware MPI (--gpu-aware-mpi on)"
    if reported:
        return True, "CUDA-aware MPI (reported by the MPI library)"
    hint = os.environ.get("MPICH_GPU_SUPPORT_ENABLED") == "1" or \
        os.environ.get("MV2_USE_CUDA") == "1"
    if reported is None and hint:
        return True, "CUDA-aware MPI (MPICH_GPU_SUPPORT_ENABLED / MV2_USE_CUDA)"
    return False, "staged through pinned host memory (MPI not known to be CUDA-aware)"


class PinnedArena:
    """One pinned host buffer, handed out in aligned slices and reset when idle.

    A slice that does not fit gets its own block for now; the next reset grows the
    buffer to the peak, so a steady loop uses one allocation.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.buf: np.ndarray | None = None
        self.used = 0
        self.peak = 0

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        start = -(-self.used // _ALIGN) * _ALIGN
        end = start + nbytes
        self.used = end
        self.peak = max(self.peak, end)
        if self.buf is None or end > self.buf.size:
            return self.backend.pinned_empty(shape, dt)
        return self.buf[start:end].view(dt).reshape(shape)

    def reset(self) -> None:
        if self.peak and (self.buf is None or self.peak > self.buf.size):
            self.buf = self.backend.pinned_empty(-(-self.peak // _ALIGN) * _ALIGN, np.uint8)
        self.used = 0


class _Transfer:
    """One non-blocking reduction of a device buffer on its way through MPI."""

    __slots__ = ("dev", "host", "ready", "req", "done")

    def __init__(self, dev: Any) -> None:
        self.dev, self.host, self.ready, self.req, self.done = dev, None, None, None, False


class _DeviceRequest(Request):
    def __init__(self, comm: DeviceComm, t: _Transfer) -> None:
        self.comm, self.t = comm, t

    def wait(self) -> None:
        self.comm._complete(self.t)

    def test(self) -> bool:
        t = self.t
        if not t.done and t.req is None:
            self.comm._poll()
        if not t.done and t.req is not None and t.req.test():
            self.comm._complete(t)  # MPI is done: only the copy back is queued
        return t.done


def _is_host(a: Any) -> bool:
    return isinstance(a, np.ndarray)


class DeviceComm(Communicator):
    """A communicator whose reductions and broadcasts also take device arrays."""

    def __init__(self, inner: Communicator, backend: Backend, direct: bool,
                 why: str = "") -> None:
        self.inner, self.backend, self.direct = inner, backend, direct
        self.rank, self.size = inner.rank, inner.size
        self.local_rank, self.local_size = inner.local_rank, inner.local_size
        self.hostname, self.name = inner.hostname, inner.name
        self.transport = why or ("CUDA-aware MPI" if direct else "staged through pinned memory")
        self.arena = PinnedArena(backend)
        self._queue: deque[_Transfer] = deque()  # waiting for their data, not yet in MPI
        self._open = 0                            # started, not yet completed

    # -- device arrays ---------------------------------------------------------------------
    def allreduce_sum(self, a: Any) -> Any:
        self._start_all()
        if _is_host(a) or self.size == 1:
            return self.inner.allreduce_sum(a)
        if a.size == 0:  # the same on every rank: nothing to send
            return a
        if self.direct:
            self.backend.stream().synchronize()  # MPI does not know CuPy's stream
            return self.inner.allreduce_sum(a)
        if not a.flags.c_contiguous:
            a[...] = self.allreduce_sum(self.backend.xp.ascontiguousarray(a))
            return a
        host = self.arena.take(a.shape, a.dtype)
        a.get(out=host)                          # waits for the stream that wrote ``a``
        self.inner.allreduce_sum(host)
        self.backend.copy_to_device_async(host, a, self.backend.stream())
        self._release()
        return a

    def iallreduce_sum(self, a: Any) -> Request:
        if _is_host(a) or self.size == 1:
            self._start_all()
            return self.inner.iallreduce_sum(a)
        if a.size == 0:
            return Request()
        t = _Transfer(a)
        if self.direct:
            t.ready = self.backend.event()
        else:
            t.host = self.arena.take(a.shape, a.dtype)
            copy = self.backend.copy_stream
            copy.wait_event(self.backend.event())  # the bucket's gradients are queued
            self.backend.copy_to_host_async(a, t.host, copy)
            t.ready = self.backend.xp.cuda.Event(disable_timing=True)
            t.ready.record(copy)
        self._queue.append(t)
        self._open += 1
        self._poll()
        return _DeviceRequest(self, t)

    def bcast(self, a: Any, root: int = 0) -> Any:
        self._start_all()
        if _is_host(a) or self.size == 1:
            return self.inner.bcast(a, root)
        if a.size == 0:
            return a
        if self.direct:
            self.backend.stream().synchronize()
            return self.inner.bcast(a, root)
        host = self.backend.to_host(a)
        self.inner.bcast(host, root)
        a.set(host)
        return a

    # -- host operations: queued buckets go first, so every rank keeps one order -----------
    def allreduce_scalars(self, values: Any, op: str = "sum") -> np.ndarray:
        self._start_all()
        return self.inner.allreduce_scalars(values, op)

    def bcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        self._start_all()
        return self.inner.bcast_bytes(data, root)

    def barrier(self) -> None:
        self._start_all()
        self.inner.barrier()

    def ibarrier(self) -> Request:
        self._start_all()
        return self.inner.ibarrier()

    def abort(self, code: int = 1) -> None:
        self.inner.abort(code)

    # -- the queue -------------------------------------------------------------------------
    def _start(self, t: _Transfer) -> None:
        t.req = self.inner.iallreduce_sum(t.dev if self.direct else t.host)

    def _poll(self) -> None:
        """Hand to MPI, in order, the queued buffers whose data is ready (no blocking)."""
        while self._queue and self._queue[0].ready.done:
            self._start(self._queue.popleft())

    def _start_all(self, upto: _Transfer | None = None) -> None:
        """Hand every queued buffer to MPI (up to ``upto``), waiting for their data."""
        while self._queue:
            t = self._queue.popleft()
            t.ready.synchronize()
            self._start(t)
            if t is upto:
                break

    def _complete(self, t: _Transfer) -> None:
        if t.done:
            return
        if t.req is None:
            self._start_all(upto=t)
        t.req.wait()
        if not self.direct:
            self.backend.copy_to_device_async(t.host, t.dev, self.backend.stream())
        t.done = True
        self._open -= 1
        self._release()

    def _release(self) -> None:
        """Recycle the staging buffer once nothing is in flight.

        Safe: a slice is next written by a device-to-host copy queued after the
        host-to-device copy that last read it (same stream, or an event on it).
        """
        if self._open == 0 and not self._queue:
            self.arena.reset()
