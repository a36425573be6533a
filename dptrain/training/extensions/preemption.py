"""Preemption: a SIGTERM or SIGUSR1 on any rank (agreed in the per-step allreduce) ends
training at this step boundary with a checkpoint and exit code 75; the first Ctrl-C does
the same with exit code 130 (a second one ends the process at once)."""

from __future__ import annotations

from typing import Any

from ... import signals
from ...errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, StopTraining
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
        signum = signals.received()
        name = signals.name(signum)
        path = self.checkpoints.save(trainer, final=True)  # a preemption must checkpoint
        trainer.log("preempted", step=status.step, signal=name, path=str(path))
        if signals.interrupted(signum):
            raise StopTraining(EXIT_INTERRUPTED, f"interrupted at step {status.step}: "
                                                 f"checkpoint written to {path}; continue "
                                                 "with --resume auto")
        raise StopTraining(EXIT_PREEMPTED, f"stopping on {name} at step {status.step}: "
                                           f"checkpoint {path}; resume with --resume auto")
