"""``loader = "auto"``: hold a split in memory when it fits comfortably, else stream it.

Memory available is the smaller of the kernel's ``MemAvailable`` (/proc/meminfo: free
memory plus what the page cache can give back without swapping) and, inside a cgroup v2
container or Slurm job, ``memory.max - memory.current`` of this process's cgroup. The
split is taken into memory when the copies the node would hold (one when the ranks of a
node share one copy, else one per rank) need at most ``SAFETY`` (half) of it, leaving the
rest to the model, activations, MPI buffers and the page cache that streaming other data
would use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: the share of available memory a split (all its copies on the node) may take
SAFETY = 0.5


@dataclass(frozen=True)
class LoaderChoice:
    """``mode`` ("memory" or "stream") and the reason, as text for the start line."""

    mode: str
    reason: str


def _mib(n: float) -> str:
    if n < 2**20:
        return f"{n / 2**10:,.0f} KiB"
    return f"{n / 2**20:,.0f} MiB" if n < 10 * 2**30 else f"{n / 2**30:,.1f} GiB"


def mem_available(meminfo: str | Path = "/proc/meminfo", cgroup_root: str | Path =
                  "/sys/fs/cgroup", self_cgroup: str | Path = "/proc/self/cgroup"
                  ) -> tuple[int | None, str]:
    """Bytes of memory this process may still use, and where the figure comes from."""
    avail: int | None = None
    where = ""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail, where = int(line.split()[1]) * 1024, "MemAvailable"
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        rel = next(line.split(":", 2)[2] for line in Path(self_cgroup).read_text().splitlines()
                   if line.startswith("0::"))
        d = Path(cgroup_root) / rel.strip().lstrip("/")
        limit = (d / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((d / "memory.current").read_text().strip())
            if avail is None or left < avail:
                avail, where = max(left, 0), "the cgroup's memory.max - memory.current"
    except (OSError, ValueError, StopIteration, IndexError):
        pass
    return avail, where


def choose_loader(split_bytes: int, copies: int = 1, available: int | None = None,
                  where: str = "") -> LoaderChoice:
    """Memory or stream for data of ``split_bytes`` held ``copies`` times on the node."""
    if available is None:
        available, where = mem_available()
    need = int(split_bytes) * max(int(copies), 1)
    held = f"{_mib(split_bytes)}" + (f" x {copies} copies" if copies > 1 else "")
    if available is None:
        return LoaderChoice("stream", f"loader auto -> stream: the data needs {held} "
                            "and the free memory is unknown (no /proc/meminfo)")
    share = need / available if available else float("inf")
    verdict = "memory" if share <= SAFETY else "stream"
    cmp = "within" if verdict == "memory" else "over"
    return LoaderChoice(verdict, f"loader auto -> {verdict}: the data needs {held}, "
                        f"{share:.0%} of {_mib(available)} available ({where}), {cmp} the "
                        f"{SAFETY:.0%} limit")
