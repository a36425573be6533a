"""Which communicator a run uses: one process, MPI, device arrays over MPI, or NCCL."""

from __future__ import annotations

from ..backend import Backend
from ..errors import UserError
from .interface import Communicator
from .launch import check_launcher_world, check_srun_world, launched_by_mpi
from .local import LocalComm

KINDS = ("auto", "mpi", "local", "nccl")


def make_communicator(kind: str = "auto") -> Communicator:
    """``local`` | ``mpi`` | ``auto`` (MPI only when a launcher started this process).

    ``nccl`` is ``auto`` here: MPI starts the ranks, and ``device_comm`` puts NCCL over it
    for GPU arrays.
    """
    if kind not in KINDS:
        raise UserError(f"comm must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "local" or (kind in ("auto", "nccl") and not launched_by_mpi()):
        return LocalComm()
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
    from .mpi import MPIComm  # noqa: PLC0415

    comm = MPIComm()
    check_srun_world(comm.size)
    check_launcher_world(comm.size)
    return comm


def device_comm(inner: Communicator, backend: Backend, gpu_aware_mpi: str = "auto",
                nccl: bool = False) -> Communicator:
    """The communicator for ``backend``'s arrays: ``inner`` itself on the CPU and for one
    rank; on GPUs device arrays reach MPI directly, staged through pinned memory, or NCCL."""
    if not backend.is_gpu:
        if nccl:
            raise UserError("--comm nccl needs --device gpu (NCCL reduces GPU memory)")
        return inner
    if inner.size == 1:
        return inner
    if nccl:
        from .nccl import NcclComm  # noqa: PLC0415  (needs cupy.cuda.nccl)

        return NcclComm(inner, backend)
    from .device import DeviceComm, mpi_takes_device_buffers  # noqa: PLC0415

    direct, why = mpi_takes_device_buffers(gpu_aware_mpi)
    return DeviceComm(inner, backend, direct, why)
