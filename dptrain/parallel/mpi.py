"""mpi4py on COMM_WORLD (or a given communicator), with buffer-based uppercase calls."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

import numpy as np

from .interface import Communicator, Request


class _MPIRequest(Request):
    def __init__(self, req: Any) -> None:
        self.req = req

    def wait(self) -> None:
        self.req.Wait()

    def test(self) -> bool:
        return bool(self.req.Test())


class MPIComm(Communicator):
    """The ranks of an MPI communicator; ``local`` is the sub-communicator of this node."""

    name = "mpi"

    def __init__(self, comm: Any = None) -> None:
        from mpi4py import MPI  # noqa: PLC0415  (only imported when MPI is used)

        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self.local.Get_rank()
        self.local_size = self.local.Get_size()
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

    def allreduce_sum(self, a: Any) -> Any:
        if self.size > 1:
            self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)
        return a

    def iallreduce_sum(self, a: Any) -> Request:
        if self.size == 1:
            return Request()
        return _MPIRequest(self.comm.Iallreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM))

    def bcast(self, a: Any, root: int = 0) -> Any:
        if self.size > 1:
            self.comm.Bcast(a, root=root)
        return a

    def allreduce_scalars(self, values: list[float] | np.ndarray, op: str = "sum") -> np.ndarray:
        buf = np.asarray(values, dtype=np.float64).copy()
        if self.size > 1:
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self._ops[op])
        return buf

    def bcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        n = np.array([len(data) if data is not None and self.rank == root else 0], np.int64)
        self.comm.Bcast(n, root=root)
        buf = (np.frombuffer(data or b"", np.uint8).copy() if self.rank == root
               else np.empty(int(n[0]), np.uint8))
        self.comm.Bcast(buf, root=root)
        return buf.tobytes()

    def barrier(self) -> None:
        self.comm.Barrier()

    def ibarrier(self) -> Request:
        return _MPIRequest(self.comm.Ibarrier())

    def abort(self, code: int = 1) -> None:
        # let the launcher forward this rank's last words before it tears the job down
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        time.sleep(0.3)
        self.comm.Abort(code)
