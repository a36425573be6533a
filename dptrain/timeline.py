"""A Chrome trace (chrome://tracing, Perfetto) of what each rank does in a step."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class Timeline:
    """Collects complete events ("ph": "X"); disabled instances cost one branch."""

    def __init__(self, enabled: bool, rank: int = 0) -> None:
        self.enabled = enabled
        self.rank = rank
        self.events: list[dict[str, Any]] = []
        self._t0 = time.perf_counter()

    def _us(self, t: float) -> float:
        return round((t - self._t0) * 1e6, 1)

    def add(self, name: str, start: float, end: float, cat: str = "step",
            tid: int = 0, **args: Any) -> None:
        if self.enabled:
            self.events.append({"name": name, "cat": cat, "ph": "X", "pid": self.rank,
                                "tid": tid, "ts": self._us(start),
                                "dur": round((end - start) * 1e6, 1), "args": args})

    @contextmanager
    def span(self, name: str, cat: str = "step", tid: int = 0, **args: Any) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, t, time.perf_counter(), cat, tid, **args)

    def write(self, path: str | Path) -> Path:
        """Write this rank's events to ``path`` (``.rankN`` inserted when several ranks)."""
        p = Path(path)
        doc = {"traceEvents": self.events + [
            {"name": "process_name", "ph": "M", "pid": self.rank,
             "args": {"name": f"rank {self.rank}"}}], "displayTimeUnit": "ms"}
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, p)
        return p


def merge_traces(paths: list[Path], out: Path) -> Path:
    """One trace holding every rank's events (each rank is its own process row)."""
    events: list[dict[str, Any]] = []
    for p in paths:
        events.extend(json.loads(Path(p).read_text())["traceEvents"])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    os.replace(tmp, out)
    return out
