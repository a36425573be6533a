"""What the launcher (mpiexec, mpirun, srun) says about this process, read before MPI starts.

Used to decide whether to start MPI at all, to let only rank 0 print a mistake found
before MPI is initialised, and to refuse launches where MPI would see n separate
one-rank worlds (a launcher of another MPI than mpi4py's, srun without a PMI plugin).
"""

from __future__ import annotations

import os

from ..errors import UserError

#: environment variables that launchers set in every rank they start
LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                 "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD", "MV2_COMM_WORLD_SIZE")


def launched_by_mpi() -> bool:
    """True when this process was started by mpiexec/mpirun or srun with several tasks."""
    if any(v in os.environ for v in LAUNCHER_VARS):
        return True
    return "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def launcher_rank() -> int:
    """This process's rank as the launcher announced it (0 without a launcher)."""
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


def check_launcher_world(size: int) -> None:
    """The mpiexec of another MPI than mpi4py's starts n one-rank worlds: refuse that."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        n = os.environ.get(var, "")
        if size == 1 and n.isdigit() and int(n) > 1:
            raise UserError(f"the launcher started {n} processes ({var}) but MPI sees a world "
                            "of 1 rank: this mpiexec belongs to another MPI than the one "
                            "mpi4py uses (see `python -m mpi4py --mpi-library`)")


def check_srun_world(size: int) -> None:
    """srun without a PMI plugin starts n one-rank worlds: refuse rather than train n times."""
    tasks = os.environ.get("SLURM_NTASKS", "1")
    if (size == 1 and "SLURM_STEP_ID" in os.environ and tasks.isdigit() and int(tasks) > 1
            and not any(v in os.environ for v in LAUNCHER_VARS)):
        raise UserError(f"srun started {tasks} tasks but MPI sees a world of 1 rank: start "
                        "the ranks with `srun --mpi=pmi2` (or --mpi=pmix where Slurm has it)")
