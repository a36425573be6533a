"""What a run says about itself: at the start the model, the ranks, the device, the
optimizer and its schedule, the BLAS threads (and a ``start`` record); at the end one
summary line (best and final test accuracy, time, throughput, where the files are) and an
``end`` record."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ..extension import Extension
from ..status import Status
from .progress import duration


def _schedule_text(cfg: Any) -> str:
    s, o = cfg.schedule, cfg.optim
    text = {"constant": "constant", "step": f"step (x{s.lr_gamma:g} every {s.lr_step_size})",
            "cosine": f"cosine to {s.min_lr:g}"}.get(s.lr_schedule, s.lr_schedule)
    warm = f" after {s.warmup_steps} warmup steps" if s.warmup_steps else ""
    extra = (f", momentum {o.momentum:g}{' nesterov' if o.nesterov else ''}"
             if o.optimizer == "sgd" and o.momentum else "")
    decay = f", weight decay {o.weight_decay:g}" if o.weight_decay else ""
    return f"{o.optimizer} lr {o.lr:g}{extra}{decay}, {text} schedule{warm}"


class RunLog(Extension):
    name = "run_log"

    def __init__(self, threads_line: str = "") -> None:
        self.threads_line = threads_line
        self.started = time.monotonic()
        self.first_step = 0
        self.last_test_acc = math.nan

    def start(self, trainer: Any) -> None:
        cfg, st, plan = trainer.cfg, trainer.state, trainer.plan
        step = trainer.step
        self.started, self.first_step = time.monotonic(), st.global_step
        if trainer.is_root:
            trainer.say(trainer.model.summary())
        device = trainer.backend.name
        if cfg.parallel.device == "auto" and not trainer.backend.is_gpu:
            device += " (device auto: not every rank has a usable GPU)"
        trainer.say(f"dptrain: {trainer.world} rank(s), global batch "
                    f"{step.micro_batch * step.accum_steps} ({step.micro_batch} x "
                    f"{step.accum_steps} micro-batches), {len(trainer.data.train)} training "
                    f"samples, {plan.steps_per_epoch} steps/epoch, device {device}, "
                    f"{trainer.placement.description}")
        trainer.say(f"optimizer: {_schedule_text(cfg)}; {plan.total_steps} steps in all")
        trainer.say(trainer.data.describe())
        if trainer.backend.is_gpu:
            trainer.say(f"GPU: rank 0 on {trainer.backend.describe()}; gradients "
                        f"{getattr(trainer.comm, 'transport', 'not communicated (one rank)')}")
        if self.threads_line:
            trainer.say(self.threads_line)
        trainer.log("start", world_size=trainer.world,
                    global_batch=step.micro_batch * step.accum_steps,
                    steps_per_epoch=plan.steps_per_epoch, params=trainer.model.num_params,
                    resumed_step=st.global_step, buckets=len(trainer.placement.sync.buckets))
        if plan.done(st):  # resumed a finished run
            trainer.say(f"nothing to train: the run is complete (epoch {st.epoch}/"
                        f"{cfg.schedule.epochs}, step {st.global_step}); give a larger "
                        "--epochs (or --max-steps) to train on")

    def trigger(self, status: Status) -> bool:
        return status.report_due

    def __call__(self, trainer: Any, status: Status) -> None:
        self.last_test_acc = trainer.observation.get("test_acc", self.last_test_acc)

    def finish(self, trainer: Any) -> None:
        st = trainer.state
        trainer.log("end", step=st.global_step, epoch=st.epoch)
        steps = st.global_step - self.first_step
        if steps == 0:
            return
        seconds = time.monotonic() - self.started
        ext = trainer.extension_state()
        best, best_epoch = ext.get("best_metric", math.nan), ext.get("best_epoch", 0)
        parts = []
        if not math.isnan(best):
            metric = trainer.cfg.schedule.early_stop_metric.replace("_acc", " accuracy") \
                .replace("_", " ")
            parts.append(f"best {metric} {best:.4f}" + (
                f" (epoch {int(best_epoch)})" if best_epoch else ""))
        if not math.isnan(self.last_test_acc):
            parts.append(f"final {self.last_test_acc:.4f}")
        rate = steps * trainer.plan.sampler.batch_size / max(seconds, 1e-9)
        run_dir = Path(trainer.cfg.run.run_dir)
        parts += [f"{steps} steps in {duration(seconds)}", f"{rate:,.0f} samples/s",
                  f"model {run_dir / 'model.h5'}, checkpoints {run_dir / 'checkpoints'}"]
        trainer.say("done: " + "; ".join(parts))
