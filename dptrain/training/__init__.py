"""Training: the step, the loop, its extensions, and the one function that builds them.

    from dptrain.config import make_config
    from dptrain.training import build_trainer

    trainer = build_trainer(make_config({"model": "mlp", "epochs": 2}))
    code = trainer.run()          # 0, or 75 when preempted

``trainer.step(batch, lr)`` is one optimizer step on a ``Batch`` of the ``trainer.plan``;
``trainer.extensions`` is the list the loop runs after each step.
"""

from ..errors import StopTraining
from .assembly import build_model, build_trainer
from .evaluate import evaluate_model
from .extension import Extension, every_steps
from .loop import Trainer
from .meter import EpochMeter
from .plan import Batch, BatchPlan
from .status import Status
from .step import StepReport, TrainStep

__all__ = ["Batch", "BatchPlan", "EpochMeter", "Extension", "Status", "StepReport",
           "StopTraining", "TrainStep", "Trainer", "build_model", "build_trainer",
           "evaluate_model", "every_steps"]
