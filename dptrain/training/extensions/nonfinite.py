"""The non-finite policy: stop at the first step whose gradient (or update) is NaN/Inf, or
skip such steps (the step has already left parameters and state as they were) and stop
after too many in a row. The guard's verdict is agreed by every rank.

An update that made the parameters non-finite shows only in the next step's gradient; that
step then undoes it, so the breaking step counts as skipped too, and does not end a run
of skips: with a learning rate far too high, every update is undone and ``max_skips``
still stops the run."""

from __future__ import annotations

from typing import Any

from ...errors import StopTraining
from ..extension import Extension
from ..status import Status


class NonFinitePolicy(Extension):
    name = "nonfinite"

    def __init__(self, policy: str = "stop", max_skips: int = 10) -> None:
        self.policy, self.max_skips = policy, max_skips
        self.skipped = 0       # skipped steps over the whole run (kept in checkpoints)
        self.consecutive = 0
        #: the last step that looked clean, and the run of skips it ended (an update undone
        #: at the next step did not end it)
        self._clean = (0, 0)

    def trigger(self, status: Status) -> bool:
        return status.skipped or self.consecutive > 0

    def __call__(self, trainer: Any, status: Status) -> None:
        if not status.skipped:
            self._clean = (status.step, self.consecutive)
            self.consecutive = 0
            return
        if self.policy == "stop":
            if status.broken_by:
                raise StopTraining(1, broken_message(status.broken_by))
            raise StopTraining(1, f"non-finite loss or gradient at step {status.step} "
                                  "(use --debug to find the layer, or --on-nonfinite skip)")
        if 0 < status.broken_by < status.step:  # that step's update is undone: skipped too
            step, before = self._clean
            self.consecutive = before if step == status.broken_by else 0
            self.skipped += 1
            self.consecutive += 1
        self.skipped += 1
        self.consecutive += 1
        if status.broken_by:
            trainer.say(f"warning: the update of step {status.broken_by} made parameters "
                        f"non-finite; it is undone and step {status.step} skipped "
                        f"({self.consecutive} in a row)")
        else:
            trainer.say(f"warning: non-finite gradient at step {status.step}; update skipped "
                        f"({self.consecutive} in a row)")
        trainer.log("skipped_step", step=status.step, consecutive=self.consecutive,
                    skipped_steps=self.skipped)
        if self.consecutive >= self.max_skips:
            raise StopTraining(1, f"{self.consecutive} consecutive non-finite steps "
                                  f"(up to step {status.step}); stopping")

    def state_dict(self) -> dict[str, float]:
        return {"skipped_steps": self.skipped}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.skipped = int(state.get("skipped_steps", 0))


def broken_message(step: int) -> str:
    """Why training stops when an update made the parameters non-finite."""
    return (f"non-finite parameters or optimizer state after the update of step {step} (lower "
            "the learning rate, clip with --clip-norm, or use --dtype float64)")
