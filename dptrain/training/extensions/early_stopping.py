"""The best epoch and early stopping, both judged by ``early_stop_metric`` (test loss or
test accuracy) at the end of every whole epoch.

An epoch is the new best when it beats the best so far by at least ``early_stop_min_delta``
(and by anything at all): the checkpoint extension then writes best.h5, and with
``restore_best`` model.h5 gets those weights at the end. After ``early_stop_patience``
epochs in a row without a new best, training ends as a completed run. The counters live
in the checkpoint, so a resumed run stops at the same epoch as an uninterrupted one, and
a run that has stopped stays stopped (resume it with a larger patience, or 0, to go on).
"""

from __future__ import annotations

import math
from typing import Any

from ...errors import UserError
from ..extension import Extension
from ..monitor import BEST_METRICS, agreed_value, improves
from ..status import Status


class EarlyStopping(Extension):
    name = "early_stopping"

    def __init__(self, metric: str, patience: int = 0, min_delta: float = 0.0,
                 enabled: bool = True) -> None:
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        self.enabled = enabled   # there is a test split to judge by
        self.best = math.nan     # the best value so far (``best_metric`` in checkpoints)
        self.best_epoch = 0      # the epoch (from 1) that reached it; 0: none yet
        self.wait = 0            # whole epochs since the best one

    @property
    def stopped(self) -> bool:
        return bool(self.patience) and self.wait >= self.patience

    def start(self, trainer: Any) -> None:
        if self.stopped and not trainer.plan.done(trainer.state):
            trainer.say(f"nothing to train: early stopping ended this run after epoch "
                        f"{trainer.state.epoch} ({self._why()}); resume with a larger "
                        "early_stop_patience, or 0, to train on")
            trainer.stop_after_step("stopped early")

    def trigger(self, status: Status) -> bool:
        return self.enabled and status.epoch_end

    def __call__(self, trainer: Any, status: Status) -> None:
        value = trainer.observation.get(self.metric)
        if value is None:
            return
        value = agreed_value(trainer.comm, value)
        if improves(value, self.best, self.metric, self.min_delta):
            self.best, self.best_epoch, self.wait = value, status.epoch + 1, 0
            trainer.observation["new_best"] = True
            return
        self.wait += 1
        if not self.stopped:
            return
        trainer.say(f"early stopping after epoch {status.epoch + 1}: {self._why()}")
        trainer.log("early_stop", epoch=status.epoch + 1, step=status.step,
                    metric=self.metric, best=self.best, best_epoch=self.best_epoch,
                    patience=self.patience, min_delta=self.min_delta)
        trainer.stop_after_step(f"{self.metric} has not improved for {self.wait} epochs")

    def _why(self) -> str:
        by = f" by {self.min_delta:g}" if self.min_delta else ""
        best = (f"best {self.best:.4f} in epoch {self.best_epoch}" if self.best_epoch
                else "no best epoch")
        return (f"{self.metric} has not improved{by} for {self.wait} epoch(s), patience "
                f"{self.patience}; {best}")

    def state_dict(self) -> dict[str, float]:
        # best_metric is a counter of the format; the others only where they are not 0, so
        # that a run that never evaluated writes the layout files always had
        state: dict[str, float] = {"best_metric": self.best}
        extra = {"best_epoch": self.best_epoch, "best_of": BEST_METRICS.index(self.metric),
                 "early_stop_wait": self.wait}
        state.update({k: v for k, v in extra.items() if v})
        return state

    def load_state_dict(self, state: dict[str, float]) -> None:
        # files written before the choice of metric judged the best by test accuracy
        of = _count(state, "best_of", len(BEST_METRICS) - 1)
        if of != BEST_METRICS.index(self.metric):  # another metric: its best means nothing
            self.best, self.best_epoch, self.wait = math.nan, 0, 0
            return
        self.best = float(state.get("best_metric", math.nan))
        self.best_epoch = _count(state, "best_epoch")
        self.wait = _count(state, "early_stop_wait")


def _count(state: dict[str, float], key: str, high: float = 2**53) -> int:
    """A whole number >= 0 kept in a checkpoint (0 when absent); anything else is a
    damaged checkpoint."""
    v = float(state.get(key, 0))
    if not (math.isfinite(v) and v == int(v) and 0 <= v <= high):
        raise UserError(f"the checkpoint's {key} is {v!r}, not a whole number from 0 to "
                        f"{int(high)}")
    return int(v)
