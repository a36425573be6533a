"""The collective operations dptrain needs, as one interface.

Communicators move contiguous arrays and a few host scalars and bytes; they know nothing
of layers or models. Every implementation (one process, MPI, device arrays over MPI,
NCCL) offers exactly these calls, so the rest of dptrain never asks which one it has.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class Request:
    """A pending non-blocking operation (an already finished one by default)."""

    def wait(self) -> None:
        """Block until the operation has completed."""

    def test(self) -> bool:
        """True once the operation has completed (never blocks)."""
        return True


class Communicator(ABC):
    """A group of ranks and the collectives over them."""

    rank: int = 0
    size: int = 1
    #: this rank among the ranks of its node, and how many share the node
    local_rank: int = 0
    local_size: int = 1
    hostname: str = socket.gethostname()
    name: str = ""

    @abstractmethod
    def allreduce_sum(self, a: Any) -> Any:
        """Sum ``a`` over ranks in place; returns ``a``."""

    @abstractmethod
    def iallreduce_sum(self, a: Any) -> Request:
        """Start an in-place sum of ``a`` over ranks; ``wait()`` before reading it."""

    @abstractmethod
    def bcast(self, a: Any, root: int = 0) -> Any:
        """Overwrite ``a`` on every rank with root's ``a``; returns ``a``."""

    @abstractmethod
    def allreduce_scalars(self, values: list[float] | np.ndarray, op: str = "sum") -> np.ndarray:
        """Reduce a few host float64 values (sum | max | min) over ranks."""

    @abstractmethod
    def bcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Root's bytes on every rank (length first, then the buffer; no pickle)."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait until every rank has arrived."""

    @abstractmethod
    def ibarrier(self) -> Request:
        """A barrier that can be polled (``test()``) instead of spinning in MPI."""

    @abstractmethod
    def abort(self, code: int = 1) -> None:
        """End every rank of the job now, with exit code ``code``."""
