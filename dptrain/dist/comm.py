"""Communicators: one interface, an MPI implementation and a one-process local one.

Communicators move contiguous arrays and know nothing of layers or models. The local
communicator never imports MPI, so ``--debug`` and plain ``python -m dptrain`` runs work
on machines without an MPI library (and under pdb).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from typing import Any

import numpy as np

from ..errors import UserError

#: environment variables that launchers set in every rank they start
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                  "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD", "MV2_COMM_WORLD_SIZE")


def launched_by_mpi() -> bool:
    """True when this process was started by mpiexec/mpirun or srun with several tasks."""
    if any(v in os.environ for v in _LAUNCHER_VARS):
        return True
    return "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def launcher_rank() -> int:
    """This process's rank as the launcher announced it (0 without a launcher); used
    before MPI is initialised, e.g. so that only rank 0 prints a config error."""
    for var in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK",
                "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def launcher_world_size() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", "MPI_LOCALNRANKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


class Request:
    """A pending non-blocking operation."""

    def wait(self) -> None:  # pragma: no cover - trivial
        pass


class Communicator:
    """The collective operations dptrain needs, on contiguous arrays."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    hostname: str = socket.gethostname()
    name: str = "local"

    def allreduce_sum(self, a: Any) -> Any:
        """Sum ``a`` over ranks in place; returns ``a``."""
        return a

    def iallreduce_sum(self, a: Any) -> Request:
        """Start an in-place sum of ``a`` over ranks; ``wait()`` before reading it."""
        return Request()

    def bcast(self, a: Any, root: int = 0) -> Any:
        """Overwrite ``a`` on every rank with root's ``a``; returns ``a``."""
        return a

    def allreduce_scalars(self, values: list[float] | np.ndarray, op: str = "sum") -> np.ndarray:
        """Reduce a few host float64 values (sum|max|min) over ranks."""
        return np.asarray(values, dtype=np.float64).copy()

    def bcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Root's bytes on every rank (length first, then the buffer; no pickle)."""
        return data or b""

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        os._exit(code)


class LocalComm(Communicator):
    """One process: every collective is the identity."""


class MPIComm(Communicator):
    """mpi4py on COMM_WORLD (or a given communicator), buffer-based uppercase calls."""

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
        return self.comm.Iallreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)

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

    def abort(self, code: int = 1) -> None:
        # let the launcher forward this rank's last words before it tears the job down
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        time.sleep(0.3)
        self.comm.Abort(code)


def make_communicator(kind: str = "auto") -> Communicator:
    """``local`` | ``mpi`` | ``auto`` (MPI only when a launcher started this process).

    ``nccl`` is ``auto`` here: MPI starts the ranks, and the trainer puts NCCL over it for
    GPU arrays (dist/nccl.py).
    """
    if kind == "nccl":
        kind = "auto"
    if kind == "local" or (kind == "auto" and not launched_by_mpi()):
        return LocalComm()
    if kind not in ("mpi", "auto"):
        raise UserError(f"comm must be auto, mpi or local, not {kind!r}")
    try:
        from mpi4py import MPI  # noqa: F401, PLC0415
    except ImportError:
        raise UserError(
            "launched under an MPI launcher but mpi4py is not installed in this Python "
            "(pip install mpi4py, or run one process without mpiexec / with --debug)") from None
    except RuntimeError as e:  # mpi4py >= 4 finds no MPI library to load
        said = "; ".join(str(e).splitlines()[:2])
        raise UserError(
            f"launched under an MPI launcher but mpi4py cannot load an MPI library ({said}): "
            "pip install mpich, or make the launcher's MPI library findable") from None
    comm = MPIComm()
    _check_srun_world(comm.size)
    _check_launcher_world(comm.size)
    return comm


def _check_launcher_world(size: int) -> None:
    """The mpiexec of another MPI than mpi4py's starts n one-rank worlds: refuse that too."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        n = os.environ.get(var, "")
        if size == 1 and n.isdigit() and int(n) > 1:
            raise UserError(f"the launcher started {n} processes ({var}) but MPI sees a world "
                            "of 1 rank: this mpiexec belongs to another MPI than the one "
                            "mpi4py uses (see `python -m mpi4py --mpi-library`)")


def _check_srun_world(size: int) -> None:
    """srun without a PMI plugin starts n one-rank worlds: refuse rather than train n times."""
    tasks = os.environ.get("SLURM_NTASKS", "1")
    if (size == 1 and "SLURM_STEP_ID" in os.environ and tasks.isdigit() and int(tasks) > 1
            and not any(v in os.environ for v in _LAUNCHER_VARS)):
        raise UserError(f"srun started {tasks} tasks but MPI sees a world of 1 rank: start "
                        "the ranks with `srun --mpi=pmi2` (or --mpi=pmix where Slurm has it)")
