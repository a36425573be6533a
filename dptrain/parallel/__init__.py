"""Communicators, gradient sums and replica placement (no layers here).

- ``interface``: the collectives dptrain needs; ``local``, ``mpi``, ``device``, ``nccl``:
  one process, MPI, device arrays over MPI, NCCL; ``communicators``: which one a run uses.
- ``sync``: bucketed, overlapped gradient allreduce; ``shared``: memory shared by the ranks
  of a node; ``placement``: per-rank replicas or one shared copy per node, one interface.
- ``split``: the one rule for splitting n items over ranks; ``agree``: one rank tries, every
  rank learns the verdict; ``watchdog``: a collective that stalls aborts the job.
"""

from .agree import agree
from .communicators import device_comm, make_communicator
from .interface import Communicator, Request
from .launch import launched_by_mpi
from .local import LocalComm
from .placement import NodeSharedCopy, PerRankReplicas, Placement, make_placement
from .split import all_part_bounds, part_bounds
from .sync import GradSync, bucket_bounds

__all__ = ["Communicator", "GradSync", "LocalComm", "NodeSharedCopy", "PerRankReplicas",
           "Placement", "Request", "agree", "all_part_bounds", "bucket_bounds", "device_comm",
           "launched_by_mpi", "make_communicator", "make_placement", "part_bounds"]
