"""Communicators and gradient synchronisation (no layers here)."""

from .comm import Communicator, LocalComm, MPIComm, launched_by_mpi, make_communicator
from .device import DeviceComm, device_comm
from .sync import GradSync, bucket_bounds

__all__ = ["Communicator", "DeviceComm", "GradSync", "LocalComm", "MPIComm", "bucket_bounds",
           "device_comm", "launched_by_mpi", "make_communicator"]
