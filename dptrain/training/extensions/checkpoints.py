"""Checkpoints on a schedule (every epoch, every N steps, every T seconds of agreed time),
best.h5 when an epoch is the new best (by ``early_stop_metric``: see early_stopping.py),
the final checkpoint and model.h5 (with ``restore_best``, the best epoch's weights).

Rank 0 writes (atomically: a temporary name, fsync, rename); every rank learns whether it
worked, so all stop together on a failed write, or all go on with
``continue_on_checkpoint_error``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ... import checkpoint as ckpt
from ...errors import StopTraining, UserError, agreed
from ...hooks import Hooks
from ...parallel import agree
from ..extension import Extension
from ..status import Status
from .nonfinite import broken_message


class Checkpointing(Extension):
    name = "checkpoints"

    def __init__(self, run_dir: str, kind: str, amount: float, keep_last: int,
                 continue_on_error: bool = False, restore_best: bool = False) -> None:
        self.run_dir, self.kind, self.amount = run_dir, kind, amount
        self.restore_best = restore_best
        self.keep_last, self.continue_on_error = keep_last, continue_on_error
        #: where tests attach: the writer's points (``checkpoint.WRITE_POINTS``) and
        #: ``saved`` (a checkpoint is written and every rank knows it)
        self.hooks = Hooks(*ckpt.WRITE_POINTS, "saved")
        self.on_disk: Path | None = None   # the newest step checkpoint this run has
        self._on_disk_extras = ""          # ... and the extension state it holds
        self.last_save = 0.0               # agreed seconds into training of the last one
        self.started_at = 0                # the step this run started from

    def start(self, trainer: Any) -> None:
        self.on_disk = trainer.resumed_from
        self.started_at = trainer.state.global_step
        self._on_disk_extras = json.dumps(trainer.extension_state(), sort_keys=True)

    def _due(self, status: Status) -> bool:
        if self.kind == "epoch":
            return status.epoch_end
        if self.kind == "steps":  # also at an epoch's last step
            return status.step % int(self.amount) == 0
        if self.kind == "seconds" and not status.epoch_end:
            return status.elapsed - self.last_save >= self.amount
        return False

    def trigger(self, status: Status) -> bool:
        return status.epoch_end or self._due(status)

    def __call__(self, trainer: Any, status: Status) -> None:
        if self._due(status):
            self.save(trainer, elapsed=status.elapsed)
        if status.epoch_end and trainer.observation.get("new_best"):
            self.save(trainer, best=True, elapsed=status.elapsed)

    def finish(self, trainer: Any) -> None:
        self.save(trainer, final=True)
        trained = trainer.state.global_step > self.started_at
        if trained or not (Path(self.run_dir) / "model.h5").is_file():
            self.save_model(trainer)  # a complete run resumed again changes no file

    # -- writing ---------------------------------------------------------------------------
    def save(self, trainer: Any, final: bool = False, best: bool = False,
             elapsed: float | None = None) -> Path | None:
        """Rank 0 writes a checkpoint of now; every rank learns whether it worked."""
        t0 = time.perf_counter()
        step = trainer.state.global_step
        if not trainer.step.parameters_finite():  # never a file with NaN/Inf in it
            raise StopTraining(1, broken_message(step) + "; no checkpoint was written")
        d = ckpt.checkpoint_dir(self.run_dir)
        path = d / ckpt.BEST_NAME if best else ckpt.checkpoint_path(self.run_dir, step)

        extras = json.dumps(trainer.extension_state(), sort_keys=True)

        def write() -> None:
            if path == self.on_disk and extras == self._on_disk_extras and not best:
                return  # this very checkpoint is on disk already
            d.mkdir(parents=True, exist_ok=True)
            ckpt.write_file(path, trainer.snapshot(), self.hooks)
            if not best:
                self.on_disk, self._on_disk_extras = path, extras
                ckpt.prune(self.run_dir, self.keep_last)

        watchdog = trainer.watchdog
        try:
            agree(trainer.comm, _as_user_error(write), root_only=True,
                  waiting=lambda: watchdog.watching(
                      f"checkpoint write of step {step} (rank 0 writing)"))
        except UserError as e:
            msg = f"checkpoint write failed: {e}"
            if self.continue_on_error and not final:
                trainer.say(f"warning: {msg}; training goes on (continue_on_checkpoint_error)")
                return None
            raise agreed(UserError(msg + " (previous checkpoints are intact)")) from None
        finally:
            if elapsed is not None:
                self.last_save = elapsed
        t1 = time.perf_counter()
        if trainer.step.timeline is not None:
            trainer.step.timeline.add("checkpoint", t0, t1, path=str(path))
        trainer.log("checkpoint", step=step, epoch=trainer.state.epoch, path=str(path),
                    seconds=round(t1 - t0, 4), best=best)
        if self.hooks:
            self.hooks.fire("saved", path=path, step=step)
        return path

    def save_model(self, trainer: Any) -> Path | None:
        """The final model (architecture and weights) as run_dir/model.h5 (rank 0); with
        ``restore_best``, the weights and model state of best.h5 instead."""
        if not trainer.is_root:
            return None
        path = Path(self.run_dir) / "model.h5"
        snap = trainer.snapshot("model")
        note = self._restore_best(trainer, snap) if self.restore_best else ""
        ckpt.write_file(path, snap)
        trainer.say(f"saved model to {path}{note}")
        return path

    def _restore_best(self, trainer: Any, snap: ckpt.Checkpoint) -> str:
        """Put best.h5's parameters and model state into ``snap``, if best.h5 holds the
        best epoch this run knows of; what model.h5 holds, for the saved-model line."""
        state = trainer.extension_state()
        epoch = int(state.get("best_epoch", 0))
        best = ckpt.checkpoint_dir(self.run_dir) / ckpt.BEST_NAME
        if not epoch:
            trainer.say("warning: restore_best: no epoch was the best yet (no test figures); "
                        "model.h5 holds the last weights")
            return ""
        try:
            ck = ckpt.read_file(best)
        except UserError as e:
            trainer.say(f"warning: restore_best: {e}; model.h5 holds the last weights")
            return ""
        if ck.trainer.epoch != epoch:  # its write failed (continue_on_checkpoint_error)
            trainer.say(f"warning: restore_best: {best} holds epoch {ck.trainer.epoch}, not "
                        f"the best epoch {epoch}; model.h5 holds the last weights")
            return ""
        ckpt.check_compatible(ck, trainer.model, best)
        snap.params, snap.state = ck.params, ck.state
        metric = trainer.cfg.schedule.early_stop_metric
        value = float(state.get("best_metric", float("nan")))
        return f" (the weights of epoch {epoch}, the best by {metric}, {value:.4f}: restore_best)"


def _as_user_error(fn: Any) -> Any:
    """``fn`` with OS failures as UserError (the writer already turns its own into one)."""
    def run() -> None:
        try:
            fn()
        except OSError as e:
            raise UserError(str(e) or "checkpoint write failed") from None
    return run
