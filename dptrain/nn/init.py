"""Parameter initialisers: host NumPy arrays drawn from an explicit generator.

Every initialiser takes ``(rng, shape, fan_in, fan_out, dtype)`` and uses ``rng`` only,
never NumPy's global random state, so a model's initial parameters depend on its seed
alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import UserError

Initializer = Callable[[np.random.Generator, tuple[int, ...], int, int, Any], np.ndarray]


def he_uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int,
               dtype: Any) -> np.ndarray:
    """Uniform on [-l, l] with l = sqrt(6 / fan_in) (variance 2 / fan_in, for ReLU)."""
    limit = math.sqrt(6.0 / max(fan_in, 1))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


def he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int,
              dtype: Any) -> np.ndarray:
    """Normal with standard deviation sqrt(2 / fan_in)."""
    std = math.sqrt(2.0 / max(fan_in, 1))
    return (rng.standard_normal(size=shape) * std).astype(dtype)


def glorot_uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int,
                   fan_out: int, dtype: Any) -> np.ndarray:
    """Uniform on [-l, l] with l = sqrt(6 / (fan_in + fan_out)) (Xavier)."""
    limit = math.sqrt(6.0 / max(fan_in + fan_out, 1))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


def glorot_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int,
                  fan_out: int, dtype: Any) -> np.ndarray:
    """Normal with standard deviation sqrt(2 / (fan_in + fan_out))."""
    std = math.sqrt(2.0 / max(fan_in + fan_out, 1))
    return (rng.standard_normal(size=shape) * std).astype(dtype)


def zeros(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int,
          dtype: Any) -> np.ndarray:
    """All zeros (draws nothing from ``rng``)."""
    return np.zeros(shape, dtype=dtype)


INITIALIZERS: dict[str, Initializer] = {
    "he_uniform": he_uniform,
    "he_normal": he_normal,
    "glorot_uniform": glorot_uniform,
    "glorot_normal": glorot_normal,
    "zeros": zeros,
}


def get_initializer(name: str) -> Initializer:
    """The initialiser called ``name``; a UserError names the known ones otherwise."""
    try:
        return INITIALIZERS[str(name).lower()]
    except KeyError:
        raise UserError(f"unknown initializer {name!r}; known: "
                        f"{', '.join(sorted(INITIALIZERS))}") from None
