"""Counter-based random numbers: splitmix64 of (key, counter), on ints and uint64 arrays.

Every random choice dptrain makes after initialisation (dropout masks, augmentation) is a
hash of (seed, epoch, a stream salt, a global sample index, a draw number), so it is the
same whichever rank computes it and whichever other samples share the batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB


def splitmix64_int(z: int) -> int:
    """The splitmix64 finaliser on one Python int (host side key derivation)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * M1) & MASK64
    z = ((z ^ (z >> 27)) * M2) & MASK64
    return z ^ (z >> 31)


def splitmix64(z: Any) -> Any:
    """The splitmix64 finaliser on a uint64 array, in place (wrapping arithmetic)."""
    u = np.uint64
    z ^= z >> u(30)
    z *= u(M1)
    z ^= z >> u(27)
    z *= u(M2)
    z ^= z >> u(31)
    return z


def stream_key(seed: int, epoch: int, salt: int) -> int:
    """A 64-bit key for one (seed, epoch, layer) stream."""
    k = splitmix64_int(int(seed) + GAMMA)
    k = splitmix64_int(k ^ ((int(epoch) + 1) * GAMMA))
    return splitmix64_int(k ^ ((int(salt) + 1) * M1))
