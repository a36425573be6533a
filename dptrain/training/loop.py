"""The training loop: run the step on each planned batch, then every extension whose
trigger fires on the agreed status.

``Trainer.run()`` is the whole life of a run: resume (rank 0 reads and checks the
checkpoint) and take the run directory, both before anything on disk changes; give every
rank rank 0's state; loop; finish (final checkpoint, model.h5); close.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import checkpoint as ckpt
from .. import signals
from ..config import Config
from ..errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED, StopTraining
from ..parallel import agree
from ..parallel.replicas import check_replicas
from ..rundir import RunDir
from .extension import Extension
from .meter import EpochMeter
from .plan import Batch, BatchPlan
from .resume import Resume, load_resume
from .status import Agreement, Status
from .step import StepReport, TrainStep


class Trainer:
    """One rank's view of a training run (built by ``build_trainer``)."""

    def __init__(self, *, cfg: Config, comm: Any, backend: Any, data: Any, model: Any,
                 loss: Any, placement: Any, optimizer: Any, step: TrainStep, plan: BatchPlan,
                 schedule: Any, extensions: list[Extension], watchdog: Any) -> None:
        self.cfg, self.comm, self.backend, self.data = cfg, comm, backend, data
        self.model, self.loss, self.placement, self.optimizer = model, loss, placement, optimizer
        self.step, self.plan, self.schedule = step, plan, schedule
        self.extensions, self.watchdog = extensions, watchdog
        self.rank, self.world = comm.rank, comm.size
        self.is_root = self.rank == 0
        self.state = ckpt.TrainerState()
        self.meter = EpochMeter()
        #: what extensions report for the current step (test metrics, a new best, ...)
        self.observation: dict[str, Any] = {}
        self.run_dir: RunDir | None = None
        self.resumed_from: Path | None = None
        self.finished = False  # every rank completed the run (close() may merge traces)
        self.stop_reason: str | None = None

    # -- output ----------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        """Rank 0 prints; with --verbose every rank prints, each line tagged with its rank."""
        if self.cfg.run.verbose and self.world > 1:
            if msg:  # every line of a multi-line message carries the tag
                print("\n".join(f"[rank {self.rank}] {ln}" for ln in msg.splitlines()),
                      flush=True)
        elif self.is_root:
            print(msg, flush=True)

    def log(self, event: str, **fields: Any) -> None:
        """One record in metrics.jsonl (rank 0; a no-op elsewhere)."""
        if self.run_dir is not None:
            self.run_dir.log(event, **fields)

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> int:
        """Resume or start, train to the end of the plan (or to a stop signal), finish, close;
        returns the process exit code (0, or 75 when preempted)."""
        if not signals.installed():
            signals.install()
        try:
            self.prepare()
            return self.train()
        finally:
            self.close()

    def prepare(self) -> None:
        """Everything before the first step, agreed by every rank."""
        resume: Resume | None = agree(self.comm, lambda: load_resume(self), root_only=True)
        # normalisation statistics: the checkpoint's, or computed now (rank 0 decides)
        self.data.settle(self.comm, resume.data if resume is not None else None)
        agree(self.comm, lambda: self._open_run_dir(resume), root_only=True)
        if resume is not None:
            self.say(resume.message)
        self._broadcast(resume)
        self.check_replicas("start")

    def train(self) -> int:
        """The loop; the run directory is open and every rank holds the same state."""
        for ext in self.extensions:
            ext.start(self)
        agreement = Agreement(self.comm)
        try:
            # NaN/Inf are reported once by the non-finite guard, not as a warning per rank
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                for batch in self.plan.batches(self.state):
                    if self.stop_reason is not None:  # an extension's start ended the run
                        break
                    report = self.step(batch, self.schedule(self.state.global_step))
                    status = self._advance(batch, report, agreement)
                    for ext in self.extensions:
                        if ext.trigger(status):
                            ext(self, status)
                    if status.report_due:
                        self.meter = EpochMeter()
                    if self.stop_reason is not None:
                        break
        except StopTraining as e:
            if e.code not in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
                raise
            self.say(str(e))
            return e.code
        for ext in self.extensions:
            ext.finish(self)
        self.finished = True
        return EXIT_OK

    def stop_after_step(self, reason: str) -> None:
        """End training after this step's extensions, as a completed run (final checkpoint,
        model.h5). Call it from an extension, on every rank, deciding on agreed values."""
        self.stop_reason = reason

    def _advance(self, batch: Batch, report: StepReport, agreement: Agreement) -> Status:
        """Count the step, and agree with the other ranks on what only they know."""
        st = self.state
        st.global_step += 1
        st.epoch_pos += len(batch.indices)
        st.samples_seen += len(batch.indices)
        self.meter.add(report)
        self.observation = {}
        if batch.last_in_epoch:
            st.epoch += 1
            st.epoch_pos = 0
        last = self.plan.done(st)
        if batch.last_in_epoch or last:
            self.meter.stop_clock()
            # unsynchronised BatchNorm keeps per-rank running statistics; like DDP's
            # broadcast_buffers, rank 0's become everyone's before eval and checkpoints
            self.comm.bcast(self.model.state)
        stop, elapsed = agreement(signals.received() is not None)
        return Status(st.global_step, batch.epoch, batch.last_in_epoch, last, stop, elapsed,
                      report.skipped, report.broken_by, report.grad_norm)

    def close(self) -> None:
        """Release everything, also after an error (safe to call more than once)."""
        for ext in self.extensions:
            ext.close(self)
        self.watchdog.close()
        self.data.close()
        if self.run_dir is not None:
            self.run_dir.close()
            self.run_dir = None

    # -- state -----------------------------------------------------------------------------
    def check_replicas(self, when: str, include_state: bool = True) -> None:
        """Every rank's parameter (and model state) checksum, compared; a mismatch stops
        the run naming the ranks. Mid-epoch checks leave the state out: unsynchronised
        BatchNorm keeps per-rank statistics until the end-of-epoch broadcast."""
        host = self.backend.to_host
        arrays = [host(self.model.params)]
        if include_state:
            arrays.append(host(self.model.state))
        check_replicas(self.comm, arrays, f"{when} (step {self.state.global_step})")

    def extension_state(self) -> dict[str, float]:
        """Every extension's numbers for the checkpoint, merged."""
        merged: dict[str, float] = {}
        for ext in self.extensions:
            merged.update(ext.state_dict())
        return merged

    def snapshot(self, kind: str = "checkpoint") -> ckpt.Checkpoint:
        """Host copies of everything a checkpoint (or, kind 'model', a saved model) holds."""
        host = self.backend.to_host
        params, state = host(self.model.params).copy(), host(self.model.state).copy()
        if kind == "model":
            return ckpt.capture("model", self.model, params, state,
                                config=self.cfg.resolved(), world_size=self.world,
                                seed=self.cfg.run.seed, data=self.data.saved_record())
        extras = self.extension_state()
        st = self.state
        st.best_metric = float(extras.pop("best_metric", st.best_metric))
        st.skipped_steps = int(extras.pop("skipped_steps", st.skipped_steps))
        st.extras = extras
        return ckpt.capture(
            "checkpoint", self.model, params, state, config=self.cfg.resolved(),
            world_size=self.world, optimizer=self.optimizer,
            opt_state={k: host(v).copy() for k, v in self.placement.opt_state.items()},
            trainer=st, seed=self.cfg.run.seed,
            epoch_order=self.plan.sampler.epoch_order(st.epoch), data=self.data.saved_record())

    def _open_run_dir(self, resume: Resume | None) -> None:
        """Rank 0 locks the run directory and records the resolved config."""
        run_dir = self.cfg.run.run_dir
        self.run_dir = RunDir(run_dir, self.cfg.run.keep_previous).open(
            fresh=not self.cfg.checkpoint.resume)
        if self.run_dir.archived is not None:
            gone = (f"; the oldest, {', '.join(str(p) for p in self.run_dir.removed)}, "
                    f"removed (keep_previous = {self.cfg.run.keep_previous})"
                    if self.run_dir.removed else "")
            self.say(f"note: {run_dir} held an earlier run; its files were moved to "
                     f"{self.run_dir.archived}{gone} (use --resume auto to continue a run)")
        if resume is not None and resume.state is not None:  # the earlier options are kept
            self.run_dir.keep_config(f"config.step-{resume.state.global_step:09d}.json",
                                     self.cfg.resolved(), ignore=("resume",
                                                                  "allow_config_change"))
        self.run_dir.write_config(self.cfg.resolved())
        self.data.write_record(self.run_dir.path)

    def _broadcast(self, resume: Resume | None) -> None:
        """Rank 0's parameters, model and optimizer state, counters and extension state
        become every rank's (a node's one shared copy needs only a fence)."""
        self.placement.broadcast()
        doc = b""
        if self.is_root and resume is not None and resume.state is not None:
            st = resume.state
            doc = json.dumps({"counters": [st.epoch, st.epoch_pos, st.global_step,
                                           st.samples_seen, st.best_metric, st.skipped_steps],
                              "extras": st.extras, "step_count": self.optimizer.step_count,
                              "path": str(resume.path)}).encode()
        if self.world > 1:
            doc = self.comm.bcast_bytes(doc)
        if not doc:
            return
        got = json.loads(doc)
        epoch, pos, step, seen, best, skipped = got["counters"]
        self.state = ckpt.TrainerState(int(epoch), int(pos), int(step), int(seen), float(best),
                                       int(skipped), dict(got["extras"]))
        self.optimizer.step_count = int(got["step_count"])
        self.resumed_from = Path(got["path"])
        loaded = {"best_metric": self.state.best_metric,
                  "skipped_steps": self.state.skipped_steps, **self.state.extras}
        for ext in self.extensions:
            ext.load_state_dict(loaded)
