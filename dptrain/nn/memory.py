"""Memory a model needs, estimated before anything is allocated, against what there is.

A model's parameters, gradients and state are counted exactly (with Python integers, so a
layer of 10**12 units is a number, not an overflow) before the flat buffers are
allocated, and a model that cannot fit is refused with both figures instead of ending in
a MemoryError. Activations depend on the batch: ``Layer.activation_bytes`` estimates what
each layer keeps for a training step (results, input gradients, caches, scratch), and
``check_batch_fits`` holds the sum for a batch per rank against the memory left.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units with three significant digits: "7.45 TiB"."""
    n = float(n)
    unit = 0
    while abs(n) >= 1024 and unit < len(_UNITS) - 1:
        n /= 1024
        unit += 1
    if unit == 0:
        return f"{int(n)} bytes"
    return f"{n:.3g} {_UNITS[unit]}" if n < 1000 else f"{n:.0f} {_UNITS[unit]}"


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available(root: str = "/sys/fs/cgroup") -> int | None:
    """Room left under this process's cgroup (v2) memory limit, if it has one."""
    try:
        limit = Path(root, "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path(root, "memory.current").read_text().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def available_bytes(xp: Any = np) -> int | None:
    """Memory free for new arrays of ``xp``: host memory available to this process (the
    smaller of MemAvailable and the cgroup's room), or the current GPU's free memory.
    None when it cannot be told (then nothing is refused)."""
    if xp is np:
        found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
        return min(found) if found else None
    try:
        return int(xp.cuda.runtime.memGetInfo()[0])
    except (AttributeError, RuntimeError, TypeError, ValueError, IndexError):
        return None


def _where(xp: Any) -> str:
    return "this machine" if xp is np else "this GPU"


def model_bytes(leaves: Iterable[Any], dtype: Any) -> tuple[int, int]:
    """(parameters, bytes of parameters + gradients + state) of built leaf layers."""
    params = state = 0
    for layer in leaves:
        params += sum(math.prod(s) for s in layer.param_shapes().values())
        state += sum(math.prod(s) for s in layer.state_shapes().values())
    return params, (2 * params + state) * np.dtype(dtype).itemsize


def check_model_fits(leaves: Iterable[Any], dtype: Any, xp: Any = np,
                     available: int | None = None) -> None:
    """Refuse a model whose flat buffers cannot be allocated, naming both sizes."""
    params, need = model_bytes(leaves, dtype)
    if need < 1 << 20:
        return  # nothing worth asking the system about
    have = available_bytes(xp) if available is None else available
    if have is not None and need > have:
        raise UserError(f"the model needs {format_bytes(need)} for parameters, gradients and "
                        f"state ({params:,} {np.dtype(dtype).name} parameters); "
                        f"{_where(xp)} has {format_bytes(have)} available")


def check_batch_fits(model: Any, batch_per_rank: int, available: int | None = None,
                     ranks_here: int = 1) -> None:
    """Refuse a batch per rank whose activations cannot fit in the memory left, with the
    estimate per sample. ``ranks_here``: ranks sharing this memory (host memory, or one
    GPU), each with its own activations."""
    need = model.activation_bytes(batch_per_rank) * max(1, ranks_here)
    have = available_bytes(model.xp) if available is None else available
    if have is None or need <= have:
        return
    per = need / max(1, ranks_here) / max(1, batch_per_rank)
    ranks = f" on each of {ranks_here} ranks here" if ranks_here > 1 else ""
    raise UserError(f"a batch of {batch_per_rank} samples per rank{ranks} needs about "
                    f"{format_bytes(need)} for activations (about {format_bytes(per)} per "
                    f"sample for this model); {_where(model.xp)} has {format_bytes(have)} "
                    "available: use a smaller batch per rank, or more nodes")
