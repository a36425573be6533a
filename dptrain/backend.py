"""Array-module selection (NumPy or CuPy) and host<->device helpers.

Every step of training uses ``Backend.xp`` for its arrays, so the same code runs on
NumPy and on CuPy. Only ``to_host``/``to_device`` cross between host and device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .errors import UserError


@dataclass
class Backend:
    """The array module of one rank and the device it runs on."""

    xp: ModuleType
    name: str = "cpu"
    device_id: int | None = None

    @property
    def is_gpu(self) -> bool:
        return self.name == "gpu"

    def to_host(self, a: Any) -> np.ndarray:
        """A NumPy copy (or view, on CPU) of ``a``."""
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


CPU = Backend(np, "cpu", None)


def _import_cupy() -> ModuleType | None:
    try:
        import cupy  # noqa: PLC0415
    except Exception:  # ImportError, or a CUDA library that fails to load
        return None
    return cupy


def select_backend(device: str, local_rank: int = 0, local_size: int = 1,
                   allow_sharing: bool = False) -> Backend:
    """Choose NumPy or CuPy for ``device`` (cpu|gpu|auto) and bind one GPU per local rank."""
    if device == "cpu":
        return CPU
    if device not in ("gpu", "auto"):
        raise UserError(f"device must be cpu, gpu or auto, not {device!r}")
    cupy = _import_cupy()
    if cupy is None:
        if device == "auto":
            return CPU
        raise UserError("--device gpu needs CuPy: pip install 'dptrain[cuda12]' (or cuda13)")
    try:
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        n_gpus = 0
    if n_gpus == 0:
        if device == "auto":
            return CPU
        raise UserError("--device gpu: CuPy found no GPU (check CUDA_VISIBLE_DEVICES and drivers)")
    if local_size > n_gpus and not allow_sharing:
        raise UserError(
            f"{local_size} ranks on this node but only {n_gpus} visible GPU(s); "
            "start one rank per GPU or pass --allow-gpu-sharing")
    dev = local_rank % n_gpus
    cupy.cuda.Device(dev).use()
    return Backend(cupy, "gpu", dev)


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
