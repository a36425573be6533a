"""``--debug``: a finite-difference check of the whole model's gradient before training."""

from __future__ import annotations

from typing import Any

from ...gradcheck import report_model_gradcheck
from ..extension import Extension


class GradientCheck(Extension):
    name = "gradient_check"

    def start(self, trainer: Any) -> None:
        trainer.say(report_model_gradcheck(trainer.model, trainer.loss, trainer.data.head(4),
                                           trainer.cfg.run.seed))
