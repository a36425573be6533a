"""The one rule for splitting n items over ranks: contiguous parts, the first n % parts
ranks one item more. It splits each global batch over the ranks (a rank may get none)
and a node's shared buffers into the slices each rank sums and updates."""

from __future__ import annotations


def part_bounds(n: int, k: int, parts: int) -> tuple[int, int]:
    """[start, stop) of part ``k`` of ``n`` items in ``parts`` contiguous parts."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if not 0 <= k < parts:
        raise ValueError(f"part {k} out of range for {parts} parts")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(int(n), int(parts))
    start = k * base + min(k, extra)
    return start, start + base + (1 if k < extra else 0)


def all_part_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Every part's [start, stop), in order."""
    return [part_bounds(n, k, parts) for k in range(parts)]
