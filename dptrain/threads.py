"""BLAS/OpenMP threads per rank: cores on the node divided by the ranks on the node."""

from __future__ import annotations

import os
from typing import Any

from .errors import UserError

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def threads_per_rank(local_size: int) -> int:
    """cores / local ranks, at least 1 (a rank bound to fewer cores gets those)."""
    total = os.cpu_count() or 1
    return max(1, min(usable_cores(), total // max(1, local_size)))


def limit_threads(requested: int, local_size: int) -> tuple[int, str]:
    """Apply a BLAS thread limit; returns (threads, why). User settings win."""
    if requested <= 0:
        for var in THREAD_VARS:
            if os.environ.get(var, "").strip():
                return int(os.environ[var]) if os.environ[var].isdigit() else 0, f"{var} is set"
        n, why = threads_per_rank(local_size), f"{local_size} rank(s) on this node"
    else:
        cores = usable_cores()
        if requested > cores:
            raise UserError(f"threads {requested} is more than the {cores} core(s) this rank "
                            "may use; give at most that (or 0 for cores / ranks on the node)")
        n, why = requested, "threads option"
    _limits.append(_apply(n))
    return n, why


_limits: list[Any] = []


def _apply(n: int) -> Any:
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    return threadpool_limits(limits=n)
