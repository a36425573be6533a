"""Extensions: what the loop runs after a step when their trigger fires.

An extension is a small object with a ``trigger(status)`` that reads only the agreed
``Status`` and a ``__call__(trainer, status)`` that does the work; ``start``, ``finish``
(a normal end of training) and ``close`` (always) bracket the run. Numbers it must keep
across a resume go into the checkpoint through ``state_dict``/``load_state_dict``
(plain numbers, stored as ``/trainer`` attributes under the keys it chooses).

A user adds one from Python: ``trainer.extensions.append(MyExtension())`` before
``trainer.run()`` (see scripts/custom_extension.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .status import Status

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer


class Extension:
    """Base class; every hook does nothing by default."""

    #: unique among a trainer's extensions (used in messages)
    name: str = "extension"

    def trigger(self, status: Status) -> bool:
        """Run after this step? Must depend on ``status`` alone (every rank agrees)."""
        return False

    def __call__(self, trainer: Trainer, status: Status) -> None:
        """The work, on every rank (collective calls are allowed: all ranks are here)."""

    def start(self, trainer: Trainer) -> None:
        """Before the first step (after a resume has restored the state)."""

    def finish(self, trainer: Trainer) -> None:
        """After the last step of a run that completed."""

    def close(self, trainer: Trainer) -> None:
        """At the very end, also after an error or a preemption (release resources)."""

    def state_dict(self) -> dict[str, float]:
        """Numbers to keep in the checkpoint (keys unique over all extensions)."""
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Numbers of a checkpoint (every key any extension stored; take your own). Rank 0
        also calls it while it checks the checkpoint, before anything on disk changes: a
        UserError here refuses the resume cleanly, and it must be safe to call twice."""


def every_steps(n: int, status: Status) -> bool:
    """A trigger part: every ``n`` global steps (never when n is 0)."""
    return bool(n) and status.step % n == 0
