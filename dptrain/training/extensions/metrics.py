"""The training figures: one record per epoch (and every ``log_every`` steps) in
metrics.jsonl, and the epoch's line on the console."""

from __future__ import annotations

from typing import Any

from ..extension import Extension, every_steps
from ..status import Status


class EpochLog(Extension):
    """At the end of every epoch (and of a run stopped part-way through one)."""

    name = "epoch_log"

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def trigger(self, status: Status) -> bool:
        return status.report_due

    def __call__(self, trainer: Any, status: Status) -> None:
        meter = trainer.meter
        r = meter.reduce(trainer.comm, trainer.backend.to_host)
        elapsed = meter.elapsed
        obs = trainer.observation
        lr = trainer.schedule(max(0, status.step - 1))  # the rate of the epoch's last step
        rec: dict[str, Any] = {
            "epoch": status.epoch + 1, "step": status.step,
            "train_loss": r.loss, "train_acc": r.accuracy}
        if trainer.step.top5:
            rec["train_top5"] = r.top5_accuracy
        rec.update({
            "samples_per_sec": r.samples / elapsed if elapsed > 0 else 0.0,
            "epoch_time": elapsed, "lr": lr,
            "skipped_steps": int(trainer.extension_state().get("skipped_steps", 0)),
            "timing_ms_per_step": r.timing_ms})
        spe = trainer.plan.steps_per_epoch
        in_epoch = status.step - status.epoch * spe
        partial = not status.epoch_end
        if partial:  # a run stopped part-way through an epoch (max_steps): say so
            rec.update(partial=True, epoch_steps=in_epoch)
        line = (f"epoch {status.epoch + 1}/{self.epochs}  train loss {r.loss:.4f} "
                f"acc {r.accuracy:.4f}")
        if "test_loss" in obs:
            rec.update(test_loss=obs["test_loss"], test_acc=obs["test_acc"])
            line += f"  test loss {obs['test_loss']:.4f} acc {obs['test_acc']:.4f}"
            if "test_top5" in obs:
                rec["test_top5"] = obs["test_top5"]
                line += f" top5 {obs['test_top5']:.4f}"
        line += f"  lr {lr:.3g}  {rec['samples_per_sec']:.0f} samples/s  {elapsed:.2f}s"
        if r.steps and trainer.world > 1:
            line += f"  (sync wait {r.timing_ms['sync_wait_ms']:.2f} ms/step)"
        if partial:
            line += f"  [partial epoch: {in_epoch} of {spe} steps]"
        # the train figures for what watches them (plateau), the record for the loggers
        obs.update(train_loss=r.loss, train_acc=r.accuracy, epoch_record=rec)
        trainer.say(line)
        trainer.log("epoch", **rec)


class StepLog(Extension):
    """Every ``every`` steps inside an epoch (the epoch's own record covers its end)."""

    name = "step_log"

    def __init__(self, every: int) -> None:
        self.every = every

    def trigger(self, status: Status) -> bool:
        return every_steps(self.every, status) and not status.report_due

    def __call__(self, trainer: Any, status: Status) -> None:
        r = trainer.meter.reduce(trainer.comm, trainer.backend.to_host)
        rec = {"step": status.step, "epoch": status.epoch + 1, "train_loss": r.loss,
               "train_acc": r.accuracy, "lr": trainer.schedule(max(0, status.step - 1))}
        trainer.observation["step_record"] = rec  # for the loggers
        trainer.log("step", **rec)
