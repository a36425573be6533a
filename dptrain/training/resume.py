"""Resuming: rank 0 finds, reads and checks the checkpoint before anything on disk changes.

Every check happens here, before the run directory is touched: the file verifies, the
model matches it, the optimizer is the one that wrote it, the training set has its size,
no option that changes the trajectory differs from the run that wrote it, and the dataset
files are the ones it was trained on (their fingerprint; both unless
``allow_config_change``). A resumed run with other options keeps the earlier config.json
beside the new one (``config.step-N.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import checkpoint as ckpt
from ..config import flatten_sections
from ..errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer

#: options whose change alters the steps still to come; a resume must keep them unless the
#: user allows it. World size, threads, buckets and the like change no result; epochs and
#: max_steps say how far to go (a longer cosine schedule is the user's intent).
TRAJECTORY = ("model", "layers", "dtype", "loss", "dataset", "synthetic_shape",
              "synthetic_classes", "synthetic_samples", "batch_size", "batch_per_rank",
              "accum_steps", "lr_schedule", "warmup_steps", "lr_step_size", "lr_gamma",
              "min_lr", "optimizer", "lr", "momentum", "nesterov", "beta1", "beta2", "eps",
              "weight_decay", "decay_bias_norm", "clip_norm", "seed", "label_smoothing",
              "plateau_metric", "plateau_factor", "plateau_patience", "plateau_cooldown",
              "plateau_threshold", "plateau_threshold_mode", "augment_crop", "augment_flip",
              "augment_erase", "augment_erase_area", "augment_erase_ratio", "normalize")


@dataclass
class Resume:
    """What rank 0 loaded: the file, its counters, the line to print."""

    path: Path | None
    state: ckpt.TrainerState | None
    message: str
    #: the checkpoint's record of its data (normalisation, fingerprint); {} when older
    data: dict = field(default_factory=dict)


def load_resume(trainer: Trainer) -> Resume | None:
    """Rank 0: the checkpoint to resume from (loaded into the model and optimizer
    buffers), or None for a fresh run. Any problem is a UserError; nothing is written."""
    cfg = trainer.cfg
    if not cfg.checkpoint.resume:
        return None
    if cfg.checkpoint.resume == "auto":
        found = ckpt.find_resumable(cfg.run.run_dir, warn=trainer.say)
        if found is None:
            return Resume(None, None, "no checkpoint to resume from in "
                          + str(ckpt.checkpoint_dir(cfg.run.run_dir)))
        path, ck = found
    else:
        path = Path(cfg.checkpoint.resume)
        ck = ckpt.read_file(path)
        if ck.kind != "checkpoint":
            raise UserError(f"{path} is a saved model, not a checkpoint; it cannot resume "
                            "training (use it with `dptrain eval`)")
    ckpt.check_compatible(ck, trainer.model, path)
    if ck.optimizer_name != cfg.optim.optimizer:
        raise UserError(f"checkpoint {path} was written with optimizer {ck.optimizer_name}, "
                        f"the config asks for {cfg.optim.optimizer}")
    _check_epoch_order(trainer, ck, path)
    changed = _changed_options(trainer, ck, path)
    # a dataset file that changed under the run is named here, before anything is written
    data_note = trainer.data.check_resume(ck.data, path, cfg.checkpoint.allow_config_change)
    _load(trainer, ck, path)
    _check_extension_state(trainer, ck)
    t = ck.trainer
    where = (f"epoch {t.epoch + 1}" if t.epoch_pos or t.epoch < cfg.schedule.epochs
             else f"{t.epoch} epochs complete")
    return Resume(path, ck.trainer,
                  f"resumed from {path} ({where}, step {t.global_step}, saved by "
                  f"{ck.meta.get('world_size')} rank(s))"
                  + (f"; options changed: {', '.join(changed)}" if changed else "")
                  + (f"\n{data_note}" if data_note else ""), ck.data)


def _changed_options(trainer: Trainer, ck: ckpt.Checkpoint, path: Path) -> list[str]:
    """The trajectory options that differ from the checkpoint's run (an error unless
    allowed)."""
    cfg = trainer.cfg
    changed = cfg.differences(ck.config, list(TRAJECTORY))
    if changed and not cfg.checkpoint.allow_config_change:
        theirs = ckpt_options(ck)
        mine = cfg.resolved()
        what = ", ".join(f"{k} {theirs[k]!r} -> {mine[k]!r}" for k in changed)
        raise UserError(f"checkpoint {path} was written with other options: {what}; resume "
                        "with the same options, or pass --allow-config-change to go on with "
                        "the new ones (config.json then keeps the old ones beside it)")
    return changed


def ckpt_options(ck: ckpt.Checkpoint) -> dict[str, object]:
    """The options of the run that wrote ``ck``, by name (files of every version)."""
    return flatten_sections(ck.config, where="checkpoint config")


def _check_epoch_order(trainer: Trainer, ck: ckpt.Checkpoint, path: Path) -> None:
    """The sampler must draw the checkpoint's sample order for the epoch it stopped in."""
    saved, sampler = ck.epoch_order, trainer.plan.sampler
    if saved is None:
        return
    if len(saved) != sampler.n_samples:
        raise UserError(f"checkpoint {path} was taken over a training set of {len(saved)} "
                        f"samples, this one has {sampler.n_samples}")
    if not np.array_equal(saved, sampler.epoch_order(ck.trainer.epoch)):
        trainer.say(f"warning: this numpy ({np.__version__}) draws another sample order for "
                    f"epoch {ck.trainer.epoch + 1} than the one that wrote {path} "
                    f"(numpy {ck.rng.get('numpy_version', '?')}); the rest of this epoch "
                    "will not repeat the interrupted run exactly")


def _check_extension_state(trainer: Trainer, ck: ckpt.Checkpoint) -> None:
    """Every extension takes the checkpoint's numbers here first, on rank 0, so that a
    damaged value is refused before the run directory changes (every rank loads them again
    after the broadcast)."""
    t = ck.trainer
    loaded = {"best_metric": t.best_metric, "skipped_steps": t.skipped_steps, **t.extras}
    for ext in trainer.extensions:
        ext.load_state_dict(loaded)


def _load(trainer: Trainer, ck: ckpt.Checkpoint, path: Path) -> None:
    """Parameters, model state and optimizer state into rank 0's buffers."""
    model, xp = trainer.model, trainer.model.xp
    for name in trainer.placement.opt_state:
        if name not in ck.optimizer_state:
            raise UserError(f"checkpoint {path} lacks optimizer state {name!r}")
    ckpt.load_into(model, ck, path)
    for name, buf in trainer.placement.opt_state.items():
        buf[...] = xp.asarray(ckpt.flatten(model, ck.optimizer_state[name]))
    trainer.optimizer.step_count = ck.optimizer_step
