"""Test-only hooks, so failure paths can be exercised for real: faults and pause points.

``DPTRAIN_FAULT="rank=1,where=backward,step=3,kind=raise"`` makes rank 1 raise at the
start of backward in step 3 (steps count from 1, as in every message). Fields:

- ``where``: data | forward | backward | allreduce | optimizer | checkpoint
- ``kind``:  raise (an uncaught RuntimeError), kill (SIGKILL to this process),
  hang (sleep ``seconds``, default 3600), nan (a NaN in this step's input batch at
  ``data``, in the loss gradient at ``backward``), drift (one ulp added to the first
  parameter at ``optimizer``, on this rank only)
- ``rank``:  the rank that fails (default: every rank)
- ``step``:  ``N`` or ``N-M`` (default: every step)

Pause points let a test act at an exact moment, whatever the speed of the machine:
``DPTRAIN_TEST_PAUSE="write@7,start"`` with ``DPTRAIN_TEST_PAUSE_DIR=DIR`` makes the process
stop at each named point (``name``, ``name@N`` or ``name@N-M`` for the steps N to M). There
it writes the marker file ``DIR/NAME-STEP.PID.SEQ.paused`` (JSON: point, step, pid and what
the call site adds, e.g. the rank) and waits until the test deletes that file, or kills the
process. A pause nobody releases within ``PAUSE_LIMIT`` seconds fails the process. Points:

- ``write``:      a checkpoint or model file half written (its temporary file on disk)
- ``checkpoint``: checkpoint N complete, on every rank (written, pruned, agreed)
- ``start``:      set up and resumed, before the first step of this process
- ``signal``:     the first stop signal (SIGTERM, SIGUSR1) caught, in the handler

The variables are read once, by ``load()``; ``attach(trainer)`` then hooks the fault and
the pause points into the trainer from outside (its step's and its checkpoint writer's hook
points, a start extension, the stop-signal handler), so an unset fault or pause costs
nothing in the hot path.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

ENV = "DPTRAIN_FAULT"
WHERE = ("data", "forward", "backward", "allreduce", "optimizer", "checkpoint")
KINDS = ("raise", "kill", "hang", "nan", "drift")
PAUSE_ENV = "DPTRAIN_TEST_PAUSE"
PAUSE_DIR_ENV = "DPTRAIN_TEST_PAUSE_DIR"
POINTS = ("write", "checkpoint", "start", "signal")
PAUSE_LIMIT = 600.0  # seconds a pause waits for its release: a hang guard, never a delay


@dataclass(frozen=True)
class Fault:
    """One planned failure: what, where, on which rank, at which steps."""

    where: str
    kind: str
    rank: int | None = None
    first: int = 1
    last: int = 1 << 62
    seconds: float = 3600.0


_active: Fault | None = None


def parse(text: str) -> Fault:
    """``key=value,...`` -> Fault; a malformed spec is a UserError naming the variable."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in ("where", "kind", "rank", "step", "seconds"):
            raise UserError(f"{ENV}: cannot read {part.strip()!r} (expected key=value with keys "
                            "where, kind, rank, step, seconds)")
        fields[key] = value.strip()
    where, kind = fields.get("where", ""), fields.get("kind", "")
    if where not in WHERE or kind not in KINDS:
        raise UserError(f"{ENV}: where must be one of {', '.join(WHERE)} and kind one of "
                        f"{', '.join(KINDS)}")
    try:
        rank = int(fields["rank"]) if "rank" in fields else None
        first, _, last = fields.get("step", "1-" + str(1 << 62)).partition("-")
        seconds = float(fields.get("seconds", 3600))
        return Fault(where, kind, rank, int(first), int(last or first), seconds)
    except ValueError:
        raise UserError(f"{ENV}: rank, step (N or N-M) and seconds must be numbers") from None


@dataclass(frozen=True)
class Pause:
    """One pause point, at every step (``first`` None) or at the steps first to last."""

    point: str
    first: int | None = None
    last: int | None = None

    def matches(self, point: str, step: int | None) -> bool:
        if point != self.point:
            return False
        return self.first is None or (step is not None and self.first <= step <= self.last)

    def __str__(self) -> str:
        if self.first is None:
            return self.point
        return f"{self.point}@{self.first}" + (f"-{self.last}" if self.last != self.first else "")


@dataclass(frozen=True)
class Pauses:
    """Where to pause, and the directory of the marker files."""

    points: tuple[Pause, ...]
    directory: Path

    def __str__(self) -> str:
        return f"{','.join(map(str, self.points))} (markers in {self.directory})"


_pauses: Pauses | None = None
_paused = 0  # pauses so far in this process: the SEQ of the next marker


def parse_pauses(text: str, directory: str) -> Pauses:
    """``name[@N[-M]],...`` and a directory -> Pauses; a mistake names the variable."""
    points = []
    for part in (p.strip() for p in text.split(",")):
        point, at, steps = part.partition("@")
        if point not in POINTS:
            raise UserError(f"{PAUSE_ENV}: unknown pause point {part!r} (expected NAME, "
                            f"NAME@N or NAME@N-M with NAME one of {', '.join(POINTS)})")
        if not at:
            points.append(Pause(point))
            continue
        first, _, last = steps.partition("-")
        try:
            pause = Pause(point, int(first), int(last or first))
        except ValueError:
            pause = None
        if pause is None or pause.last < pause.first:
            raise UserError(f"{PAUSE_ENV}: the steps of {part!r} must be N or N-M (N <= M)")
        points.append(pause)
    if not directory:
        raise UserError(f"{PAUSE_ENV} is set but {PAUSE_DIR_ENV} (where the markers go) is not")
    return Pauses(tuple(points), Path(directory))


def load() -> Fault | None:
    """Arm the fault and the pause points described by the environment, if any."""
    global _active, _pauses
    text = os.environ.get(ENV, "").strip()
    _active = parse(text) if text else None
    text = os.environ.get(PAUSE_ENV, "").strip()
    _pauses = parse_pauses(text, os.environ.get(PAUSE_DIR_ENV, "")) if text else None
    return _active


def pauses() -> Pauses | None:
    """The armed pause points (None: none)."""
    return _pauses


def pause_point(name: str, step: int | None = None, **info: Any) -> None:
    """At point ``name`` (of ``step``): if a test asked to pause here, report and wait."""
    plan = _pauses
    if plan is None:
        return
    if any(p.matches(name, step) for p in plan.points):
        _pause(plan.directory, name, step, info)


def _pause(directory: Path, name: str, step: int | None, info: dict[str, Any]) -> None:
    """Write the marker atomically, then wait until it is gone."""
    global _paused
    stem = name if step is None else f"{name}-{step}"
    marker = directory / f"{stem}.{os.getpid()}.{_paused}.paused"
    _paused += 1
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{marker.name}.tmp"
    tmp.write_text(json.dumps({"point": name, "step": step, "pid": os.getpid(), **info}))
    os.replace(tmp, marker)
    deadline = time.monotonic() + PAUSE_LIMIT
    while marker.exists():
        if time.monotonic() > deadline:
            marker.unlink(missing_ok=True)
            raise RuntimeError(f"{PAUSE_ENV}: the pause at {marker.name} was not released "
                               f"within {PAUSE_LIMIT:g} s")
        time.sleep(0.005)


def attach(trainer: Any) -> None:
    """Hook the armed fault and pause points into ``trainer`` (its step's and checkpoint
    writer's hooks, one extension for ``start``, the stop-signal handler for ``signal``)."""
    f, rank = _active, trainer.rank
    writer = next((e.hooks for e in trainer.extensions
                   if "mid_write" in getattr(getattr(e, "hooks", None), "points", ())), None)
    if f is not None and f.where != "checkpoint":
        trainer.step.hooks.add(f.where, lambda step, rank, array=None: inject(
            f.where, rank, step, array))
    if f is not None and f.where == "checkpoint" and writer is not None:
        writer.add("before_write", lambda path, step: inject("checkpoint", rank, step))
    if _pauses is None:
        return
    if writer is not None:
        writer.add("mid_write", lambda path, step: pause_point("write", step, path=str(path),
                                                               rank=rank))
        writer.add("saved", lambda path, step: pause_point("checkpoint", step, rank=rank,
                                                           path=str(path)))
    trainer.extensions.append(_StartPause())
    from . import signals  # noqa: PLC0415

    signals.on_first_signal(lambda signum: pause_point(
        "signal", trainer.state.global_step, rank=rank, signal=signals.name(signum)))


class _StartPause:
    """The ``start`` pause point: set up and resumed, before this process's first step."""

    name = "test_pause_start"

    def start(self, trainer: Any) -> None:
        pause_point("start", trainer.state.global_step, rank=trainer.rank)

    def trigger(self, status: Any) -> bool:
        return False

    def finish(self, trainer: Any) -> None:
        """Nothing to do at the end."""

    def close(self, trainer: Any) -> None:
        """Nothing to release."""

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """It keeps no numbers."""


def inject(where: str, rank: int, step: int, array: Any = None) -> None:
    """At point ``where`` of ``step`` on ``rank``: fail as planned, or corrupt ``array``."""
    f = _active
    if f is None or f.where != where or not f.first <= step <= f.last:
        return
    if f.rank is not None and f.rank != rank:
        return
    if f.kind == "raise":
        raise RuntimeError(f"injected fault in {where} of step {step} on rank {rank}")
    if f.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if f.kind == "hang":
        time.sleep(f.seconds)
    if array is None or array.size == 0:
        return
    flat = array.reshape(-1)
    if f.kind == "nan":
        flat[0] = float("nan")
    elif f.kind == "drift":  # at least one ulp, whatever the dtype and value
        flat[0] += np.finfo(array.dtype).eps * max(1.0, abs(float(flat[0])))
