"""Memory shared by the ranks of one node (MPI shared-memory windows), for CPU arrays.

When every rank runs on one node, the node-shared placement (``parallel/placement.py``)
keeps its buffers here instead of one copy per rank:

- ``SharedGrads``: each rank's gradient buffer in a slot of its own, side by side. Rank k
  sums slice k of all slots, in rank order, so the bytes never depend on timing.
- ``NodeMemory.single``: one copy of the parameters and of the optimizer state for the
  whole node. Rank k's optimizer updates slice k, the slice whose sum it holds.

So a node holds one copy of the parameters and optimizer state, not one per rank; the
optimizer's work is split over the ranks; and the ranks of a node cannot drift apart,
since they read the same parameters. ``NodeMemory.fence`` (window sync, barrier, window
sync) separates the phases of a step: backward's writes, the sum, the update, the next
forward.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ..errors import UserError
from ..timeline import SYNC_TID
from .interface import Communicator
from .mpi import MPIComm
from .split import all_part_bounds

#: where MPICH and Open MPI keep the files behind shared-memory windows
SHM_DIR = "/dev/shm"


def shm_shortfall(comm: Communicator, nbytes: int) -> str:
    """Why ``nbytes`` of shared memory may not fit in this node's ``/dev/shm`` (agreed by
    every rank), or "" when it fits. A window larger than the free space is created anyway
    and its ranks die of SIGBUS on first touch (a container's default /dev/shm is 64 MiB)."""
    try:
        st = os.statvfs(SHM_DIR)
        free = st.f_bavail * st.f_frsize
    except OSError:  # no /dev/shm here: nothing to check
        free = float("inf")
    free = float(comm.allreduce_scalars([min(free, 2.0**62)], "min")[0])
    if free >= nbytes * 1.1 + comm.size * (4 << 20):  # MPICH's own: ~1 MiB per rank
        return ""
    return (f"{SHM_DIR} has {free / 2**20:,.0f} MiB free, and memory shared by the ranks of "
            f"this node needs {nbytes / 2**20:,.0f} MiB")


class NodeMemory:
    """MPI shared-memory windows over the ranks of this node, and the fence between uses."""

    def __init__(self, comm: MPIComm) -> None:
        self.MPI, self.local = comm.MPI, comm.local
        self.rank, self.size = self.local.Get_rank(), self.local.Get_size()
        self.windows: list[Any] = []

    def _window(self, nbytes: int, itemsize: int, what: str) -> Any:
        try:
            win = self.MPI.Win.Allocate_shared(nbytes, itemsize, comm=self.local)
        except self.MPI.Exception as e:
            raise UserError(
                f"could not allocate {nbytes / 2**20:.1f} MiB of memory shared by the ranks of "
                f"this node for the {what} ({e.Get_error_string()}); is /dev/shm too small? "
                "Run with --no-shared-memory-sync") from None
        win.Lock_all()  # a passive-target epoch, so that Sync() orders memory
        self.windows.append(win)
        return win

    def slots(self, n: int, dtype: Any, what: str = "gradients") -> list[np.ndarray]:
        """One array of ``n`` per rank, each starting on a cache line (contents undefined)."""
        dtype = np.dtype(dtype)
        padded = -(-n * dtype.itemsize // 64) * 64
        win = self._window(padded, dtype.itemsize, f"{self.size} x {what}")
        return [np.ndarray(buffer=win.Shared_query(k)[0], dtype=dtype, shape=(n,))
                for k in range(self.size)]

    def single(self, n: int, dtype: Any, what: str) -> np.ndarray:
        """One array of ``n`` for the whole node (contents undefined). Memory pages go to
        the NUMA node of the core that first writes them: let each rank fill the slice it
        will update, then ``fence()``."""
        dtype = np.dtype(dtype)
        win = self._window(n * dtype.itemsize if self.rank == 0 else 0, dtype.itemsize, what)
        return np.ndarray(buffer=win.Shared_query(0)[0], dtype=dtype, shape=(n,))

    def fence(self) -> None:
        """Every rank's writes so far are seen by every rank after this (collective)."""
        for w in self.windows:
            w.Sync()
        self.local.Barrier()
        for w in self.windows:
            w.Sync()

    def close(self) -> None:
        """Free the windows (collective: every rank of the node calls it)."""
        for w in self.windows:
            w.Unlock_all()
            w.Free()
        self.windows = []


class SharedGrads:
    """The flat gradient buffers of all ranks of one node, side by side in shared memory.

    Rank r's model writes its gradients into ``mine`` (slot r). ``allreduce()`` sums slice
    k (``chunks[k]``) over the slots in rank order on rank k. Then either rank k writes
    that sum into slice k of every slot, so that every rank ends with the same bytes
    (pushing the sum while it is hot in the summing core's cache costs half of having each
    rank pull the others' slices after a third fence: 0.21 against 0.50 ms for the 2.1 MB
    of the mlp preset on 2 ranks), or, with ``own_slice_only``, only slice k of rank k's
    slot holds the sum, for an update of rank k's slice of a ``NodeMemory.single`` copy.
    """

    def __init__(self, memory: NodeMemory, n: int, dtype: Any,
                 own_slice_only: bool = False) -> None:
        self.memory = memory
        self.rank, self.size = memory.rank, memory.size
        self.slots = memory.slots(n, dtype)
        self.mine = self.slots[self.rank]
        self.mine.fill(0)
        self.chunks = all_part_bounds(n, self.size)
        self.own = self.chunks[self.rank]
        self.own_slice_only = own_slice_only
        s, e = self.own
        self._acc = np.empty(e - s, dtype) if self.size > 2 else None

    @staticmethod
    def applies(comm: Communicator, grads: Any) -> bool:
        """False where shared memory cannot help: one rank, ranks on several nodes, a
        communicator that is not MPI, or non-NumPy arrays."""
        return (isinstance(comm, MPIComm) and comm.size > 1 and comm.local_size == comm.size
                and isinstance(grads, np.ndarray) and grads.size > 0)

    @classmethod
    def create(cls, comm: Communicator, grads: Any,
               own_slice_only: bool = False) -> SharedGrads | None:
        """Slots for ``grads``'s size and type, or None where they do not apply."""
        if not cls.applies(comm, grads):
            return None
        assert isinstance(comm, MPIComm)
        return cls(NodeMemory(comm), grads.size, grads.dtype, own_slice_only)

    def allreduce(self) -> None:
        """Sum the slots. Afterwards ``mine`` holds the sum on every rank; with
        ``own_slice_only``, ``mine[slice(*own)]`` does, and the other ranks may still be
        reading this rank's slot until the caller's next ``memory.fence()``."""
        slots, mine = self.slots, self.mine
        s, e = self.own
        self.memory.fence()  # every rank's gradients are written
        if self._acc is None:  # two ranks: the sum may land on one of its own operands
            total = np.add(slots[0][s:e], slots[1][s:e], out=mine[s:e])
        else:
            total = np.add(slots[0][s:e], slots[1][s:e], out=self._acc)
            for k in range(2, self.size):
                total += slots[k][s:e]
            mine[s:e] = total
        if self.own_slice_only:
            return
        for k, slot in enumerate(slots):  # slice k of any slot is written by rank k alone
            if k != self.rank:
                slot[s:e] = total
        self.memory.fence()  # every slice is pushed; nobody reads another slot until the next

    def close(self) -> None:
        """Free the shared memory (collective: every rank of the node calls it)."""
        self.memory.close()


class SharedSum:
    """The gradient sum of ranks that share a node, behind GradSync's three calls: nothing
    starts during backward; ``finish()`` sums this rank's slice over every rank's slot."""

    def __init__(self, grads: SharedGrads, timeline: Any = None) -> None:
        self.grads = grads
        self.buckets = [(0, grads.mine.size)]  # one "bucket": the whole buffer at once
        self.calls = 0
        self.wait_seconds = 0.0
        self.timeline = timeline if timeline is not None and timeline.enabled else None

    def start(self) -> None:
        self.calls = 0

    def on_ready(self, offset: int) -> None:
        """Nothing to start early: the slots are summed once every rank has written."""

    def finish(self) -> None:
        t0 = time.perf_counter()
        self.grads.allreduce()
        self.calls = 1
        t1 = time.perf_counter()
        if self.timeline is not None:
            self.timeline.add("allreduce (shared memory)", t0, t1, cat="comm", tid=SYNC_TID,
                              bytes=self.grads.mine.nbytes, elements=[0, self.grads.mine.size])
        self.wait_seconds = t1 - t0


class NodeArrays:
    """Arrays the ranks of a node read but never write (the training data), one copy per
    node: every rank of the node allocates them together (``alloc``, in the same order),
    the node's local rank 0 fills them (``fill``), and ``fence()`` publishes its writes.
    Across nodes each node holds its own copy."""

    def __init__(self, comm: MPIComm) -> None:
        self.memory = NodeMemory(comm)
        self.fill = self.memory.rank == 0

    @staticmethod
    def applies(comm: Communicator) -> bool:
        """MPI with more than one rank: the same answer on every rank, as the collective
        allocation needs (a node with one rank holds a window of its own)."""
        return isinstance(comm, MPIComm) and comm.size > 1

    def alloc(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An array of ``shape`` that every rank of the node sees (contents undefined)."""
        n = int(np.prod(shape, dtype=np.int64))
        return self.memory.single(max(n, 1), dtype, "training data")[:n].reshape(shape)

    def fence(self) -> None:
        """The filler's writes are seen by every rank of the node after this."""
        self.memory.fence()
