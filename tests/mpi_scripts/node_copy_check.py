"""Loads a split into one shared-memory copy per node (NodeMemory.single) under mpiexec.

    mpiexec -n R python tests/mpi_scripts/node_copy_check.py DATA.h5

The node's local rank 0 fills the window, a fence publishes it, every rank reads it all
(CRC-32 of x and y) and then reads every batch of an epoch through a memory source over
the shared array. Then the same split is loaded into a private copy per rank. Rank 0
prints one JSON object: every rank's CRCs, batch CRC, and the growth of its proportional
set size (Pss, /proc/self/smaps_rollup: shared pages count 1/R in each of R ranks) for
the shared and for the private copy.
"""

from __future__ import annotations

import json
import sys
import zlib

import h5py  # noqa: F401 (imported before the first Pss reading)
import numpy as np

from dptrain.data.node_copy import load_split, private_alloc
from dptrain.data.source import memory_source
from dptrain.data.transform import BatchTransform
from dptrain.parallel.mpi import MPIComm
from dptrain.parallel.shared import NodeMemory


def pss_kib() -> int:
    """This process's proportional set size in KiB."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError("no Pss in /proc/self/smaps_rollup")


def crc(a: np.ndarray) -> int:
    """CRC-32 of an array's bytes, read in place (no copy that would count in Pss)."""
    return zlib.crc32(memoryview(a).cast("B"))


def batches_crc(x: np.ndarray, y: np.ndarray) -> int:
    """CRC of every batch of 64 of an epoch's order, read through a memory source."""
    src = memory_source(x, y, BatchTransform("float32"), 64)
    order = np.random.default_rng([7, 0]).permutation(len(x))
    total = 0
    for i in range(0, len(order), 64):
        rows = order[i:i + 64]
        src.prefetch(rows, 0)
        bx, by = src.get(rows, 0)
        total = zlib.crc32(memoryview(by).cast("B"), zlib.crc32(memoryview(bx).cast("B"), total))
    src.close()
    return total


def main() -> None:
    path = sys.argv[1]
    comm = MPIComm()
    memory = NodeMemory(comm)

    def shared_alloc(shape: tuple[int, ...], dtype: object) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        return memory.single(n, dtype, "training data").reshape(shape)

    comm.barrier()
    base = pss_kib()
    x, y, _ = load_split(path, "train", shared_alloc, fill=memory.rank == 0)
    memory.fence()
    crc_x, crc_y = crc(x), crc(y)
    batch_crc = batches_crc(x, y)
    comm.barrier()
    shared_growth = pss_kib() - base
    memory.close()
    del x, y

    comm.barrier()
    base = pss_kib()
    px, py, _ = load_split(path, "train", private_alloc)
    private_ok = crc(px) == crc_x and crc(py) == crc_y
    comm.barrier()
    private_growth = pss_kib() - base

    mine = np.array([crc_x, crc_y, batch_crc, shared_growth, private_growth,
                     int(private_ok)], np.int64)
    table = np.zeros((comm.size, len(mine)), np.int64)
    comm.comm.Gather(mine, table, root=0)  # arrays, not pickled objects
    if comm.rank == 0:
        t = table.tolist()
        print(json.dumps({"size": comm.size, "nbytes": int(px.nbytes + py.nbytes),
                          "crc_x": [r[0] for r in t], "crc_y": [r[1] for r in t],
                          "batch_crc": [r[2] for r in t],
                          "shared_pss_growth_kib": [r[3] for r in t],
                          "private_pss_growth_kib": [r[4] for r in t],
                          "private_matches": [bool(r[5]) for r in t]}), flush=True)

if __name__ == "__main__":
    main()
