"""Checks GradSync and MPIComm under mpiexec; rank 0 prints one JSON object per check.

Each rank fills the gradient buffer with ``rank + 0.5 * i`` (exact in float32/64), runs
one synchronisation step (driving ``on_ready`` the way backward does), and compares the
result with the analytic sum over ranks. A counting wrapper around the communicator
records how many MPI calls each step makes and when they start.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import numpy as np

from dptrain.parallel.mpi import MPIComm
from dptrain.parallel.sync import GradSync


class CountingComm:
    """Delegates to an MPIComm and counts the gradient reductions it is asked for."""

    def __init__(self, inner: MPIComm) -> None:
        self.inner = inner
        self.rank, self.size = inner.rank, inner.size
        self.blocking = 0
        self.nonblocking = 0
        self.lengths: list[int] = []

    def allreduce_sum(self, a: Any) -> Any:
        self.blocking += 1
        self.lengths.append(a.size)
        return self.inner.allreduce_sum(a)

    def iallreduce_sum(self, a: Any) -> Any:
        self.nonblocking += 1
        self.lengths.append(a.size)
        return self.inner.iallreduce_sum(a)


def emit(comm: MPIComm, record: dict[str, Any]) -> None:
    if comm.rank == 0:
        print(json.dumps(record), flush=True)


def check_sync(comm: MPIComm, n: int, bucket_elems: int | None, bucket_bytes: int,
               overlap: bool, dtype: str, ready_every: int) -> None:
    """One GradSync step on an n-element buffer; records error and call counts."""
    counting = CountingComm(comm)
    grads = np.zeros(n, dtype)
    sync = GradSync(counting, grads, bucket_bytes=bucket_bytes, overlap=overlap)
    idx = np.arange(n, dtype=np.float64)
    expected = (sum(range(comm.size)) + comm.size * 0.5 * idx).astype(dtype)
    errors, early = [], []
    for step in range(2):  # two steps: start() must reset the state of the last one
        grads[...] = comm.rank + 0.5 * idx
        sync.start()
        launched_before_finish = []
        for offset in range(ready_every, n, ready_every):  # backward, layer by layer
            sync.on_ready(offset)
            launched_before_finish.append(
                (offset, counting.nonblocking + counting.blocking - step * len(sync.buckets)
                 if overlap else counting.blocking - step))
        # a buffer element must not be read before finish(); only now compare
        sync.finish()
        errors.append(float(np.max(np.abs(grads - expected))) if n else 0.0)
        early.append(launched_before_finish)
    err = comm.allreduce_scalars([max(errors)], "max")[0]
    emit(comm, {"check": "sync", "n": n, "bucket_elems": bucket_elems, "overlap": overlap,
                "dtype": dtype, "ready_every": ready_every, "max_abs_error": err,
                "buckets": sync.buckets, "calls_last_step": sync.calls,
                "blocking": counting.blocking, "nonblocking": counting.nonblocking,
                "lengths": counting.lengths, "launched_before_finish": early[-1]})


def check_comm(comm: MPIComm) -> None:
    """bcast_bytes, allreduce_scalars, bcast and the node-local ranks."""
    r = comm.rank
    got = {}
    for root in range(comm.size):
        payload = f"from {root}: \u00e9\x00 end".encode() * (root + 1) if r == root else None
        got[f"root{root}"] = comm.bcast_bytes(payload, root=root).decode()
    got["empty"] = comm.bcast_bytes(b"" if r == 0 else None).decode()
    got["root_none"] = comm.bcast_bytes(None).decode()
    got["non_root_data_ignored"] = comm.bcast_bytes(b"root" if r == 0 else b"other-rank").decode()
    vals = [float(r), -float(r), 10.0 + r]
    got["sum"] = comm.allreduce_scalars(vals, "sum").tolist()
    got["max"] = comm.allreduce_scalars(vals, "max").tolist()
    got["min"] = comm.allreduce_scalars(np.array(vals), "min").tolist()
    arr = np.full(5, float(r))
    comm.bcast(arr, root=comm.size - 1)
    got["bcast"] = arr.tolist()
    got["input_untouched"] = vals == [float(r), -float(r), 10.0 + r]
    got["local"] = [comm.local_rank, comm.local_size, socket.gethostname()]
    # every rank's view, gathered on rank 0 through the raw communicator
    views = comm.comm.gather(json.dumps(got, sort_keys=True), root=0)
    if r == 0:
        print(json.dumps({"check": "comm", "size": comm.size,
                          "views": [json.loads(v) for v in views]}), flush=True)


def main() -> None:
    comm = MPIComm()
    check_comm(comm)
    for dtype in ("float64", "float32"):
        item = np.dtype(dtype).itemsize
        for n in (1, 7, 100, 101):
            for elems in sorted({1, 7, n, n + 5}):
                for overlap in (True, False):
                    check_sync(comm, n, elems, elems * item, overlap, dtype, ready_every=3)
    # a bucket size in bytes that is not a multiple of the element size rounds down
    check_sync(comm, 50, None, 8 * 7 + 5, True, "float64", ready_every=10)
    # smaller than one element: still one element per bucket, never zero
    check_sync(comm, 9, None, 3, True, "float64", ready_every=1)
    # an empty buffer (a model without parameters) makes no call
    check_sync(comm, 0, None, 64, True, "float64", ready_every=1)
    check_sync(comm, 0, None, 64, False, "float64", ready_every=1)


if __name__ == "__main__":
    main()
