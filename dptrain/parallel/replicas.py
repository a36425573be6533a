"""Replicas never drift: every rank's checksum of its parameters, compared."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from ..errors import StopTraining
from .interface import Communicator


def replica_checksum(*arrays: np.ndarray) -> int:
    """CRC32 of the arrays' bytes: equal on every rank when replicas agree."""
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8), crc)
    return crc


def check_replicas(comm: Communicator, arrays: list[Any], what: str) -> None:
    """Compare every rank's checksum of ``arrays`` (host arrays); a mismatch stops the run
    (exit 1) naming the groups of ranks that agree."""
    if comm.size == 1:
        return
    sums = np.zeros(comm.size, np.float64)
    sums[comm.rank] = replica_checksum(*arrays)
    sums = comm.allreduce_scalars(sums)
    if np.all(sums == sums[0]):
        return
    groups: dict[float, list[int]] = {}
    for r, s in enumerate(sums):
        groups.setdefault(float(s), []).append(r)
    desc = "; ".join(f"ranks {v}" for v in groups.values())
    raise StopTraining(1, f"replica drift at {what}: parameters differ between {desc}")
