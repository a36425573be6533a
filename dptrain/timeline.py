"""A Chrome trace (chrome://tracing, Perfetto) of what each rank does in a step.

Each rank is one process row. Row "step" (tid 0) holds the phases (data, forward,
backward, sync_wait, optimizer, checkpoint) with every layer's forward and backward nested
inside them; rows "allreduce bucket k" (tid 100 + k) hold each gradient bucket's
allreduce from its launch to the end of its wait, so a trace shows at a glance whether
communication overlaps backward; row "gradient sum" (tid 99) holds a whole-buffer sum
(blocking allreduce, or the shared-memory sum of ranks on one node). ``merge_traces``
puts the per-rank files on one time axis (each file records the wall-clock time of its
origin).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .atomic import write_atomic

#: thread rows of a rank: the step phases and layers, the gradient sum of the whole buffer
#: (one blocking or shared-memory reduction), then one row per gradient bucket
STEP_TID = 0
SYNC_TID = 99
BUCKET_TID = 100


class Timeline:
    """Collects complete events ("ph": "X"); disabled instances cost one branch."""

    def __init__(self, enabled: bool, rank: int = 0) -> None:
        self.enabled = enabled
        self.rank = rank
        self.events: list[dict[str, Any]] = []
        self._t0 = time.perf_counter()
        self._wall0 = time.time()

    def _us(self, t: float) -> float:
        return round((t - self._t0) * 1e6, 1)

    def add(self, name: str, start: float, end: float, cat: str = "step",
            tid: int = STEP_TID, **args: Any) -> None:
        """One span from ``start`` to ``end`` (``time.perf_counter()`` values)."""
        if self.enabled:
            ts = self._us(start)  # the duration from the rounded ends: spans never overlap
            self.events.append({"name": name, "cat": cat, "ph": "X", "pid": self.rank,
                                "tid": tid, "ts": ts, "dur": round(self._us(end) - ts, 1),
                                "args": args})

    def layer_event(self, phase: str, layer: str, start: float, end: float) -> None:
        """A layer's forward or backward (the model's ``layer_hook``)."""
        if self.enabled:
            ts = self._us(start)
            self.events.append({"name": f"{phase} {layer}", "cat": phase, "ph": "X",
                                "pid": self.rank, "tid": STEP_TID, "ts": ts,
                                "dur": round(self._us(end) - ts, 1), "args": {"layer": layer}})

    @contextmanager
    def span(self, name: str, cat: str = "step", tid: int = STEP_TID,
             **args: Any) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, t, time.perf_counter(), cat, tid, **args)

    def _metadata(self) -> list[dict[str, Any]]:
        """Names for this rank's process row and for every thread row it used."""
        meta = [{"name": "process_name", "ph": "M", "pid": self.rank,
                 "args": {"name": f"rank {self.rank}"}},
                {"name": "process_sort_index", "ph": "M", "pid": self.rank,
                 "args": {"sort_index": self.rank}}]
        for tid in sorted({e["tid"] for e in self.events} | {STEP_TID}):
            label = ("step" if tid < SYNC_TID else "gradient sum" if tid == SYNC_TID
                     else f"allreduce bucket {tid - BUCKET_TID}")
            meta.append({"name": "thread_name", "ph": "M", "pid": self.rank, "tid": tid,
                         "args": {"name": label}})
        return meta

    def write(self, path: str | Path) -> Path:
        """Write this rank's events to ``path`` atomically."""
        p = Path(path)
        doc = {"traceEvents": self.events + self._metadata(), "displayTimeUnit": "ms",
               "otherData": {"rank": self.rank, "origin_unix_s": self._wall0}}
        return write_atomic(p, [json.dumps(doc).encode()], sync=False)


def rank_path(path: str | Path, rank: int) -> Path:
    """Where rank ``rank`` writes its part of a multi-rank trace: NAME.rankN.SUFFIX."""
    p = Path(path)
    return p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


def merge_traces(paths: list[Path], out: Path) -> Path:
    """One trace holding every rank's events (each rank is its own process row), shifted
    onto a common time axis by the wall-clock origin each file records."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    origins = [d.get("otherData", {}).get("origin_unix_s") for d in docs]
    known = [o for o in origins if o is not None]
    base = min(known) if known else 0.0
    events: list[dict[str, Any]] = []
    for doc, origin in zip(docs, origins, strict=True):
        shift = 0.0 if origin is None else round((origin - base) * 1e6, 1)
        for e in doc["traceEvents"]:
            if shift and "ts" in e:
                e = dict(e, ts=round(e["ts"] + shift, 1))
            events.append(e)
    doc = {"traceEvents": events, "displayTimeUnit": "ms",
           "otherData": {"ranks": len(docs), "origin_unix_s": base}}
    return write_atomic(Path(out), [json.dumps(doc).encode()], sync=False)
