"""The Chrome trace of a run (``--timeline``): each rank writes its own at the end; after a
completed run rank 0 merges them into one file on one time axis and removes the per-rank
files (a failed run leaves them, NAME.rankN.json, since not every rank may have written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...timeline import Timeline, merge_traces, rank_path
from ..extension import Extension


class TimelineWriter(Extension):
    name = "timeline"

    def __init__(self, timeline: Timeline, path: str) -> None:
        self.timeline, self.path = timeline, Path(path)
        self.written = False

    def close(self, trainer: Any) -> None:
        if self.written:
            return
        self.written = True
        comm = trainer.comm
        if comm.size == 1:
            self.timeline.write(self.path)
            return
        self.timeline.write(rank_path(self.path, comm.rank))
        if not trainer.finished:  # a failed run: no barrier that a dead rank never reaches
            return
        comm.barrier()
        if comm.rank == 0:
            ranks = [rank_path(self.path, r) for r in range(comm.size)]
            merge_traces(ranks, self.path)
            for p in ranks:  # merged: the one file is the trace
                p.unlink(missing_ok=True)
