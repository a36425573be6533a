"""One rank tries, every rank learns the verdict.

A user mistake found on one rank (a bad file, a failed checkpoint write on rank 0) must
stop every rank together, with the same one-line message and no rank left waiting in a
collective. ``agree`` runs a function on every rank (or on rank 0 alone), then the ranks
agree on the first rank that failed and all raise its error, marked as agreed so that
the command line prints it once and exits without aborting the job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TypeVar

from ..errors import UserError, agreed
from .interface import Communicator

T = TypeVar("T")


def agree(comm: Communicator, fn: Callable[[], T], *, root_only: bool = False,
          waiting: Callable[[], AbstractContextManager[object]] | None = None) -> T | None:
    """``fn()`` on every rank (or on rank 0 alone); its result where it ran.

    A ``UserError`` on any rank is raised on every rank: the lowest failing rank's message.
    ``waiting`` guards the collective that learns the verdict (e.g. a watchdog while the
    other ranks wait for rank 0's checkpoint write).
    """
    err: UserError | None = None
    result: T | None = None
    if not root_only or comm.rank == 0:
        try:
            result = fn()
        except UserError as e:
            err = e
    if comm.size == 1:
        if err is not None:
            raise err
        return result
    with waiting() if waiting is not None else contextlib.nullcontext():
        first = int(comm.allreduce_scalars([comm.rank if err else comm.size], "min")[0])
        if first == comm.size:
            return result
        msg = comm.bcast_bytes(str(err).encode() if err else None, root=first)
    raise agreed(UserError(msg.decode()))
