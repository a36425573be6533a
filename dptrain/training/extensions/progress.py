"""A progress bar of the current epoch on rank 0 (tqdm), when someone is watching."""

from __future__ import annotations

import sys
from typing import Any

from ..extension import Extension
from ..status import Status


class ProgressBar(Extension):
    name = "progress"

    def __init__(self, mode: str, steps_per_epoch: int, is_root: bool) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.enabled = is_root and (mode == "on" or (mode == "auto" and sys.stdout.isatty()))
        self.bar: Any = None

    def trigger(self, status: Status) -> bool:
        return self.enabled

    def __call__(self, trainer: Any, status: Status) -> None:
        if self.bar is None:
            from tqdm import tqdm  # noqa: PLC0415

            done = status.step - status.epoch * self.steps_per_epoch  # this epoch, with this
            self.bar = tqdm(total=self.steps_per_epoch, initial=done - 1,
                            desc=f"epoch {status.epoch + 1}", unit="step", leave=False,
                            dynamic_ncols=True)
        self.bar.update(1)
        if status.report_due:
            self.close(trainer)

    def close(self, trainer: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
