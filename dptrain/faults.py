"""Test-only fault injection, so the failure paths can be exercised for real.

``DPTRAIN_FAULT="rank=1,where=backward,step=3,kind=raise"`` makes rank 1 raise at the
start of backward in step 3 (steps count from 1, as in every message). Fields:

- ``where``: data | forward | backward | allreduce | optimizer | checkpoint
- ``kind``:  raise (an uncaught RuntimeError), kill (SIGKILL to this process),
  hang (sleep ``seconds``, default 3600), nan (a NaN in this step's input batch at
  ``data``, in the loss gradient at ``backward``), drift (one ulp added to the first
  parameter at ``optimizer``, on this rank only)
- ``rank``:  the rank that fails (default: every rank)
- ``step``:  ``N`` or ``N-M`` (default: every step)

The variable is read once, by ``load()``; ``attach(trainer)`` then hooks the fault into
the step's and the checkpoint writer's hook points, so an unset fault costs nothing in the
hot path. ``DPTRAIN_TEST_PAUSE_IN_WRITE=seconds`` makes checkpoint writes sleep half-way.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import UserError

ENV = "DPTRAIN_FAULT"
PAUSE_ENV = "DPTRAIN_TEST_PAUSE_IN_WRITE"
WHERE = ("data", "forward", "backward", "allreduce", "optimizer", "checkpoint")
KINDS = ("raise", "kill", "hang", "nan", "drift")


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


def load() -> Fault | None:
    """Arm the fault described by the environment, if any."""
    global _active
    text = os.environ.get(ENV, "").strip()
    _active = parse(text) if text else None
    return _active


def attach(trainer: Any) -> None:
    """Hook the armed fault (and the write pause) into ``trainer``'s step and writer."""
    f = _active
    writer = next((e.hooks for e in trainer.extensions
                   if "mid_write" in getattr(getattr(e, "hooks", None), "points", ())), None)
    if f is not None and f.where != "checkpoint":
        trainer.step.hooks.add(f.where, lambda step, rank, array=None: inject(
            f.where, rank, step, array))
    if writer is None:
        return
    if f is not None and f.where == "checkpoint":
        rank = trainer.rank
        writer.add("before_write", lambda path, step: inject("checkpoint", rank, step))
    delay = os.environ.get(PAUSE_ENV)
    if delay:
        writer.add("mid_write", lambda path, step: time.sleep(float(delay)))


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
