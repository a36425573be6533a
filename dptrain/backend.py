"""Array-module selection (NumPy or CuPy), one GPU per rank, and host<->device helpers.

Every step of training uses ``Backend.xp`` for its arrays, so the same code runs on NumPy
and on CuPy. Only ``to_host``/``to_device`` and the asynchronous copy helpers cross
between host and device.

GPU assignment: the ranks on one host that see the same set of GPUs (the same
``CUDA_VISIBLE_DEVICES`` after Slurm's or the launcher's binding) take them in rank order,
device = position modulo the visible count. Ranks that were each bound to their own GPU
(Slurm ``--gpus-per-task`` / ``--gpu-bind``) see different sets and each takes its first
visible device. Two ranks landing on one physical GPU (same PCI bus id on one host) is an
error unless sharing is allowed. Ranks exchange what they see with one collective, so all
of them agree on the outcome (and ``auto`` never mixes CPU and GPU ranks).
"""

from __future__ import annotations

import os
import socket
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from .errors import UserError

_INSTALL_HINT = "pip install 'dptrain[cuda12]' (or dptrain[cuda13] for CUDA 13)"


@dataclass
class Backend:
    """The array module of one rank and the device it runs on."""

    xp: ModuleType
    name: str = "cpu"
    device_id: int | None = None
    pci_bus_id: str = ""
    _copy_stream: Any = field(default=None, repr=False, compare=False)

    @property
    def is_gpu(self) -> bool:
        return self.name == "gpu"

    def describe(self) -> str:
        """``cpu`` or ``gpu 1 (0000:3b:00.0)`` for start-up messages."""
        if not self.is_gpu:
            return self.name
        return f"gpu {self.device_id}" + (f" ({self.pci_bus_id})" if self.pci_bus_id else "")

    def to_host(self, a: Any) -> np.ndarray:
        """A NumPy copy (or view, on CPU) of ``a``: one device-to-host transfer on GPU."""
        if isinstance(a, np.ndarray):
            return a
        return self.xp.asnumpy(a)

    def to_device(self, a: Any, dtype: Any = None) -> Any:
        """``a`` as an array of this backend."""
        return self.xp.asarray(a, dtype=dtype)

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on CPU)."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()

    # -- GPU only: streams, events, pinned memory, asynchronous copies --------------------
    def stream(self) -> Any:
        """The current (compute) stream."""
        return self.xp.cuda.get_current_stream()

    @property
    def copy_stream(self) -> Any:
        """A second stream for copies that overlap computation (made on first use)."""
        if self._copy_stream is None:
            self._copy_stream = self.xp.cuda.Stream(non_blocking=True)
        return self._copy_stream

    def event(self) -> Any:
        """A new event, recorded on the current stream."""
        ev = self.xp.cuda.Event(disable_timing=True)
        ev.record(self.stream())
        return ev

    def pinned_empty(self, shape: int | tuple[int, ...], dtype: Any) -> np.ndarray:
        """A NumPy array in page-locked host memory (asynchronous copies need it)."""
        dt = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        count = int(np.prod(shape, dtype=np.int64))
        mem = self.xp.cuda.alloc_pinned_memory(max(count * dt.itemsize, 1))
        return np.frombuffer(mem, dt, count).reshape(shape)

    def copy_to_host_async(self, dev: Any, host: np.ndarray, stream: Any) -> None:
        """Queue ``host[...] = dev`` on ``stream`` (``host`` pinned; sync before reading)."""
        try:
            dev.get(stream=stream, out=host, blocking=False)
        except TypeError:  # CuPy < 13 has no ``blocking``: a stream alone makes it async
            dev.get(stream=stream, out=host)

    def copy_to_device_async(self, host: np.ndarray, dev: Any, stream: Any) -> None:
        """Queue ``dev[...] = host`` on ``stream`` (``host`` pinned; keep it until done)."""
        dev.set(host, stream=stream)


CPU = Backend(np, "cpu", None)


def _import_cupy() -> ModuleType | None:
    return _load_cupy()[0]


def _load_cupy() -> tuple[ModuleType | None, str]:
    """CuPy, or None and why not."""
    try:
        import cupy  # noqa: PLC0415
    except Exception as e:  # ImportError, or a CUDA library that fails to load
        return None, _why(e)
    return cupy, ""


def _why(e: BaseException) -> str:
    """An exception as one short line, for an error message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


# -- which GPU each rank takes ----------------------------------------------------------
def slurm_tasks_on_node(spec: str, node_id: int) -> int | None:
    """Tasks on node ``node_id`` from Slurm's ``2(x3),1`` notation (None if unparsable)."""
    counts: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "(x" in part:
                n, rep = part.rstrip(")").split("(x")
                counts += [int(n)] * int(rep)
            else:
                counts.append(int(part))
        except ValueError:
            return None
    return counts[node_id] if 0 <= node_id < len(counts) else None


def node_local_rank(local_rank: int, local_size: int,
                    environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, ranks) on this node: MPI's shared-memory split, else the launcher's variables.

    The launcher's variables matter only where MPI sees less than the launcher started,
    e.g. one-process jobs started side by side by ``srun``, or an MPI that does not
    understand the launcher and starts every task as a world of its own.
    """
    if local_size > 1:
        return local_rank, local_size
    env = os.environ if environ is None else environ
    for rank_var, size_var in (("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
                               ("MPI_LOCALRANKID", "MPI_LOCALNRANKS")):
        if env.get(rank_var, "").isdigit() and env.get(size_var, "").isdigit():
            return int(env[rank_var]), int(env[size_var])
    if env.get("SLURM_LOCALID", "").isdigit():
        spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
        node = int(env["SLURM_NODEID"]) if env.get("SLURM_NODEID", "").isdigit() else 0
        size = slurm_tasks_on_node(spec, node) if spec else None
        rank = int(env["SLURM_LOCALID"])
        return rank, max(size or 1, rank + 1)
    return local_rank, local_size


def _key(text: str) -> float:
    """A float64 that identifies ``text`` (crc32 is exact in a double)."""
    return float(zlib.crc32(text.encode()))


def plan_device(hosts: np.ndarray, sets: np.ndarray, rank: int, n_visible: int) -> int:
    """The visible-device index for ``rank``: its position among the ranks with its host
    and its visible set (in rank order), modulo ``n_visible``."""
    peers = np.flatnonzero((hosts == hosts[rank]) & (sets == sets[rank]))
    return int(np.searchsorted(peers, rank)) % n_visible


def sharing_groups(physical: np.ndarray) -> list[list[int]]:
    """Groups of ranks (two or more) whose chosen GPUs are one physical device."""
    groups: dict[float, list[int]] = {}
    for r, k in enumerate(physical):
        groups.setdefault(float(k), []).append(r)
    return [g for g in groups.values() if len(g) > 1]


@dataclass
class _Probe:
    cupy: ModuleType | None
    count: int
    pci: list[str]
    problem: int  # 0 ok, 1 no CuPy, 2 no visible GPU
    reason: str = ""  # what CuPy said, for problems 1 and 2


_PROBLEMS = {1: "CuPy is not installed (or its CUDA libraries failed to load): " + _INSTALL_HINT,
             2: "CuPy found no GPU (check CUDA_VISIBLE_DEVICES, the driver and the job's "
                "GPU request)"}


def _probe() -> _Probe:
    cupy = _import_cupy()
    if cupy is None:
        return _Probe(None, 0, [], 1, _load_cupy()[1])
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as e:  # no driver, a driver older than CuPy's CUDA, no device
        n, reason = 0, _why(e)
    else:
        reason = ""
    if n == 0:
        return _Probe(cupy, 0, [], 2, reason)
    pci = []
    for i in range(n):
        try:
            pci.append(str(cupy.cuda.Device(i).pci_bus_id))
        except Exception:
            pci.append(f"visible-{i}:{os.environ.get('CUDA_VISIBLE_DEVICES', '')}")
    return _Probe(cupy, n, pci, 0)


def _gather(comm: Any, row: list[float]) -> np.ndarray:
    """Every rank's ``row`` (world x len(row)), by one sum over a zero-padded table."""
    world = getattr(comm, "size", 1) if comm is not None else 1
    table = np.zeros((world, len(row)), np.float64)
    rank = comm.rank if comm is not None else 0
    table[rank] = row
    if world > 1:
        table = np.asarray(comm.allreduce_scalars(table.ravel()), np.float64).reshape(table.shape)
    return table


def select_backend(device: str, local_rank: int = 0, local_size: int = 1,
                   allow_sharing: bool = False, comm: Any = None) -> Backend:
    """Choose NumPy or CuPy for ``device`` (cpu|gpu|auto) and bind one GPU per rank.

    With ``comm`` (a host communicator) every rank must call this: they exchange what
    they see and all reach the same decision, raising the same ``UserError`` if any.
    """
    if device == "cpu":
        return CPU
    if device not in ("gpu", "auto"):
        raise UserError(f"device must be cpu, gpu or auto, not {device!r}")
    if comm is not None:
        local_rank, local_size = comm.local_rank, comm.local_size
    probe = _probe()
    host = socket.gethostname()
    visible = ",".join(sorted(probe.pci))
    rows = _gather(comm, [float(probe.problem), _key(host), _key(host + "|" + visible)])
    failed = np.flatnonzero(rows[:, 0] > 0)
    if failed.size:
        if device == "auto":
            return CPU  # every rank sees the same table: all fall back together
        first = int(failed[0])
        where = "" if rows.shape[0] == 1 else f" on rank {first}"
        said = f" ({probe.reason})" if probe.reason and probe.problem == rows[first, 0] else ""
        raise UserError(f"--device gpu: {_PROBLEMS[int(rows[first, 0])]}{where}{said}")
    assert probe.cupy is not None
    rank = comm.rank if comm is not None else 0
    if rows.shape[0] > 1:
        dev = plan_device(rows[:, 1], rows[:, 2], rank, probe.count)
    else:  # alone in the world: trust the launcher's numbering, if any
        lr, ls = node_local_rank(local_rank, local_size)
        if ls > probe.count and not allow_sharing:
            raise UserError(f"{ls} ranks on this node but {probe.count} visible GPU(s) "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}"
                            "); start one rank per GPU or pass --allow-gpu-sharing")
        dev = lr % probe.count
    physical = _gather(comm, [_key(host + "|" + probe.pci[dev])])[:, 0]
    shared = sharing_groups(physical)
    if shared and not allow_sharing:
        desc = "; ".join("ranks " + ",".join(map(str, g)) for g in shared[:3])
        raise UserError(f"more ranks than GPUs: {desc} would share one GPU; start one rank "
                        "per visible GPU (see CUDA_VISIBLE_DEVICES / the job's GPU request) "
                        "or pass --allow-gpu-sharing")
    probe.cupy.cuda.Device(dev).use()
    return Backend(probe.cupy, "gpu", dev, probe.pci[dev])


def array_module(a: Any) -> ModuleType:
    """The module (numpy, cupy, or a stand-in) that owns array ``a``."""
    if isinstance(a, np.ndarray):
        return np
    mod = getattr(type(a), "__array_module__", None)
    if isinstance(mod, ModuleType):
        return mod
    cupy = _import_cupy()
    if cupy is not None:
        return cupy.get_array_module(a)
    return np


def env_int(name: str, default: int | None = None) -> int | None:
    """An integer environment variable, or ``default`` when unset or not an integer."""
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return default
