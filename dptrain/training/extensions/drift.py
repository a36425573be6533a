"""Replica drift checks: ranks compare checksums of their parameters every N steps (or at
every epoch's end, parameters and model state), at the start and at the end."""

from __future__ import annotations

from typing import Any

from ..extension import Extension, every_steps
from ..status import Status


class DriftCheck(Extension):
    name = "drift_check"

    def __init__(self, every: int) -> None:
        self.every = every

    def trigger(self, status: Status) -> bool:
        if self.every:  # mid-epoch: parameters only (per-rank BatchNorm statistics differ)
            return every_steps(self.every, status) and not status.report_due
        return status.report_due

    def __call__(self, trainer: Any, status: Status) -> None:
        if self.every:
            trainer.check_replicas("drift check", include_state=False)
        else:
            trainer.check_replicas(f"end of epoch {status.epoch + 1}")

    def finish(self, trainer: Any) -> None:
        trainer.check_replicas("end of training")
