"""What a run says about itself: the model, the layout of the ranks, the device and the
BLAS threads at the start (and a ``start`` record), and an ``end`` record."""

from __future__ import annotations

from typing import Any

from ..extension import Extension


class RunLog(Extension):
    name = "run_log"

    def __init__(self, threads_line: str = "") -> None:
        self.threads_line = threads_line

    def start(self, trainer: Any) -> None:
        cfg, st, plan = trainer.cfg, trainer.state, trainer.plan
        step = trainer.step
        if trainer.is_root:
            trainer.say(trainer.model.summary())
        trainer.say(f"dptrain: {trainer.world} rank(s), global batch "
                    f"{step.micro_batch * step.accum_steps} ({step.micro_batch} x "
                    f"{step.accum_steps} micro-batches), {len(trainer.data.train)} training "
                    f"samples, {plan.steps_per_epoch} steps/epoch, device "
                    f"{trainer.backend.name}, {trainer.placement.description}")
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
                        f"{cfg.schedule.epochs}, step {st.global_step})")

    def finish(self, trainer: Any) -> None:
        trainer.log("end", step=trainer.state.global_step, epoch=trainer.state.epoch)
