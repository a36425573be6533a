"""Named points where code outside an object can attach callbacks (faults, pauses, probes).

The training step and the checkpoint writer each expose a ``Hooks``; nothing is attached
in a normal run, and then a point costs one truth test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Hooks:
    """Callbacks by point name, called in the order they were added."""

    def __init__(self, *points: str) -> None:
        self.points = points
        self._by_point: dict[str, list[Callable[..., Any]]] = {}

    def add(self, point: str, fn: Callable[..., Any]) -> None:
        """Call ``fn(**info)`` at ``point`` from now on."""
        if point not in self.points:
            raise ValueError(f"unknown hook point {point!r}; known: {', '.join(self.points)}")
        self._by_point.setdefault(point, []).append(fn)

    def __bool__(self) -> bool:
        return bool(self._by_point)

    def fire(self, point: str, **info: Any) -> None:
        """Run every callback of ``point`` (cheap when none is attached)."""
        for fn in self._by_point.get(point, ()):
            fn(**info)
