"""Where each rank's replica lives, and how its gradients become one sum: one interface.

- ``PerRankReplicas``: every rank holds its own parameters, gradients and optimizer state;
  gradients are summed by bucketed (optionally overlapped) allreduces. This is what runs
  across nodes, on GPUs (through a device communicator) and where /dev/shm is too small.
- ``NodeSharedCopy``: every rank is on one node (CPU): the ranks' gradient buffers sit side
  by side in shared memory, the node holds one copy of the parameters and optimizer state,
  and rank k sums and updates slice k alone (ZeRO-1 over MPI shared memory).

Both give the same bytes: the squared gradient norm (for the non-finite guard and
clipping) is summed over the same rank slices in the same order either way. The step
and the loop call only this interface; they never ask which placement they have.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from .interface import Communicator
from .shared import SharedGrads, SharedSum, shm_shortfall
from .split import all_part_bounds
from .sync import GradSync


class Placement(ABC):
    """One rank's share of the replicas: its buffers, its gradient sum, its slice."""

    #: what the start line says about how gradients travel
    description: str = ""
    #: the slice of the flat buffers this rank's optimizer updates
    own: slice = slice(None)

    def __init__(self, comm: Communicator, model: Any, sync: Any) -> None:
        self.comm, self.model, self.sync = comm, model, sync
        #: the whole optimizer state, by name (the optimizer itself may hold one slice)
        self.opt_state: dict[str, Any] = {}

    @property
    def xp(self) -> Any:
        return self.model.xp

    @abstractmethod
    def adopt(self, optimizer: Any) -> None:
        """Take the optimizer built over ``params[own]``/``grads[own]``: its state is
        checkpointed (and, on a shared node, kept) as ``opt_state``."""

    @abstractmethod
    def grad_norm2(self) -> float:
        """The summed gradient's squared norm (over this rank's slice where it has only
        that), equal on every rank and with the same bytes in every placement."""

    @abstractmethod
    def all_finite(self) -> bool:
        """No NaN/Inf in the summed gradient (agreed by every rank)."""

    @abstractmethod
    def after_update(self) -> None:
        """Every rank's update is visible to every rank from here on."""

    @abstractmethod
    def agree_all(self, flag: bool) -> bool:
        """True where ``flag`` is true on every rank."""

    @abstractmethod
    def broadcast(self) -> None:
        """Rank 0's parameters, model state and optimizer state become every rank's."""

    @property
    def grads(self) -> Any:
        """The gradient this rank's optimizer reads."""
        return self.model.grads[self.own]


class PerRankReplicas(Placement):
    """A replica per rank; bucketed allreduces of the gradient buffer."""

    def __init__(self, comm: Communicator, model: Any, bucket_bytes: int, overlap: bool,
                 timeline: Any = None) -> None:
        super().__init__(comm, model, GradSync(comm, model.grads, bucket_bytes, overlap,
                                               timeline))
        self.description = (f"one replica per rank, {len(self.sync.buckets)} gradient "
                            f"bucket(s), overlap {'on' if overlap else 'off'}")

    def adopt(self, optimizer: Any) -> None:
        self.opt_state = optimizer.state

    def grad_norm2(self) -> float:
        g, xp = self.model.grads, self.xp
        # the ranks' slices summed in rank order, as a node-shared copy sums them
        parts = [xp.dot(g[s:e], g[s:e]).astype(np.float64)
                 for s, e in all_part_bounds(g.size, self.comm.size) if e > s]
        total = parts[0] if parts else None
        for part in parts[1:]:
            total = total + part
        return 0.0 if total is None else float(total)

    def all_finite(self) -> bool:
        return bool(self.xp.isfinite(self.model.grads).all())

    def after_update(self) -> None:
        """Each rank updated its own replica: nothing to wait for."""

    def agree_all(self, flag: bool) -> bool:
        """Replicas hold the same bytes: this rank's verdict is every rank's."""
        return flag

    def broadcast(self) -> None:
        self.comm.bcast(self.model.params)
        for buf in self.opt_state.values():
            self.comm.bcast(buf)
        self.comm.bcast(self.model.state)


class NodeSharedCopy(Placement):
    """One copy of parameters and optimizer state per node; rank k sums and updates slice k."""

    def __init__(self, comm: Communicator, model: Any, shared: SharedGrads,
                 timeline: Any = None) -> None:
        super().__init__(comm, model, SharedSum(shared, timeline))
        self.memory = shared.memory
        self.own = slice(*shared.own)
        model.use_grad_buffer(shared.mine)
        params = self.memory.single(model.num_params, model.dtype, "parameters")
        params[self.own] = model.params[self.own]  # each rank writes (and places) its slice
        model.use_param_buffer(params)
        self.description = "one shared copy per node, gradients summed in shared memory"

    def adopt(self, optimizer: Any) -> None:
        model = self.model
        self.opt_state = {name: self.memory.single(model.num_params, model.dtype,
                                                   f"optimizer state {name}")
                          for name in optimizer.state}
        # the (zero) state moves into this rank's slice; then every slice of parameters and
        # state is written before any rank reads one
        optimizer.use_state_buffers({k: v[self.own] for k, v in self.opt_state.items()})
        self.memory.fence()

    def grad_norm2(self) -> float:
        g = self.grads
        row = np.zeros(self.comm.size)  # one exact sum of a zero-padded row, in rank order
        row[self.comm.rank] = float(self.xp.dot(g, g)) if g.size else 0.0
        return float(sum(float(v) for v in self.comm.allreduce_scalars(row)))

    def all_finite(self) -> bool:
        return self.agree_all(bool(self.xp.isfinite(self.grads).all()))

    def after_update(self) -> None:
        self.memory.fence()  # every slice is updated before any rank reads the parameters

    def agree_all(self, flag: bool) -> bool:
        """Each rank judged its own slice: all must agree."""
        return bool(self.comm.allreduce_scalars([float(flag)], "min")[0])

    def broadcast(self) -> None:
        self.memory.fence()  # one copy: rank 0's bytes are already everyone's
        self.comm.bcast(self.model.state)


def make_placement(comm: Communicator, model: Any, *, shared_memory: bool, bucket_bytes: int,
                   overlap: bool, timeline: Any = None,
                   say: Callable[[str], None] = print) -> Placement:
    """The node-shared copy where it applies, fits in /dev/shm and is wanted; else a replica
    per rank. Where /dev/shm is too small, say so: MPI sums the same bytes, only slower."""
    if shared_memory and SharedGrads.applies(comm, model.grads):
        short = shm_shortfall(comm, model.grads.nbytes * (comm.size + 3))
        if short:
            say(f"note: {short}: gradients are summed with MPI allreduces instead "
                "(enlarge /dev/shm, e.g. docker run --shm-size, or pass "
                "--no-shared-memory-sync to silence this)")
        else:
            shared = SharedGrads.create(comm, model.grads, own_slice_only=True)
            assert shared is not None
            return NodeSharedCopy(comm, model, shared, timeline)
    return PerRankReplicas(comm, model, bucket_bytes, overlap, timeline)
