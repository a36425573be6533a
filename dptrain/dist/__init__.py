"""Communicators and gradient synchronisation (no layers here)."""

from .comm import Communicator, LocalComm, MPIComm, launched_by_mpi, make_communicator
from .sync import GradSync, bucket_bounds

__all__ = ["Communicator", "GradSync", "LocalComm", "MPIComm", "bucket_bounds",
           "launched_by_mpi", "make_communicator"]
