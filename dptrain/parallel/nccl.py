"""``--comm nccl``: device-array reductions through NCCL (``cupy.cuda.nccl``), MPI for the rest.

Rank 0 makes the NCCL unique id and broadcasts it over MPI. Every NCCL operation runs on
one communication stream, in the order the host issues it (NCCL's rule for one
communicator); a non-blocking reduction waits on the compute stream for its bucket and
``wait()`` makes the compute stream wait for the result, without blocking the host.
Host arrays, scalars and bytes still go through MPI.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import Backend
from ..errors import UserError
from .device import DeviceComm
from .interface import Communicator, Request


def encode_unique_id(uid: Any) -> bytes:
    """NCCL's unique id (a tuple of C chars, -128..127) as bytes for a broadcast."""
    return bytes(int(v) % 256 for v in uid)


def decode_unique_id(data: bytes) -> tuple[int, ...]:
    """The inverse of ``encode_unique_id``."""
    return tuple(b - 256 if b >= 128 else b for b in data)


class _NcclRequest(Request):
    def __init__(self, done: Any, backend: Backend) -> None:
        self.done, self.backend = done, backend

    def wait(self) -> None:
        self.backend.stream().wait_event(self.done)

    def test(self) -> bool:
        if not self.done.done:
            return False
        self.wait()
        return True


class NcclComm(DeviceComm):
    """Device arrays through NCCL on a communication stream; everything else through MPI."""

    def __init__(self, inner: Communicator, backend: Backend) -> None:
        super().__init__(inner, backend, direct=True, why="NCCL")
        try:
            from cupy.cuda import nccl  # noqa: PLC0415
            ok = getattr(nccl, "available", True)
        except Exception:
            ok = False
        if not ok:
            raise UserError("--comm nccl: CuPy cannot load NCCL (pip install nvidia-nccl-cu12, "
                            "or cu13); or use --comm mpi")
        self.nccl = nccl
        uid = encode_unique_id(nccl.get_unique_id()) if inner.rank == 0 else None
        uid = decode_unique_id(inner.bcast_bytes(uid))
        self.nc = nccl.NcclCommunicator(inner.size, uid, inner.rank)
        self.stream = backend.xp.cuda.Stream(non_blocking=True)
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                       np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.int64): nccl.NCCL_INT64}

    def _issue(self, a: Any, op: str, root: int = 0) -> Any:
        """Queue one NCCL operation on ``a`` after the compute stream's work; its event."""
        if not a.flags.c_contiguous or a.dtype not in self._types:
            raise ValueError(f"NCCL needs a contiguous float32/float64/int64 array, not "
                             f"{a.dtype} {'strided' if not a.flags.c_contiguous else ''}")
        self.stream.wait_event(self.backend.event())
        ptr, n, t, s = a.data.ptr, a.size, self._types[a.dtype], self.stream.ptr
        if op == "sum":
            self.nc.allReduce(ptr, ptr, n, t, self.nccl.NCCL_SUM, s)
        else:
            self.nc.bcast(ptr, n, t, root, s)
        done = self.backend.xp.cuda.Event(disable_timing=True)
        done.record(self.stream)
        return done

    def allreduce_sum(self, a: Any) -> Any:
        if isinstance(a, np.ndarray) or self.size == 1:
            return self.inner.allreduce_sum(a)
        self.backend.stream().wait_event(self._issue(a, "sum"))
        return a

    def iallreduce_sum(self, a: Any) -> Request:
        if isinstance(a, np.ndarray) or self.size == 1:
            return self.inner.iallreduce_sum(a)
        return _NcclRequest(self._issue(a, "sum"), self.backend)

    def bcast(self, a: Any, root: int = 0) -> Any:
        if isinstance(a, np.ndarray) or self.size == 1:
            return self.inner.bcast(a, root)
        self.backend.stream().wait_event(self._issue(a, "bcast", root))
        return a
