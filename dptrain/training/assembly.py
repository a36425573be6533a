"""``build_trainer(cfg, comm)``: one place that turns a config into a ready trainer.

Each config section goes to its own factory: [data] to the dataset loader, [model] to the
model builder, [parallel] to the device, communicator and replica placement, [optim] and
[schedule] to the optimizer and learning-rate schedule, [checkpoint] and [run] to the
extensions. The command line, the scripts and the tests all build trainers here.

The parts that can fail on one rank alone (reading the data, building the model) run
before any collective, and the ranks agree on the outcome, so a mistake stops every rank
with one message instead of leaving some waiting in a collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import faults
from ..atomic import check_writable
from ..backend import Backend, select_backend
from ..config import Config
from ..data import GlobalSampler, validate_for_model
from ..data.stored import FoundData, find_data
from ..errors import UserError
from ..nn import Sequential, get_loss, layer_from_spec, preset_layers
from ..nn.memory import check_batch_fits
from ..optim import make_optimizer, make_schedule
from ..parallel import Communicator, LocalComm, agree, device_comm, make_placement
from ..parallel.watchdog import Watchdog
from ..timeline import Timeline
from .evaluate import has_top5
from .extension import Extension
from .extensions import default_extensions
from .extensions.tensorboard import summary_writer_class
from .inputs import check_augment, open_inputs
from .loop import Trainer
from .monitor import check_watched, mode
from .plan import BatchPlan
from .step import TrainStep


def build_model(cfg: Config, input_shape: tuple[int, ...], num_outputs: int,
                xp: Any) -> Sequential:
    """The configured model (preset or layer list), not yet initialised."""
    m = cfg.model
    specs = m.layers if m.layers else preset_layers(m.model, num_outputs)
    return Sequential([layer_from_spec(dict(s)) for s in specs], input_shape, m.dtype, xp)


@dataclass
class _LocalParts:
    """What each rank builds without talking to the others."""

    data: FoundData
    model: Sequential
    loss: Any
    micro_batch: int


def num_outputs(data: FoundData) -> int:
    """Classes or targets per sample the model must output for ``data``."""
    y = data.train.y
    if y.ndim == 2:
        return int(y.shape[1])
    if data.num_classes:
        return int(data.num_classes)
    return int(y.max()) + 1 if len(y) else 0


def _local_parts(cfg: Config, backend: Backend, world: int, local_size: int) -> _LocalParts:
    if cfg.run.timeline:  # written at the end: writable now, not after training
        check_writable(cfg.run.timeline, "timeline")
    data = find_data(cfg.data, dtype=cfg.model.dtype, seed=cfg.run.seed)
    try:
        return _check_and_build(cfg, data, backend, world, local_size)
    except BaseException:
        data.close()
        raise


def _check_and_build(cfg: Config, data: FoundData, backend: Backend, world: int,
                     local_size: int) -> _LocalParts:
    check_augment(cfg, data)
    train = data.train
    num_out = num_outputs(data)
    model = build_model(cfg, train.sample_shape, num_out, backend.xp)
    labels_first = len(model.output_shape) == 1 and train.has_labels
    if labels_first:  # out-of-range labels are named before the output-shape mismatch
        validate_for_model(data, model.input_shape, model.output_shape[0], cfg.model.loss)
    if model.output_shape != (num_out,):
        raise UserError(f"the model's output shape {model.output_shape} does not match the "
                        f"dataset's {num_out} classes/targets")
    if not labels_first:
        validate_for_model(data, model.input_shape, num_out, cfg.model.loss)
    check_watched(cfg, data.test is not None and len(data.test) > 0)
    if "tensorboard" in cfg.run.loggers:
        summary_writer_class()  # the optional package is there, or one line now
    micro_batch = cfg.schedule.global_batch(world)
    _check_local_batchnorm(model, micro_batch, world, len(train), cfg.schedule.accum_steps)
    check_batch_fits(model, -(-micro_batch // world), ranks_here=local_size)
    model.initialize(cfg.run.seed)
    loss = get_loss(cfg.model.loss, cfg.model.label_smoothing)
    return _LocalParts(data, model, loss, micro_batch)


def _micro_batch_sizes(n: int, micro: int, accum: int) -> list[int]:
    """The sizes of the micro-batches an epoch of ``n`` samples has (the last step's may
    be short, and its last micro-batch shorter still)."""
    full, rest = divmod(n, micro * accum)
    sizes = [micro] if full or rest >= micro else []
    if rest % micro:
        sizes.append(rest % micro)
    return sizes


def _check_local_batchnorm(model: Sequential, micro_batch: int, world: int,
                           n_train: int, accum: int) -> None:
    """BatchNorm with sync=false normalises each rank's own samples: every rank that holds
    samples needs at least two values per channel in every micro-batch of the epoch, the
    last, short one included, or its statistics are void."""
    for size in _micro_batch_sizes(n_train, micro_batch, accum):
        share = max(1, size // world)  # the smallest non-empty share of this batch
        for layer in model.leaf_layers():  # BatchNorms inside blocks too
            if getattr(layer, "kind", "") != "batchnorm" or layer.sync:
                continue
            if share * math.prod(layer.in_shape[:-1]) >= 2:
                continue
            what = (f"a global batch of {size}" if size == micro_batch else
                    f"the last batch of an epoch ({size} of {n_train} samples)")
            raise UserError(
                f"layer {layer.name}: BatchNorm(sync=false) normalises each rank's own "
                f"samples, but {what} over {world} rank(s) leaves a rank {share} sample per "
                f"step; use a global batch of at least {2 * world} (batch_per_rank >= 2) "
                "that leaves no short last batch, or sync=true")


def _say_from(cfg: Config, comm: Communicator) -> Any:
    def say(msg: str) -> None:
        if cfg.run.verbose and comm.size > 1:
            print("\n".join(f"[rank {comm.rank}] {ln}" for ln in msg.splitlines()), flush=True)
        elif comm.rank == 0:
            print(msg, flush=True)
    return say


def build_trainer(cfg: Config, comm: Communicator | None = None, *,
                  extensions: list[Extension] | None = None,
                  threads_line: str = "") -> Trainer:
    """A trainer for ``cfg`` on ``comm`` (one process when None), every rank agreed.

    ``extensions`` replaces the default list (``training.extensions.default_extensions``);
    to add one, append it to ``trainer.extensions`` before ``trainer.run()``.
    """
    comm = comm or LocalComm()
    say = _say_from(cfg, comm)
    fault = agree(comm, faults.load)
    if fault is not None:
        say(f"note: {faults.ENV} is set; a test fault is armed: {fault}")
    if faults.pauses() is not None:
        say(f"note: {faults.PAUSE_ENV} is set; pausing for a test at {faults.pauses()}")
    par = cfg.parallel
    backend = select_backend(par.device, comm.local_rank, comm.local_size,
                             par.allow_gpu_sharing, comm=comm)
    parts = agree(comm, lambda: _local_parts(cfg, backend, comm.size, comm.local_size))
    assert parts is not None
    # memory (one copy per node) or streamed; the ranks choose together
    inputs = open_inputs(cfg, parts.data, comm, backend, parts.micro_batch)
    # device arrays reach MPI directly, staged through pinned memory, or through NCCL
    comm = agree(comm, lambda: device_comm(comm, backend, par.gpu_aware_mpi, par.comm == "nccl"))
    assert comm is not None
    model, train = parts.model, inputs.train
    if parts.micro_batch < comm.size and not cfg.schedule.batch_per_rank:
        say(f"note: global batch {parts.micro_batch} < {comm.size} ranks; some ranks get no "
            "samples in a step (they still join every collective)")
    sampler = GlobalSampler(len(train), parts.micro_batch * cfg.schedule.accum_steps,
                            cfg.run.seed)
    sc, op = cfg.schedule, cfg.optim
    plan = BatchPlan(sampler, sc.epochs, sc.max_steps)
    schedule = make_schedule(sc.lr_schedule, op.lr, plan.total_steps, sc.warmup_steps,
                             sc.lr_step_size, sc.lr_gamma, sc.min_lr,
                             plateau_mode=mode(sc.plateau_metric),
                             plateau_factor=sc.plateau_factor,
                             plateau_patience=sc.plateau_patience,
                             plateau_threshold=sc.plateau_threshold,
                             plateau_threshold_mode=sc.plateau_threshold_mode,
                             plateau_cooldown=sc.plateau_cooldown)
    timeline = Timeline(bool(cfg.run.timeline), comm.rank)
    # one node, CPU: gradients, parameters and optimizer state in memory the ranks share,
    # each rank updating its own slice (before the optimizer takes hold of the buffers)
    placement = make_placement(comm, model, shared_memory=par.shared_memory_sync,
                               bucket_bytes=int(par.bucket_mb * (1 << 20)),
                               overlap=par.overlap, timeline=timeline, say=say)
    own = placement.own
    mask = model.decay_mask(not op.decay_bias_norm)
    optimizer = make_optimizer(op.optimizer, model.params[own], model.grads[own], backend.xp,
                               momentum=op.momentum, nesterov=op.nesterov, beta1=op.beta1,
                               beta2=op.beta2, eps=op.eps, weight_decay=op.weight_decay,
                               decay_mask=None if mask is None else mask[own])
    placement.adopt(optimizer)
    watchdog = Watchdog(par.collective_timeout, lambda what: comm.abort(1), comm.rank)
    step = TrainStep(model=model, loss=parts.loss, optimizer=optimizer, placement=placement,
                     source=inputs.source, rank=comm.rank, world=comm.size,
                     micro_batch=parts.micro_batch, accum_steps=sc.accum_steps,
                     seed=cfg.run.seed, clip_norm=op.clip_norm,
                     undo_nonfinite=cfg.run.on_nonfinite == "skip", debug=cfg.run.debug,
                     timeline=timeline if timeline.enabled else None, watchdog=watchdog,
                     allreduce_sum=comm.allreduce_sum if comm.size > 1 else None,
                     top5=has_top5(model.output_shape[0]) and (
                         train.has_labels or cfg.model.loss != "mse"))
    if extensions is None:
        extensions = default_extensions(cfg, test_split=inputs.test_source, plan=plan,
                                        global_batch=sampler.batch_size,
                                        is_root=comm.rank == 0, timeline=timeline,
                                        threads_line=threads_line, schedule=schedule,
                                        eval_loss=get_loss(cfg.model.loss))
    trainer = Trainer(cfg=cfg, comm=comm, backend=backend, data=inputs, model=model,
                      loss=parts.loss, placement=placement, optimizer=optimizer, step=step,
                      plan=plan, schedule=schedule, extensions=extensions, watchdog=watchdog)
    faults.attach(trainer)
    return trainer
