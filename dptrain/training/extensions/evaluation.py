"""Test-set evaluation at the end of every epoch (and of a run stopped part-way through
one): the loss, top-1 and, with 5 classes or more, top-5 accuracy, reported into the
trainer's observation as test_loss, test_acc and test_top5.

The loss is the model's loss without label smoothing (as PyTorch code evaluates with a
plain cross-entropy), so test losses compare across smoothing settings.
"""

from __future__ import annotations

from typing import Any

from ..evaluate import evaluate_model
from ..extension import Extension
from ..status import Status


class Evaluation(Extension):
    name = "evaluation"

    def __init__(self, dataset: Any, batch_size: int, loss: Any = None) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self.loss = loss  # None: the training loss

    def trigger(self, status: Status) -> bool:
        return status.report_due and self.dataset is not None and len(self.dataset) > 0

    def __call__(self, trainer: Any, status: Status) -> None:
        ev = evaluate_model(trainer.model, self.loss or trainer.loss, self.dataset,
                            trainer.comm, trainer.model.xp, self.batch_size)
        trainer.observation.update(test_loss=ev["loss"], test_acc=ev["accuracy"])
        if "top5" in ev:
            trainer.observation["test_top5"] = ev["top5"]
