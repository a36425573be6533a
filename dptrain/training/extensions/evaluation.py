"""Test-set evaluation at the end of every epoch (and of a run stopped part-way through
one), and the best test accuracy so far, judged on whole epochs only."""

from __future__ import annotations

import math
from typing import Any

from ..evaluate import evaluate_model
from ..extension import Extension
from ..status import Status


class Evaluation(Extension):
    name = "evaluation"

    def __init__(self, dataset: Any, batch_size: int) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self.best = math.nan
        self.best_epoch = math.nan

    def trigger(self, status: Status) -> bool:
        return status.report_due and self.dataset is not None and len(self.dataset) > 0

    def __call__(self, trainer: Any, status: Status) -> None:
        ev = evaluate_model(trainer.model, trainer.loss, self.dataset, trainer.comm,
                            trainer.model.xp, self.batch_size)
        trainer.observation.update(test_loss=ev["loss"], test_acc=ev["accuracy"])
        # the figures are sums over every rank, the same everywhere: so is the verdict
        if status.epoch_end and (math.isnan(self.best) or ev["accuracy"] > self.best):
            self.best, self.best_epoch = ev["accuracy"], status.epoch + 1
            trainer.observation["new_best"] = True

    def state_dict(self) -> dict[str, float]:
        return {"best_metric": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best = float(state.get("best_metric", math.nan))
        self.best_epoch = float(state.get("best_epoch", math.nan))
