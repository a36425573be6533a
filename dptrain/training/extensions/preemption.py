"""Preemption: a SIGTERM or SIGUSR1 on any rank (agreed in the per-step allreduce) ends
training at this step boundary with a checkpoint and exit code 75."""

from __future__ import annotations

from typing import Any

from ... import signals
from ...errors import EXIT_PREEMPTED, StopTraining
from ..extension import Extension
from ..status import Status
from .checkpoints import Checkpointing


class Preemption(Extension):
    name = "preemption"

    def __init__(self, checkpoints: Checkpointing) -> None:
        self.checkpoints = checkpoints

    def trigger(self, status: Status) -> bool:
        return status.stop_requested

    def __call__(self, trainer: Any, status: Status) -> None:
        name = signals.name(signals.received())
        path = self.checkpoints.save(trainer, final=True)  # a preemption must checkpoint
        trainer.log("preempted", step=status.step, signal=name, path=str(path))
        raise StopTraining(EXIT_PREEMPTED, f"stopping on {name} at step {status.step}: "
                                           f"checkpoint {path}; resume with --resume auto")
