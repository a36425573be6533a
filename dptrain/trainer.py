"""The training loop: global batches, steps, evaluation, metrics, checkpoints, signals.

Every rank runs the same loop on its contiguous shard of each global batch. The loss is
scaled by 1/global batch, so summing gradients over ranks gives the global-batch gradient
with no further scaling, and every rank applies the same update to the same bytes.
"""

from __future__ import annotations

import math
import signal
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint as ckpt
from . import faults
from .backend import Backend, select_backend
from .config import Config, parse_checkpoint_every
from .data import DataSplits, GlobalSampler, load_dataset, shard, validate_for_model
from .dist.comm import Communicator, LocalComm
from .dist.device import device_comm
from .dist.shared import SharedGrads, shm_shortfall, slice_bounds
from .dist.sync import GradSync
from .errors import EXIT_OK, EXIT_PREEMPTED, UserError, agreed
from .nn import Context, NonFiniteError, Sequential, get_loss, layer_from_spec, preset_layers
from .optim import clip_grad_norm, make_optimizer, make_schedule
from .rundir import RunDir
from .timeline import Timeline, merge_traces, rank_path
from .upload import BatchUploader
from .watchdog import Watchdog

PHASES = ("data", "forward", "backward", "sync_wait", "optimizer")


class StopTraining(Exception):  # noqa: N818  (not always an error: preemption)
    """Raised inside the loop to end training early with an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class EpochStats:
    """Sums over one epoch on this rank (reduced across ranks when reported)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    samples: float = 0.0
    steps: int = 0
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    #: [loss, correct] summed on the device since the last report (read back only then)
    pending: Any = None


def build_model(cfg: Config, input_shape: tuple[int, ...], num_outputs: int,
                backend: Backend) -> Sequential:
    """The configured model (preset or layer list) on ``backend``, not yet initialised."""
    specs = cfg.layers if cfg.layers else preset_layers(cfg.model, num_outputs)
    layers = [layer_from_spec(dict(s)) for s in specs]
    return Sequential(layers, input_shape, cfg.dtype, backend.xp)


def replica_checksum(params: np.ndarray, state: np.ndarray) -> int:
    """CRC32 of parameter and state bytes: equal on every rank when replicas agree."""
    crc = zlib.crc32(np.ascontiguousarray(params).view(np.uint8))
    return zlib.crc32(np.ascontiguousarray(state).view(np.uint8), crc)


class Trainer:
    """One rank's view of a training run."""

    def __init__(self, cfg: Config, comm: Communicator | None = None) -> None:
        self.cfg = cfg
        self.comm = comm or LocalComm()
        self.rank, self.world = self.comm.rank, self.comm.size
        self.is_root = self.rank == 0
        self.stop_signal: int | None = None
        self.run_dir: RunDir | None = None
        self.timeline = Timeline(bool(cfg.timeline), self.rank)
        self.state = ckpt.TrainerState()
        self._last_ckpt_time = time.monotonic()
        self._since_ckpt = 0.0    # seconds since the last checkpoint, agreed by all ranks
        self._best_pending = False  # an epoch beat the best metric: write best.h5
        self._consecutive_skips = 0

    # -- output ----------------------------------------------------------------------
    def say(self, msg: str, all_ranks: bool = False) -> None:
        """Rank 0 prints; with --verbose every rank prints, tagged with its rank."""
        if self.cfg.verbose and self.world > 1:
            if msg:  # every line of a multi-line message carries the tag
                print("\n".join(f"[rank {self.rank}] {ln}" for ln in msg.splitlines()),
                      flush=True)
        elif self.is_root or (all_ranks and self.cfg.verbose):
            print(msg, flush=True)

    def log(self, event: str, **fields: Any) -> None:
        if self.run_dir is not None:
            self.run_dir.log(event, **fields)

    # -- set-up ----------------------------------------------------------------------
    def setup(self) -> None:
        """Data, model, optimizer, sync, sampler and run directory; all ranks agree."""
        cfg = self.cfg
        fault = faults.load()
        if fault is not None:
            self.say(f"note: {faults.ENV} is set; a test fault is armed: {fault}")
        if faults.pauses() is not None:
            self.say(f"note: {faults.PAUSE_ENV} is set; pausing for a test at {faults.pauses()}")
        self.backend = select_backend(cfg.device, self.comm.local_rank, self.comm.local_size,
                                      cfg.allow_gpu_sharing, comm=self.comm)
        # device arrays reach MPI directly, staged through pinned memory, or through NCCL
        self.comm = device_comm(self.comm, self.backend, cfg.gpu_aware_mpi, cfg.comm == "nccl")
        self.xp = self.backend.xp
        self.data: DataSplits = load_dataset(
            cfg.dataset, dtype=cfg.dtype, seed=cfg.seed,
            synthetic_shape=tuple(cfg.synthetic_shape),
            synthetic_classes=cfg.synthetic_classes, synthetic_samples=cfg.synthetic_samples)
        train = self.data.train
        num_out = self._num_outputs()
        self.model = build_model(cfg, train.sample_shape, num_out, self.backend)
        labels_first = len(self.model.output_shape) == 1 and train.has_labels
        if labels_first:  # out-of-range labels are named before the output-shape mismatch
            validate_for_model(self.data, self.model.input_shape, self.model.output_shape[0],
                               cfg.loss)
        if self.model.output_shape != (num_out,):
            raise UserError(f"the model's output shape {self.model.output_shape} does not "
                            f"match the dataset's {num_out} classes/targets")
        if not labels_first:
            validate_for_model(self.data, self.model.input_shape, num_out, cfg.loss)
        self.model.initialize(cfg.seed)
        self.loss = get_loss(cfg.loss)

        self.micro_batch = cfg.global_batch(self.world)
        self.step_batch = self.micro_batch * cfg.accum_steps
        if self.micro_batch < self.world and cfg.batch_per_rank == 0:
            self.say(f"note: global batch {self.micro_batch} < {self.world} ranks; "
                     "some ranks get no samples in a step (they still join every collective)")
        self._check_local_batchnorm()
        self.batches = BatchUploader(self.backend, train.x, train.y,
                                     -(-self.micro_batch // self.world))
        self._upcoming: np.ndarray | None = None  # the next step's global batch (prefetch)
        self.sampler = GlobalSampler(len(train), self.step_batch, cfg.seed)
        self.steps_per_epoch = self.sampler.num_batches
        total = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        self.total_steps = total
        self.schedule = make_schedule(cfg.lr_schedule, cfg.lr, total, cfg.warmup_steps,
                                      cfg.lr_step_size, cfg.lr_gamma, cfg.min_lr)
        # one node, CPU: gradients, parameters and optimizer state live in memory the ranks
        # share, and each rank updates its own slice (before the optimizer and the sync
        # take hold of the buffers)
        shared = SharedGrads.create(self.comm, self.model.grads, own_slice_only=True) \
            if cfg.shared_memory_sync and self._shared_memory_fits() else None
        self.node = None if shared is None else shared.memory
        own = slice(None) if shared is None else slice(*shared.own)
        if shared is not None:
            self.model.use_grad_buffer(shared.mine)
            params = shared.memory.single(self.model.num_params, self.model.dtype, "parameters")
            params[own] = self.model.params[own]  # each rank writes (and so places) its slice
            self.model.use_param_buffer(params)
        mask = self.model.decay_mask(not cfg.decay_bias_norm)
        self.optimizer = make_optimizer(
            cfg.optimizer, self.model.params[own], self.model.grads[own], self.xp,
            momentum=cfg.momentum, nesterov=cfg.nesterov, beta1=cfg.beta1, beta2=cfg.beta2,
            eps=cfg.eps, weight_decay=cfg.weight_decay,
            decay_mask=None if mask is None else mask[own])
        self.optimizer.name = cfg.optimizer
        #: the whole optimizer state (the optimizer itself may hold only this rank's slice)
        self.opt_state = self.optimizer.state
        if self.node is not None:
            self.opt_state = {name: self.node.single(self.model.num_params, self.model.dtype,
                                                     f"optimizer state {name}")
                              for name in self.optimizer.state}
            # the (zero) state moves into this rank's slice; then every slice of parameters
            # and state is written before any rank reads one
            self.optimizer.use_state_buffers({k: v[own] for k, v in self.opt_state.items()})
            self.node.fence()
        self.sync = GradSync(self.comm, self.model.grads, int(cfg.bucket_mb * (1 << 20)),
                             cfg.overlap, shared)
        if self.timeline.enabled:  # per-layer and per-bucket spans
            self.model.layer_hook = self.timeline.layer_event
            self.sync.timeline = self.timeline
        self.ckpt_kind, self.ckpt_amount = parse_checkpoint_every(cfg.checkpoint_every)
        self.watchdog = Watchdog(cfg.collective_timeout, lambda what: self.comm.abort(1),
                                 self.rank)
        self._ctx_reduce = self.comm.allreduce_sum if self.world > 1 else None
        # [loss, correct] of a step, summed on the device: no synchronisation per step
        self._step_sums = self.xp.zeros(2, np.float64)
        # with on_nonfinite=skip, a skipped step restores BatchNorm's running statistics
        self._state_backup = (self.xp.empty_like(self.model.state)
                              if cfg.on_nonfinite == "skip" and self.model.state.size else None)

    def _shared_memory_fits(self) -> bool:
        """Room in /dev/shm for the node's shared buffers (gradients of every rank, one
        copy of the parameters, up to two optimizer states)? If not, say so and let MPI
        sum the gradients: the same bytes, only slower."""
        if not SharedGrads.applies(self.comm, self.model.grads):
            return True
        short = shm_shortfall(self.comm, self.model.grads.nbytes * (self.world + 3))
        if short:
            self.say(f"note: {short}: gradients are summed with MPI allreduces instead "
                     "(enlarge /dev/shm, e.g. docker run --shm-size, or pass "
                     "--no-shared-memory-sync to silence this)")
        return not short

    def _check_local_batchnorm(self) -> None:
        """BatchNorm with sync=false normalises each rank's own samples: every rank that
        holds samples needs at least two values per channel, or its statistics are void."""
        share = max(1, self.micro_batch // self.world)  # smallest non-empty share of a batch
        for layer in self.model.layers:
            if getattr(layer, "kind", "") != "batchnorm" or layer.sync:
                continue
            per_channel = share * math.prod(layer.in_shape[:-1])
            if per_channel < 2:
                raise UserError(
                    f"layer {layer.name}: BatchNorm(sync=false) normalises each rank's own "
                    f"samples, but a global batch of {self.micro_batch} over {self.world} "
                    f"rank(s) leaves a rank {share} sample per step; use a global batch of at "
                    f"least {2 * self.world} (batch_per_rank >= 2), or sync=true")

    def _num_outputs(self) -> int:
        y = self.data.train.y
        if y.ndim == 2:
            return int(y.shape[1])
        if self.data.num_classes:
            return int(self.data.num_classes)
        return int(y.max()) + 1 if len(y) else 0

    def open_run_dir(self) -> None:
        """Rank 0 locks the run directory and records the resolved config."""
        if self.is_root:
            self.run_dir = RunDir(self.cfg.run_dir).open(fresh=not self.cfg.resume)
            if self.run_dir.archived is not None:
                self.say(f"note: {self.cfg.run_dir} held an earlier run; its files were moved "
                         f"to {self.run_dir.archived} (use --resume auto to continue a run)")
            self.run_dir.write_config(self.cfg.resolved())

    def resume_or_broadcast(self) -> None:
        """Load a checkpoint on rank 0 if asked, then broadcast everything from rank 0."""
        cfg = self.cfg
        msg = b""
        if self.is_root and cfg.resume:
            try:
                msg = self._load_resume().encode()
            except UserError as e:
                msg = b"E" + str(e).encode()
        if self.world > 1:
            msg = self.comm.bcast_bytes(msg)
        if msg.startswith(b"E"):
            raise agreed(UserError(msg[1:].decode()))
        if msg:
            self.say(msg.decode())
        # everything from rank 0: parameters, model state, optimizer state, trainer state
        # (a node's one shared copy of parameters and optimizer state needs only a fence)
        if self.node is None:
            self.comm.bcast(self.model.params)
            for buf in self.opt_state.values():
                self.comm.bcast(buf)
        else:
            self.node.fence()
        self.comm.bcast(self.model.state)
        st = self.state
        nums = np.array([st.epoch, st.epoch_pos, st.global_step, st.samples_seen,
                         st.best_metric, st.skipped_steps, self.optimizer.step_count],
                        np.float64)
        if self.world > 1:
            self.comm.bcast(nums)
        (st.epoch, st.epoch_pos, st.global_step, st.samples_seen) = (int(v) for v in nums[:4])
        st.best_metric, st.skipped_steps = float(nums[4]), int(nums[5])
        self.optimizer.step_count = int(nums[6])
        self.check_replicas("start")

    def _load_resume(self) -> str:
        cfg = self.cfg
        if cfg.resume == "auto":
            found = ckpt.find_resumable(cfg.run_dir, warn=self.say)
            if found is None:
                return "no checkpoint to resume from in " + str(ckpt.checkpoint_dir(cfg.run_dir))
            path, ck = found
        else:
            path = Path(cfg.resume)
            ck = ckpt.read_file(path)
            if ck.kind != "checkpoint":
                raise UserError(f"{path} is a saved model, not a checkpoint; it cannot resume "
                                "training (use it with `dptrain eval`)")
        ckpt.check_compatible(ck, self.model, path)
        if ck.optimizer_name != cfg.optimizer:
            raise UserError(f"checkpoint {path} was written with optimizer {ck.optimizer_name}, "
                            f"the config asks for {cfg.optimizer}")
        xp = self.xp
        self.model.params[...] = xp.asarray(ckpt.flatten(self.model, ck.params))
        self.model.state[...] = xp.asarray(ckpt.flatten(self.model, ck.state, "state"))
        for name, buf in self.opt_state.items():
            if name not in ck.optimizer_state:
                raise UserError(f"checkpoint {path} lacks optimizer state {name!r}")
            buf[...] = xp.asarray(ckpt.flatten(self.model, ck.optimizer_state[name]))
        self.optimizer.step_count = ck.optimizer_step
        self.state = ck.trainer
        self._ckpt_on_disk = path
        self._check_epoch_order(ck, path)
        return (f"resumed from {path} (epoch {ck.trainer.epoch + 1}, step "
                f"{ck.trainer.global_step}, saved by {ck.meta.get('world_size')} rank(s))")

    def _check_epoch_order(self, ck: ckpt.Checkpoint, path: Path) -> None:
        """The sampler must draw the checkpoint's sample order for the epoch it stopped in."""
        saved = ck.epoch_order
        if saved is None:
            return
        if len(saved) != self.sampler.n_samples:
            raise UserError(f"checkpoint {path} was taken over a training set of {len(saved)} "
                            f"samples, this one has {self.sampler.n_samples}")
        if not np.array_equal(saved, self.sampler.epoch_order(ck.trainer.epoch)):
            self.say(f"warning: this numpy ({np.__version__}) draws another sample order for "
                     f"epoch {ck.trainer.epoch + 1} than the one that wrote {path} "
                     f"(numpy {ck.rng.get('numpy_version', '?')}); the rest of this epoch "
                     "will not repeat the interrupted run exactly")

    def check_replicas(self, when: str, include_state: bool = True) -> None:
        """Every rank's parameter checksum, compared; a mismatch names the ranks.

        Mid-epoch checks leave out the model state: unsynchronised BatchNorm keeps
        per-rank running statistics until the end-of-epoch broadcast.
        """
        if self.world == 1:
            return
        sums = np.zeros(self.world, np.float64)
        state = self.model.state if include_state else self.model.state[:0]
        sums[self.rank] = replica_checksum(self.backend.to_host(self.model.params),
                                           self.backend.to_host(state))
        sums = self.comm.allreduce_scalars(sums)
        if np.all(sums == sums[0]):
            return
        groups: dict[float, list[int]] = {}
        for r, s in enumerate(sums):
            groups.setdefault(float(s), []).append(r)
        desc = "; ".join(f"ranks {v}" for v in groups.values())
        raise StopTraining(1, f"replica drift at {when} (step {self.state.global_step}): "
                              f"parameters differ between {desc}")

    # -- signals -----------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            if self.stop_signal is None:
                self.stop_signal = signum
                faults.pause_point("signal", self.state.global_step, rank=self.rank,
                                   signal=signal.Signals(signum).name)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    # -- the loop --------------------------------------------------------------------
    def train(self) -> int:
        """Run to the end (or to a signal); returns the process exit code."""
        cfg, st = self.cfg, self.state
        self.say(self.model.summary() if self.is_root else "")
        self.say(f"dptrain: {self.world} rank(s), global batch {self.step_batch} "
                 f"({self.micro_batch} x {cfg.accum_steps} micro-batches), "
                 f"{len(self.data.train)} training samples, {self.steps_per_epoch} steps/epoch, "
                 f"device {self.backend.name}, {self.sync.buckets.__len__()} gradient bucket(s)"
                 f", overlap {'on' if cfg.overlap else 'off'}"
                 + (", gradients summed in shared memory" if self.sync.shared else ""))
        if self.backend.is_gpu:
            self.say(f"GPU: rank 0 on {self.backend.describe()}; gradients "
                     f"{getattr(self.comm, 'transport', 'not communicated (one rank)')}")
        self.log("start", world_size=self.world, global_batch=self.step_batch,
                 steps_per_epoch=self.steps_per_epoch, params=self.model.num_params,
                 resumed_step=st.global_step, buckets=len(self.sync.buckets))
        if st.epoch >= cfg.epochs or self._reached_max_steps():  # resumed a finished run
            self.say(f"nothing to train: the run is complete (epoch {st.epoch}/{cfg.epochs}, "
                     f"step {st.global_step})")
        faults.pause_point("start", st.global_step, rank=self.rank)
        code = EXIT_OK
        try:
            # NaN/Inf are reported once by the non-finite guard, not as a warning per rank
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                while st.epoch < cfg.epochs and not self._reached_max_steps():
                    self._run_epoch()
                    if self._agree_stop():
                        self._preempt()
        except StopTraining as e:
            if e.code == EXIT_PREEMPTED:
                self.say(str(e))
                code = e.code
            else:
                raise
        if code == EXIT_OK:
            self.check_replicas("end of training")
            self.save_checkpoint(final=True)
            self.save_model()
            self.log("end", step=st.global_step, epoch=st.epoch)
        self._finished = True  # every rank got here: close() may merge the timeline
        return code

    def _reached_max_steps(self) -> bool:
        return bool(self.cfg.max_steps) and self.state.global_step >= self.cfg.max_steps

    def _agree_stop(self) -> bool:
        """All ranks agree whether any caught a signal; the same tiny allreduce also
        agrees on the time since the last checkpoint (for time-based schedules)."""
        flag = 0.0 if self.stop_signal is None else 1.0
        since = time.monotonic() - self._last_ckpt_time
        flag, self._since_ckpt = self.comm.allreduce_scalars([flag, since], "max")
        return bool(flag > 0)

    def _run_epoch(self) -> None:
        cfg, st = self.cfg, self.state
        epoch = st.epoch
        stats = EpochStats()
        t_epoch = time.perf_counter()
        first = -(-st.epoch_pos // self.step_batch)  # batches of this epoch already done
        bar = self._progress(epoch, first)
        for i in range(first, self.steps_per_epoch):
            idx = self.sampler.batch(epoch, i)
            if self.batches.asynchronous:  # the input upload overlaps the step before it
                self._upcoming = (self.sampler.batch(epoch, i + 1)
                                  if i + 1 < self.steps_per_epoch else None)
            self._step(idx, epoch, stats)
            st.epoch_pos += len(idx)
            st.samples_seen += len(idx)
            if bar is not None:
                bar.update(1)
            if self._reached_max_steps() or i == self.steps_per_epoch - 1:
                break  # the epoch's end handles signals after its bookkeeping
            if self._agree_stop():
                if bar is not None:
                    bar.close()
                self._preempt()
            if cfg.log_every and st.global_step % cfg.log_every == 0:
                self._log_steps(stats)
            if (cfg.drift_check_every and st.global_step % cfg.drift_check_every == 0):
                self.check_replicas("drift check", include_state=False)
            self._maybe_checkpoint(end_of_epoch=False)
        if bar is not None:
            bar.close()
        epoch_done = st.epoch_pos >= len(self.data.train)
        if epoch_done:
            st.epoch += 1
            st.epoch_pos = 0
        elapsed = time.perf_counter() - t_epoch
        # Unsynchronised BatchNorm keeps per-rank running statistics; like DDP's
        # broadcast_buffers, rank 0's state becomes everyone's before eval and checkpoints.
        self.comm.bcast(self.model.state)
        self._report_epoch(epoch, stats, elapsed)
        if not cfg.drift_check_every:
            self.check_replicas(f"end of epoch {epoch + 1}")
        if epoch_done:
            self._maybe_checkpoint(end_of_epoch=True)

    def _progress(self, epoch: int, first: int) -> Any:
        mode = self.cfg.progress
        tty = sys.stdout.isatty()
        if not self.is_root or mode == "off" or (mode == "auto" and not tty):
            return None
        from tqdm import tqdm  # noqa: PLC0415

        return tqdm(total=self.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}",
                    unit="step", leave=False, dynamic_ncols=True)

    def _step(self, idx: np.ndarray, epoch: int, stats: EpochStats) -> None:
        """One optimizer step on global batch ``idx`` (all micro-batches)."""
        cfg, xp, tl = self.cfg, self.xp, self.timeline
        times = stats.times
        k = cfg.accum_steps
        scale = 1.0 / len(idx)
        sums = self._step_sums
        sums.fill(0)
        local_total = 0
        step = self.state.global_step
        if self._state_backup is not None:  # a skipped step must not leave NaN in BN stats
            self._state_backup[...] = self.model.state
        for j in range(k):
            micro = idx[j * self.micro_batch:(j + 1) * self.micro_batch]
            last = j == k - 1
            t0 = time.perf_counter()
            local = shard(micro, self.rank, self.world)
            local_total += len(local)
            x, y = self.batches.get(local)
            faults.inject("data", self.rank, step + 1, x)
            t1 = time.perf_counter()
            ctx = Context(xp=xp, training=True, seed=cfg.seed, epoch=epoch, sample_index=local,
                          global_batch=len(micro), allreduce_sum=self._ctx_reduce,
                          accumulate=j > 0, device_index=self.batches.device_rows)
            try:
                faults.inject("forward", self.rank, step + 1)
                if cfg.debug and not bool(xp.isfinite(x).all()):
                    raise NonFiniteError("the input batch holds NaN/Inf (before any layer)")
                out = self.model.forward(x, ctx, check_finite=cfg.debug)
                loss = self.loss.forward(out, y, scale, xp)
                sums[0] += loss
                sums[1] += self.loss.count_correct(out, y, xp)
                dout = self.loss.backward()
                faults.inject("backward", self.rank, step + 1, dout)
                t2 = time.perf_counter()
                if last:
                    self.sync.start()
                self.model.backward(dout, ctx, self.sync.on_ready if last else None,
                                    check_finite=cfg.debug)
                if self.batches.asynchronous:
                    self.batches.prefetch(self._next_rows(idx, j))
            except NonFiniteError as e:
                raise StopTraining(1, f"non-finite values at step {step + 1}: {e}") from None
            t3 = time.perf_counter()
            times["data"] += t1 - t0
            times["forward"] += t2 - t1
            times["backward"] += t3 - t2
            tl.add("data", t0, t1, micro=j)
            tl.add("forward", t1, t2, micro=j)
            tl.add("backward", t2, t3, micro=j)
        t3 = time.perf_counter()
        faults.inject("allreduce", self.rank, step + 1)
        self.watchdog.arm(f"gradient allreduce of step {step + 1}")
        self.sync.finish()
        self.watchdog.disarm()
        t4 = time.perf_counter()
        tl.add("sync_wait", t3, t4, buckets=len(self.sync.buckets))
        times["sync_wait"] += t4 - t3
        skipped = self._guard_nonfinite(step)
        if skipped and self._state_backup is not None:
            self.model.state[...] = self._state_backup
        if not skipped:
            if cfg.clip_norm:  # the norm is known from the guard: no second read-back
                clip_grad_norm(self.optimizer.grads, cfg.clip_norm, xp,
                               norm=math.sqrt(self._grad_norm2))
            self.optimizer.step(self.schedule(self.state.global_step))
        if self.node is not None:
            self.node.fence()  # every slice is updated before any rank reads the parameters
        if not skipped:
            faults.inject("optimizer", self.rank, step + 1, self.model.params)
        t5 = time.perf_counter()
        times["optimizer"] += t5 - t4
        tl.add("optimizer", t4, t5)
        self.state.global_step += 1
        if skipped:  # a NaN loss would poison the epoch's mean; the skip is counted instead
            return
        if stats.pending is None:
            stats.pending = sums.copy()
        else:
            stats.pending += sums
        stats.samples += local_total
        stats.steps += 1

    def _guard_nonfinite(self, step: int) -> bool:
        """After the allreduce every rank sees the same gradient (or, on one node, its
        slice of it, and the ranks sum the slices' norms): all agree on NaN/Inf."""
        g = self.optimizer.grads
        with np.errstate(over="ignore", invalid="ignore"):
            norm2 = self._sum_of_squares(g)
        self._grad_norm2 = norm2
        # a huge but finite gradient can overflow the sum of squares: then look closer
        if math.isfinite(norm2) or self._all_finite(g):
            self._consecutive_skips = 0
            return False
        if self.cfg.on_nonfinite == "stop":
            raise StopTraining(1, f"non-finite loss or gradient at step {step + 1} "
                                  "(use --debug to find the layer, or --on-nonfinite skip)")
        self.state.skipped_steps += 1
        self._consecutive_skips += 1
        self.say(f"warning: non-finite gradient at step {step + 1}; update skipped "
                 f"({self._consecutive_skips} in a row)")
        self.log("skipped_step", step=step + 1, consecutive=self._consecutive_skips,
                 skipped_steps=self.state.skipped_steps)
        if self._consecutive_skips >= self.cfg.max_skips:
            raise StopTraining(1, f"{self._consecutive_skips} consecutive non-finite steps "
                                  f"(up to step {step + 1}); stopping")
        return True

    def _sum_of_squares(self, g: Any) -> float:
        """The gradient's squared norm, summed over the ranks' slices in rank order, so that
        it has the same bytes whether each rank holds the whole gradient or (one node)
        only its slice. One read-back from the device."""
        xp = self.xp
        if self.node is not None:  # this rank's slice; one exact sum of a zero-padded row
            row = np.zeros(self.world)
            row[self.rank] = float(xp.dot(g, g)) if g.size else 0.0
            parts = self.comm.allreduce_scalars(row)
            return float(sum(float(v) for v in parts))
        parts = [xp.dot(g[s:e], g[s:e]).astype(np.float64)  # an empty slice adds 0 exactly
                 for s, e in slice_bounds(g.size, self.world) if e > s]
        total = parts[0] if parts else None
        for part in parts[1:]:
            total = total + part
        return 0.0 if total is None else float(total)

    def _all_finite(self, g: Any) -> bool:
        """No NaN/Inf in ``g`` (in any rank's slice, on one node)."""
        finite = bool(self.xp.isfinite(g).all())
        if self.node is not None:
            finite = bool(self.comm.allreduce_scalars([float(finite)], "min")[0])
        return finite

    # -- reporting ------------------------------------------------------------------
    def _next_rows(self, idx: np.ndarray, j: int) -> np.ndarray | None:
        """This rank's samples of the micro-batch after micro-batch ``j`` of ``idx``."""
        mb = self.micro_batch
        if j + 1 < self.cfg.accum_steps:
            return shard(idx[(j + 1) * mb:(j + 2) * mb], self.rank, self.world)
        nxt = self._upcoming
        return None if nxt is None else shard(nxt[:mb], self.rank, self.world)

    def _reduced(self, stats: EpochStats) -> tuple[float, float, float, dict[str, float]]:
        if stats.pending is not None:  # the device sums come back here, once per report
            loss, correct = self.backend.to_host(stats.pending)
            stats.loss_sum += float(loss)
            stats.correct += float(correct)
            stats.pending = None
        sums = self.comm.allreduce_scalars([stats.loss_sum, stats.correct, stats.samples])
        tmax = self.comm.allreduce_scalars([stats.times[p] for p in PHASES], "max")
        per = max(1, stats.steps)
        timing = {f"{p}_ms": round(1000 * t / per, 3) for p, t in zip(PHASES, tmax, strict=True)}
        return float(sums[0]), float(sums[1]), float(sums[2]), timing

    def _log_steps(self, stats: EpochStats) -> None:
        loss_sum, correct, n, _ = self._reduced(stats)
        steps = max(1, stats.steps)
        self.log("step", step=self.state.global_step, epoch=self.state.epoch + 1,
                 train_loss=loss_sum / steps, train_acc=correct / max(1.0, n),
                 lr=self.schedule(max(0, self.state.global_step - 1)))

    def _report_epoch(self, epoch: int, stats: EpochStats, elapsed: float) -> None:
        loss_sum, correct, n, timing = self._reduced(stats)
        steps = max(1, stats.steps)
        rec: dict[str, Any] = {
            "epoch": epoch + 1, "step": self.state.global_step,
            "train_loss": loss_sum / steps, "train_acc": correct / max(1.0, n),
            "samples_per_sec": n / elapsed if elapsed > 0 else 0.0, "epoch_time": elapsed,
            "lr": self.schedule(max(0, self.state.global_step - 1)),
            "skipped_steps": self.state.skipped_steps, "timing_ms_per_step": timing}
        line = (f"epoch {epoch + 1}/{self.cfg.epochs}  train loss {rec['train_loss']:.4f} "
                f"acc {rec['train_acc']:.4f}")
        if self.data.test is not None and len(self.data.test):
            ev = self.evaluate("test")
            rec.update(test_loss=ev["loss"], test_acc=ev["accuracy"])
            line += f"  test loss {ev['loss']:.4f} acc {ev['accuracy']:.4f}"
            if self.state.epoch_pos == 0:  # best is judged on whole epochs only
                self._track_best(ev["accuracy"])
        line += f"  {rec['samples_per_sec']:.0f} samples/s  {elapsed:.2f}s"
        if stats.steps and self.world > 1:
            line += f"  (sync wait {timing['sync_wait_ms']:.2f} ms/step)"
        self.say(line)
        self.log("epoch", **rec)

    def _track_best(self, acc: float) -> None:
        st = self.state
        if math.isnan(st.best_metric) or acc > st.best_metric:
            st.best_metric = acc
            self._best_pending = True

    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Loss and accuracy on a split, sharded over ranks and reduced."""
        ds = self.data.test if split == "test" else self.data.train
        return evaluate_model(self.model, self.loss, ds, self.comm, self.xp,
                              self.cfg.eval_batch_size)

    # -- checkpoints -----------------------------------------------------------------
    def _maybe_checkpoint(self, end_of_epoch: bool) -> None:
        kind, amount = self.ckpt_kind, self.ckpt_amount
        due = False
        if kind == "epoch":
            due = end_of_epoch
        elif kind == "steps":
            # also at an epoch's last step (the loop hands that one to the end-of-epoch call)
            due = self.state.global_step % int(amount) == 0
        elif kind == "seconds" and not end_of_epoch:
            due = self._since_ckpt >= amount  # agreed by every rank in _agree_stop()
        if due:
            self.save_checkpoint()
        if end_of_epoch and self._best_pending:
            self._best_pending = False
            self.save_checkpoint(best=True)

    def _host_snapshot(self) -> dict[str, Any]:
        to_host = self.backend.to_host
        return {"params": to_host(self.model.params).copy(),
                "state": to_host(self.model.state).copy(),
                "opt_state": {k: to_host(v).copy() for k, v in self.opt_state.items()}}

    def save_checkpoint(self, final: bool = False, best: bool = False) -> Path | None:
        """Rank 0 writes atomically; every rank learns whether it worked."""
        t0 = time.perf_counter()
        st = self.state
        d = ckpt.checkpoint_dir(self.cfg.run_dir)
        path = d / ckpt.BEST_NAME if best else ckpt.checkpoint_path(self.cfg.run_dir,
                                                                      st.global_step)
        error = b""
        if self.is_root:
            try:
                faults.inject("checkpoint", self.rank, st.global_step)
                if path != getattr(self, "_ckpt_on_disk", None) or best:
                    d.mkdir(parents=True, exist_ok=True)
                    snap = self._host_snapshot()
                    ckpt.write_file(path, kind="checkpoint", model=self.model,
                                    params=snap["params"], state=snap["state"],
                                    config=self.cfg.resolved(), world_size=self.world,
                                    optimizer=self.optimizer, opt_state=snap["opt_state"],
                                    trainer=st, seed=self.cfg.seed,
                                    epoch_order=self.sampler.epoch_order(st.epoch))
                    if not best:
                        self._ckpt_on_disk = path
                        ckpt.prune(self.cfg.run_dir, self.cfg.keep_last)
            except (UserError, OSError) as e:
                error = str(e).encode() or b"checkpoint write failed"
        if self.world > 1:
            self.watchdog.arm(f"checkpoint write of step {st.global_step} (rank 0 writing)")
            error = self.comm.bcast_bytes(error)
            self.watchdog.disarm()
        self._last_ckpt_time = time.monotonic()
        t1 = time.perf_counter()
        self.timeline.add("checkpoint", t0, t1, path=str(path))
        if error:
            msg = f"checkpoint write failed: {error.decode()}"
            if self.cfg.continue_on_checkpoint_error and not final:
                self.say(f"warning: {msg}; training goes on (continue_on_checkpoint_error)")
                return None
            raise agreed(UserError(msg + " (previous checkpoints are intact)"))
        self.log("checkpoint", step=st.global_step, epoch=st.epoch, path=str(path),
                 seconds=round(t1 - t0, 4), best=best)
        faults.pause_point("checkpoint", st.global_step, rank=self.rank, path=str(path))
        return path

    def save_model(self) -> Path | None:
        """The final model (architecture + weights) as run_dir/model.h5."""
        if not self.is_root:
            return None
        snap = self._host_snapshot()
        path = Path(self.cfg.run_dir) / "model.h5"
        ckpt.write_file(path, kind="model", model=self.model, params=snap["params"],
                        state=snap["state"], config=self.cfg.resolved(),
                        world_size=self.world, seed=self.cfg.seed)
        self.say(f"saved model to {path}")
        return path

    def _preempt(self) -> None:
        sig = self.stop_signal
        name = signal.Signals(sig).name if sig else "a signal on another rank"
        path = self.save_checkpoint(final=True)  # a preemption without a checkpoint is an error
        self.log("preempted", step=self.state.global_step, signal=name, path=str(path))
        raise StopTraining(EXIT_PREEMPTED, f"stopping on {name} at step "
                                           f"{self.state.global_step}: checkpoint {path}; "
                                           "resume with --resume auto")

    def close(self) -> None:
        self.watchdog.close() if hasattr(self, "watchdog") else None
        if self.cfg.timeline:
            self.write_timeline(merge=getattr(self, "_finished", False))
        if self.run_dir is not None:
            self.run_dir.close()

    def write_timeline(self, merge: bool = True) -> Path:
        """This rank's trace (NAME.rankN.SUFFIX with several ranks); with ``merge``, every
        rank must call it: after a barrier rank 0 merges all ranks into NAME.SUFFIX."""
        path = Path(self.cfg.timeline)
        if self.world == 1:
            return self.timeline.write(path)
        mine = self.timeline.write(rank_path(path, self.rank))
        if not merge:
            return mine
        self.comm.barrier()
        if self.is_root:
            merge_traces([rank_path(path, r) for r in range(self.world)], path)
        return path


def evaluate_model(model: Sequential, loss: Any, ds: Any, comm: Communicator, xp: Any,
                   batch: int) -> dict[str, float]:
    """Mean loss and accuracy over ``ds``; each rank takes its shard of every batch."""
    dev_sums = xp.zeros(2, np.float64)  # [loss, correct], read back once at the end
    n = 0.0
    ctx = Context(xp=xp, training=False,
                  allreduce_sum=comm.allreduce_sum if comm.size > 1 else None)
    for start in range(0, len(ds), batch):
        idx = np.arange(start, min(start + batch, len(ds)))
        local = shard(idx, comm.rank, comm.size)
        x = xp.asarray(ds.x[local])
        y = xp.asarray(ds.y[local])
        ctx.sample_index = local
        out = model.forward(x, ctx)
        dev_sums[0] += loss.forward(out, y, 1.0, xp)
        dev_sums[1] += loss.count_correct(out, y, xp)
        n += len(local)
    total_loss, correct = (float(v) for v in (dev_sums if isinstance(dev_sums, np.ndarray)
                                               else xp.asnumpy(dev_sums)))
    sums = comm.allreduce_scalars([total_loss, correct, n])
    n_all = max(1.0, sums[2])
    return {"loss": float(sums[0] / n_all), "accuracy": float(sums[1] / n_all),
            "samples": int(sums[2])}
