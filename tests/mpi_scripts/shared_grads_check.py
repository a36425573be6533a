"""Checks the shared-memory gradient sum (SharedGrads through SharedSum) under mpiexec.

Each rank writes ``rank + 0.5 * i`` (plus an odd fraction that makes float32 rounding
depend on the order of the sum) into its slot of the window, over three steps; rank 0
prints one JSON object per case: the largest error against the exact sum, whether every
rank holds the same bytes, and what the timeline recorded.
"""

from __future__ import annotations

import json
import zlib

import numpy as np

from dptrain.parallel.mpi import MPIComm
from dptrain.parallel.shared import SharedGrads, SharedSum
from dptrain.timeline import Timeline


def check(comm: MPIComm, n: int, dtype: str) -> None:
    template = np.zeros(n, dtype)
    shared = SharedGrads.create(comm, template)
    assert shared is not None
    grads = shared.mine
    tl = Timeline(True, comm.rank)
    sync = SharedSum(shared, tl)
    idx = np.arange(n, dtype=np.float64)
    errors, crcs = [], []
    for step in range(3):  # the next step's writes must not race the last step's reads
        mine = comm.rank + 0.5 * idx + step + (comm.rank + 1) / 3
        grads[...] = mine
        sync.start()
        for offset in range(0, n, 7):
            sync.on_ready(offset)  # nothing to launch: the sum waits for finish()
        sync.finish()
        exact = sum(r + 0.5 * idx + step + (r + 1) / 3 for r in range(comm.size))
        errors.append(float(np.max(np.abs(grads - exact) / np.maximum(np.abs(exact), 1))))
        crcs.append(zlib.crc32(grads.tobytes()))
    shared.close()
    # each rank's own slice only (for an update of a node's one shared copy)
    own = SharedGrads.create(comm, template, own_slice_only=True)
    assert own is not None
    lo, hi = own.own
    own_errors = []
    for step in range(3):
        own.mine[...] = comm.rank + 0.5 * idx + step + (comm.rank + 1) / 3
        own.allreduce()
        exact = sum(r + 0.5 * idx + step + (r + 1) / 3 for r in range(comm.size))
        got = own.mine[lo:hi]
        own_errors.append(float(np.max(np.abs(got - exact[lo:hi]) / np.maximum(
            np.abs(exact[lo:hi]), 1), initial=0.0)))
        own.memory.fence()  # the others are done reading this rank's slot
    own.close()
    slices = comm.allreduce_scalars([float(hi - lo)], "sum")[0]
    same = comm.allreduce_scalars([float(c) for c in crcs], "max")
    low = comm.allreduce_scalars([float(c) for c in crcs], "min")
    err = comm.allreduce_scalars([max(errors)], "max")[0]
    own_err = comm.allreduce_scalars([max(own_errors)], "max")[0]
    spans = [e["name"] for e in tl.events]
    if comm.rank == 0:
        print(json.dumps({"n": n, "dtype": dtype, "size": comm.size, "max_rel_error": err,
                          "identical_on_all_ranks": bool(np.array_equal(same, low)),
                          "calls": sync.calls, "spans": spans,
                          "own_slice_max_rel_error": own_err, "own_slices_cover": bool(slices == n),
                          "tids": sorted({e["tid"] for e in tl.events})}), flush=True)


def main() -> None:
    comm = MPIComm()
    for dtype in ("float64", "float32"):
        for n in (1, 2, 5, 1000, 100_003):
            check(comm, n, dtype)


if __name__ == "__main__":
    main()
