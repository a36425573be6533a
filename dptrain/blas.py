"""Level-1 BLAS ``axpby`` of the OpenBLAS that NumPy itself links, for the optimizer's
whole-buffer updates.

``y = alpha * x + beta * y`` takes one pass over memory, where NumPy needs two ufunc
calls and a temporary (``p -= lr * v`` reads ``v``, writes the temporary, reads it
again). It is used only where its results are bit-identical to NumPy's (two roundings,
no fused multiply-add: checked once on random data), so the CPU and GPU paths and every
rank keep computing the same bytes. Only the ILP64 symbols of NumPy's own wheels
(``scipy_cblas_saxpby64_`` ...) or of an OpenBLAS built with the ``64_`` suffix are used,
whose integer width is known; anything else (MKL, other builds, CuPy arrays) gets
``None`` and the caller keeps its NumPy code.
"""

from __future__ import annotations

import ctypes
from functools import cache
from typing import Any

import numpy as np

#: (symbol prefix, suffix) of ILP64 OpenBLAS builds, in the order they are tried
_NAMES = (("scipy_cblas_", "64_"), ("cblas_", "64_"))


class Level1:
    """``axpby`` for one floating-point type, on contiguous 1-D NumPy arrays."""

    def __init__(self, axpby: Any, dtype: np.dtype) -> None:
        self._axpby, self.dtype = axpby, dtype

    def usable(self, *arrays: Any) -> bool:
        """True when every array is a C-contiguous 1-D NumPy array of this type and size."""
        n = arrays[0].size
        return all(isinstance(a, np.ndarray) and a.dtype == self.dtype and a.ndim == 1
                   and a.size == n and a.flags.c_contiguous for a in arrays)

    def axpby(self, alpha: float, x: np.ndarray, beta: float, y: np.ndarray) -> None:
        """y = alpha * x + beta * y, in place (rounded like NumPy's ``y *= beta;
        y += alpha * x`` with alpha or beta equal to 1)."""
        self._axpby(y.size, alpha, x.ctypes.data, 1, beta, y.ctypes.data, 1)


def _library() -> ctypes.CDLL | None:
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415
    except ImportError:
        return None
    for info in threadpool_info():
        if info.get("user_api") == "blas" and info.get("internal_api") == "openblas":
            try:
                return ctypes.CDLL(info["filepath"])
            except OSError:
                return None
    return None


@cache
def level1(dtype: Any) -> Level1 | None:
    """The kernel for float32 or float64, or None where it cannot be used safely."""
    dt = np.dtype(dtype)
    letter = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}.get(dt)
    lib = _library() if letter else None
    if lib is None:
        return None
    real = ctypes.c_float if letter == "s" else ctypes.c_double
    n, ptr = ctypes.c_int64, ctypes.c_void_p
    for prefix, suffix in _NAMES:
        try:
            axpby = getattr(lib, f"{prefix}{letter}axpby{suffix}")
        except AttributeError:
            continue
        axpby.argtypes, axpby.restype = [n, real, ptr, n, real, ptr, n], None
        kernel = Level1(axpby, dt)
        if _rounds_like_numpy(kernel):
            return kernel
    return None


def _rounds_like_numpy(k: Level1) -> bool:
    """Both update forms, on random data of a few sizes and offsets, equal NumPy's bytes."""
    rng = np.random.default_rng(12345)
    for size in (1, 7, 64, 1031, 40_009):
        x = rng.standard_normal(size + 1).astype(k.dtype)[1:]  # also an unaligned start
        y = rng.standard_normal(size).astype(k.dtype)
        want = y * k.dtype.type(0.9)
        want += x
        got = y.copy()
        k.axpby(1.0, x, 0.9, got)
        want2 = y - np.multiply(x, 0.0123)
        got2 = y.copy()
        k.axpby(-0.0123, x, 1.0, got2)
        if not (np.array_equal(want, got) and np.array_equal(want2, got2)):
            return False
    return True
