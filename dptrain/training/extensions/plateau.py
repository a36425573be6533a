"""Reduce on plateau, fed: at the end of every whole epoch the schedule observes one
figure (``plateau_metric``), agreed by every rank, and may lower the rate for the steps
that follow. Its state (the rate, the best, the bad-epoch and cooldown counters) lives in
the checkpoint as ``plateau_*`` attributes, so a resumed run goes on with the same rates.
"""

from __future__ import annotations

from typing import Any

from ...schedules import Plateau, Warmup
from ..extension import Extension
from ..monitor import agreed_value
from ..status import Status

PREFIX = "plateau_"


def plateau_of(schedule: Any) -> Plateau | None:
    """The reduce-on-plateau schedule inside ``schedule`` (behind a warmup), if any."""
    inner = schedule.main if isinstance(schedule, Warmup) else schedule
    return inner if isinstance(inner, Plateau) else None


class PlateauFeed(Extension):
    name = "plateau"

    def __init__(self, schedule: Any, metric: str) -> None:
        self.schedule, self.metric = schedule, metric
        plateau = plateau_of(schedule)
        assert plateau is not None, "PlateauFeed needs a plateau schedule"
        self.plateau = plateau

    def trigger(self, status: Status) -> bool:
        return status.epoch_end

    def __call__(self, trainer: Any, status: Status) -> None:
        value = trainer.observation.get(self.metric)
        if value is None:
            return
        before = self.plateau.lr
        self.schedule.observe(agreed_value(trainer.comm, value), status.step)
        after = self.plateau.lr
        if after < before:
            trainer.say(f"lr reduced from {before:.4g} to {after:.4g} after epoch "
                        f"{status.epoch + 1}: {self.metric} has not improved for more than "
                        f"{self.plateau.patience} epoch(s)")
            trainer.log("lr_reduced", epoch=status.epoch + 1, step=status.step,
                        metric=self.metric, value=value, lr_before=before, lr=after)

    def state_dict(self) -> dict[str, float]:
        return {PREFIX + k: v for k, v in self.plateau.state_dict().items()}

    def load_state_dict(self, state: dict[str, float]) -> None:
        mine = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
        if mine:  # none in a checkpoint of a run with another schedule: start afresh
            self.plateau.load_state_dict(mine)
