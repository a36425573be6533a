"""The test side of dptrain's pause points (dptrain/faults.py): arm them, see a process
reach one, let it go on. A test that must act "while" something happens (a kill inside a
checkpoint write, a signal during a save, a second job while the first holds the lock)
pauses the process there and acts, so the moment is certain whatever the machine's speed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dptrain.faults import PAUSE_DIR_ENV, PAUSE_ENV


def pause_env(directory: Path, *points: str) -> dict[str, str]:
    """The environment that makes a run pause at ``points`` (``name`` or ``name@N``), with a
    fresh marker ``directory`` (markers of earlier runs there are removed)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return {PAUSE_ENV: ",".join(points), PAUSE_DIR_ENV: str(directory)}


def reached(directory: Path, point: str, step: int | None = None,
            count: int = 1) -> list[Path]:
    """The markers of processes paused at ``point`` (of ``step``), once there are at least
    ``count`` of them (one per rank that pauses); else []."""
    pattern = f"{point}*.paused" if step is None else f"{point}-{step}.*.paused"
    found = sorted(directory.glob(pattern)) if directory.is_dir() else []
    return found if len(found) >= count else []


def info(marker: Path) -> dict:
    """What the paused process wrote into its marker: point, step, pid, rank, ..."""
    return json.loads(marker.read_text())


def release(markers: list[Path]) -> None:
    """Let the paused processes go on (each waits for its marker to disappear)."""
    for m in markers:
        m.unlink()
