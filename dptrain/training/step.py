"""One optimizer step on this rank: every micro-batch's forward, loss and backward, the
gradient sum, the non-finite guard, clipping and the update.

Every rank runs the same step on its contiguous shard of the global batch. The loss is
scaled by 1/global batch, so summing gradients over ranks (the placement's job) gives the
global-batch gradient with no further scaling, and every rank applies the same update to
the same bytes. The guard reads the summed gradient, so all ranks agree whether a step is
skipped. Nothing here branches on how replicas are placed or which device computes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data import shard
from ..errors import StopTraining
from ..hooks import Hooks
from ..nn import Context, NonFiniteError
from ..optim import clip_grad_norm
from .meter import PHASES
from .plan import Batch

#: where code outside the step can attach (test faults): each gets ``step``, ``rank`` and,
#: where there is one, ``array`` (the input batch, the loss gradient, the parameters)
STEP_POINTS = ("data", "forward", "backward", "allreduce", "optimizer")


@dataclass
class StepReport:
    """What one step did on this rank (``skipped`` and ``grad_norm`` agree on every rank)."""

    skipped: bool = False
    #: the step whose update made parameters or optimizer state non-finite (0: none); it
    #: was undone where the step keeps copies (on_nonfinite=skip)
    broken_by: int = 0
    samples: int = 0
    sums: Any = None          # [loss, correct, top-5 correct] of this rank, on the device
    grad_norm: float = 0.0
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))


class TrainStep:
    """Runs global batches: ``step(batch, lr) -> StepReport``.

    ``source`` gives this rank's samples (``get(rows, epoch)`` on the device, decoded and
    augmented for that epoch; ``prefetch(rows, epoch)`` the next ones early);
    ``placement`` sums gradients and knows this rank's slice; ``guard`` decides per step,
    on values every rank agrees on, whether to apply it.
    """

    def __init__(self, *, model: Any, loss: Any, optimizer: Any, placement: Any, source: Any,
                 rank: int, world: int, micro_batch: int, accum_steps: int, seed: int,
                 clip_norm: float = 0.0, undo_nonfinite: bool = False, debug: bool = False,
                 timeline: Any = None, watchdog: Any = None,
                 allreduce_sum: Any = None, top5: bool = False) -> None:
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.placement, self.source = placement, source
        self.rank, self.world = rank, world
        self.micro_batch, self.accum_steps, self.seed = micro_batch, accum_steps, seed
        self.clip_norm, self.debug = clip_norm, debug
        self.timeline, self.watchdog = timeline, watchdog
        self.allreduce_sum = allreduce_sum   # for layers that reduce over ranks (SyncBN)
        self.top5 = top5                     # also count top-5 hits (5 classes or more)
        self.hooks = Hooks(*STEP_POINTS)
        xp = model.xp
        self.xp = xp
        # [loss, correct, top-5 correct]: no synchronisation per step
        self._sums = xp.zeros(3, np.float64)
        # a skipped step leaves BatchNorm statistics, parameters and optimizer state as they
        # were: with undo_nonfinite, copies of them are kept for the length of a step
        self._undo = _Undo(model, optimizer, placement) if undo_nonfinite else None

    def __call__(self, batch: Batch, lr: float) -> StepReport:
        report = StepReport(sums=self._sums)
        self._sums.fill(0)
        if self._undo is not None:
            self._undo.save_state()
        self._micro_batches(batch, report)
        self._sum_gradients(batch.step, report)
        self._update(batch.step, lr, report)
        return report

    # -- the parts of a step ---------------------------------------------------------------
    def _micro_batches(self, batch: Batch, report: StepReport) -> None:
        k, mb, xp, tl = self.accum_steps, self.micro_batch, self.xp, self.timeline
        scale = 1.0 / len(batch.indices)
        times, hooks, sums = report.times, self.hooks, self._sums
        for j in range(k):
            micro = batch.indices[j * mb:(j + 1) * mb]
            last = j == k - 1
            t0 = time.perf_counter()
            local = shard(micro, self.rank, self.world)
            report.samples += len(local)
            x, y = self.source.get(local, batch.epoch)
            if hooks:
                hooks.fire("data", step=batch.step, rank=self.rank, array=x)
            t1 = time.perf_counter()
            ctx = Context(xp=xp, training=True, seed=self.seed, epoch=batch.epoch,
                          sample_index=local, global_batch=len(micro),
                          allreduce_sum=self.allreduce_sum, accumulate=j > 0,
                          device_index=self.source.device_rows,
                          layer_hook=tl.layer_event if tl is not None and tl.enabled else None)
            try:
                if hooks:
                    hooks.fire("forward", step=batch.step, rank=self.rank)
                if self.debug and not bool(xp.isfinite(x).all()):
                    raise NonFiniteError("the input batch holds NaN/Inf (before any layer)")
                out = self.model.forward(x, ctx, check_finite=self.debug)
                sums[0] += self.loss.forward(out, y, scale, xp)
                if self.top5:  # one pass over the outputs for top-1 and top-5
                    sums[1:] += self.loss.count_topk(out, y, xp, (1, 5))
                else:
                    sums[1] += self.loss.count_correct(out, y, xp)
                dout = self.loss.backward()
                if hooks:
                    hooks.fire("backward", step=batch.step, rank=self.rank, array=dout)
                t2 = time.perf_counter()
                sync = self.placement.sync
                if last:
                    sync.start()
                self.model.backward(dout, ctx, sync.on_ready if last else None,
                                    check_finite=self.debug)
                t3 = time.perf_counter()
                # the next micro-batch (or the next step's first) is prepared while this
                # one's backward and gradient sum run; the time it takes here is data time
                nxt = (batch.indices[(j + 1) * mb:(j + 2) * mb] if not last
                       else batch.upcoming[:mb] if batch.upcoming is not None else None)
                if nxt is not None:
                    self.source.prefetch(shard(nxt, self.rank, self.world), batch.epoch)
            except NonFiniteError as e:
                raise StopTraining(1, f"non-finite values at step {batch.step}: {e}") from None
            t4 = time.perf_counter()
            times["data"] += (t1 - t0) + (t4 - t3)
            times["forward"] += t2 - t1
            times["backward"] += t3 - t2
            if tl is not None:
                tl.add("data", t0, t1, micro=j)
                tl.add("forward", t1, t2, micro=j)
                tl.add("backward", t2, t3, micro=j)
                tl.add("prefetch", t3, t4, micro=j)

    def _sum_gradients(self, step: int, report: StepReport) -> None:
        t3 = time.perf_counter()
        if self.hooks:
            self.hooks.fire("allreduce", step=step, rank=self.rank)
        if self.watchdog is not None:
            with self.watchdog.watching(f"gradient allreduce of step {step}"):
                self.placement.sync.finish()
        else:
            self.placement.sync.finish()
        t4 = time.perf_counter()
        report.times["sync_wait"] += t4 - t3
        if self.timeline is not None:
            self.timeline.add("sync_wait", t3, t4, buckets=len(self.placement.sync.buckets))

    def _update(self, step: int, lr: float, report: StepReport) -> None:
        """Guard, clip, update (unless the summed gradient is non-finite).

        The common path reads one scalar (the gradient's squared norm). Parameters made
        non-finite by an update show in the next step's forward, and so in its gradient:
        only then, and where the norm overflowed (the one case in which optimizer state
        can overflow), are parameters and state checked directly.
        """
        t4 = time.perf_counter()
        placement = self.placement
        finite, report.grad_norm = self.gradient_finite()
        if finite:
            if self.clip_norm:  # the norm is known from the guard: no second read-back
                clip_grad_norm(placement.grads, self.clip_norm, self.xp, norm=report.grad_norm)
            if self._undo is not None:
                self._undo.save_update()
            self.optimizer.step(lr)
        placement.after_update()
        if not finite:
            report.skipped = True
            # did the update before this step break the parameters (lr far too high)?
            report.broken_by = 0 if self.parameters_finite() else step - 1
        elif math.isinf(report.grad_norm) and not self.parameters_finite():
            report.broken_by, report.skipped = step, True
        if report.skipped and self._undo is not None:
            if report.broken_by:  # the saved copies predate the update that broke them
                self._undo.restore_update()
                placement.after_update()
            self._undo.restore_state()
        if finite and self.hooks:
            self.hooks.fire("optimizer", step=step, rank=self.rank, array=self.model.params)
        t5 = time.perf_counter()
        report.times["optimizer"] += t5 - t4
        if self.timeline is not None:
            self.timeline.add("optimizer", t4, t5)

    def gradient_finite(self) -> tuple[bool, float]:
        """Whether the summed gradient is free of NaN/Inf (every rank agrees), and its
        global norm (inf when its sum of squares overflows)."""
        with np.errstate(over="ignore", invalid="ignore"):
            norm2 = self.placement.grad_norm2()
        if math.isfinite(norm2):
            return True, math.sqrt(norm2)
        # a huge but finite gradient can overflow the sum of squares: then look closer
        return self.placement.all_finite(), math.inf

    def parameters_finite(self) -> bool:
        """Parameters and optimizer state hold no NaN/Inf (each rank checks the slice it
        updates; every rank agrees). Checked before anything is written to a file."""
        xp, own = self.xp, self.placement.own
        arrays = [self.model.params[own], *self.optimizer.state.values()]
        ok = all(bool(xp.isfinite(a).all()) for a in arrays if a.size)
        return self.placement.agree_all(ok)


class _Undo:
    """Copies taken before a step (model state) and before its update (this rank's slice
    of the parameters and the optimizer state), put back when the step is skipped."""

    def __init__(self, model: Any, optimizer: Any, placement: Any) -> None:
        xp, own = model.xp, placement.own
        self.model, self.optimizer, self.own = model, optimizer, own
        self.state = xp.empty_like(model.state)
        self.params = xp.empty_like(model.params[own])
        self.opt = {k: xp.empty_like(v) for k, v in optimizer.state.items()}
        self.step_count = 0

    def save_state(self) -> None:
        self.state[...] = self.model.state

    def restore_state(self) -> None:
        self.model.state[...] = self.state

    def save_update(self) -> None:
        self.params[...] = self.model.params[self.own]
        for k, v in self.optimizer.state.items():
            self.opt[k][...] = v
        self.step_count = self.optimizer.step_count

    def restore_update(self) -> None:
        self.model.params[self.own] = self.params
        for k, v in self.optimizer.state.items():
            v[...] = self.opt[k]
        self.optimizer.step_count = self.step_count
