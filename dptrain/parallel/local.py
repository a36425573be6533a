"""One process: every collective is the identity, and MPI is never imported.

So ``--debug`` and plain ``python -m dptrain`` runs work on machines without an MPI
library, and under a debugger.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .interface import Communicator, Request


class LocalComm(Communicator):
    """A world of one rank."""

    name = "local"

    def allreduce_sum(self, a: Any) -> Any:
        return a

    def iallreduce_sum(self, a: Any) -> Request:
        return Request()

    def bcast(self, a: Any, root: int = 0) -> Any:
        return a

    def allreduce_scalars(self, values: list[float] | np.ndarray, op: str = "sum") -> np.ndarray:
        return np.asarray(values, dtype=np.float64).copy()

    def bcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        return data or b""

    def barrier(self) -> None:
        pass

    def ibarrier(self) -> Request:
        return Request()

    def abort(self, code: int = 1) -> None:
        os._exit(code)
