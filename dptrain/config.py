"""The typed run configuration: defaults, TOML loading, overrides and validation.

Every field has a help text; the command line offers each field as ``--field-name``,
so the config file, the CLI and ``--help`` can never disagree.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta, **kw)


@dataclass
class Config:
    """Everything a training run needs; ``resolved()`` is what the run directory records."""

    # model
    model: str = _f("cnn", "model preset (mlp | cnn | resnet20 | resnet56 | resnet18 | vgg11); "
                           "ignored when `layers` is given")
    layers: list = _f([], "custom model: list of layer specs, e.g. "
                          "[{type='dense', units=64}, {type='relu'}] (config file only)")
    dtype: str = _f("float32", "floating-point type of parameters and data",
                    ("float32", "float64"))
    loss: str = _f("cross_entropy", "loss: cross_entropy (from logits), cross_entropy_probs "
                   "(after a softmax layer), mse", ("cross_entropy", "cross_entropy_probs", "mse"))
    # data
    dataset: str = _f("digits", "digits (built in), synthetic, or a path to .h5/.hdf5/.npz")
    synthetic_shape: list = _f([28, 28, 1], "sample shape of the synthetic dataset")
    synthetic_classes: int = _f(10, "classes of the synthetic dataset")
    synthetic_samples: int = _f(2048, "samples (train + test) of the synthetic dataset")
    # schedule of work
    epochs: int = _f(20, "passes over the training set")
    max_steps: int = _f(0, "stop after this many optimizer steps in total (0 = no limit)")
    batch_size: int = _f(0, "global batch per optimizer step, over all ranks "
                            "(world-size invariant; default 64 unless batch_per_rank is given)")
    batch_per_rank: int = _f(0, "alternative to batch_size: samples per rank per step "
                                "(weak scaling); giving both is an error")
    accum_steps: int = _f(1, "micro-batches accumulated per optimizer step (no communication "
                             "on the first accum_steps - 1)")
    eval_batch_size: int = _f(256, "global batch size for evaluation")
    seed: int = _f(0, "seed for initialisation, shuffling and dropout")
    # optimizer
    optimizer: str = _f("adam", "optimizer", ("sgd", "adam", "adamw"))
    lr: float = _f(1e-3, "base learning rate")
    momentum: float = _f(0.9, "SGD momentum (0 disables it)")
    nesterov: bool = _f(False, "Nesterov momentum for SGD")
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.999, "Adam beta2")
    eps: float = _f(1e-8, "Adam epsilon")
    weight_decay: float = _f(0.0, "weight decay (L2 for sgd/adam, decoupled for adamw)")
    decay_bias_norm: bool = _f(False, "also decay biases and normalisation parameters")
    clip_norm: float = _f(0.0, "clip the global gradient norm to this value (0 = off)")
    lr_schedule: str = _f("constant", "learning-rate schedule", ("constant", "step", "cosine"))
    warmup_steps: int = _f(0, "linear warmup steps before the schedule")
    lr_step_size: int = _f(1000, "steps between decays of the step schedule")
    lr_gamma: float = _f(0.1, "decay factor of the step schedule")
    min_lr: float = _f(0.0, "final learning rate of the cosine schedule")
    # distribution
    comm: str = _f("auto", "communicator: auto (MPI when launched by mpiexec/srun), mpi, "
                           "local, or nccl (MPI, with NCCL for GPU arrays)",
                   ("auto", "mpi", "local", "nccl"))
    bucket_mb: float = _f(4.0, "gradient bucket size in MiB")
    overlap: bool = _f(True, "start each bucket's allreduce during backward")
    shared_memory_sync: bool = _f(True, "when every rank is on one node (CPU), keep gradients, "
                                        "parameters and optimizer state in memory the ranks "
                                        "share: each rank sums and updates its own slice (off: "
                                        "one replica per rank, MPI allreduce buckets)")
    threads: int = _f(0, "BLAS threads per rank (0 = cores on the node / ranks on the node, "
                         "unless OMP_NUM_THREADS etc. are set)")
    device: str = _f("cpu", "cpu, gpu (CuPy) or auto", ("cpu", "gpu", "auto"))
    allow_gpu_sharing: bool = _f(False, "allow more ranks than GPUs on a node")
    gpu_aware_mpi: str = _f("auto", "hand GPU buffers to MPI directly: auto (when the MPI "
                                    "library reports CUDA support), on, or off (stage them "
                                    "through pinned host memory)", ("auto", "on", "off"))
    # run directory, logging, checkpoints
    run_dir: str = _f("runs/default", "run directory: resolved config, metrics.jsonl, "
                                      "checkpoints, final model")
    log_every: int = _f(0, "also log every N steps (0 = per epoch only)")
    progress: str = _f("auto", "progress bar: auto (when stdout is a terminal), on, off",
                       ("auto", "on", "off"))
    verbose: bool = _f(False, "every rank prints, each line tagged with its rank")
    debug: bool = _f(False, "one process without MPI, non-finite checks per layer and a "
                            "finite-difference gradient check before training")
    checkpoint_every: str = _f("epoch", "checkpoint schedule: 'epoch', 'N' steps, 'Tm'/'Ts'/'Th' "
                                        "time, or 'off' (a final checkpoint is always written)")
    keep_last: int = _f(3, "checkpoints to keep besides best")
    resume: str = _f("", "resume from 'auto' (newest good checkpoint in run_dir) or a path")
    continue_on_checkpoint_error: bool = _f(False, "keep training when a checkpoint write fails")
    on_nonfinite: str = _f("stop", "on NaN/Inf loss or gradient: stop, or skip the update",
                           ("stop", "skip"))
    max_skips: int = _f(10, "with on_nonfinite=skip, stop after this many consecutive skips")
    drift_check_every: int = _f(0, "compare parameter checksums across ranks every N steps "
                                   "(0 = each epoch)")
    collective_timeout: float = _f(0.0, "abort when one step's communication takes longer "
                                        "than this many seconds (0 = off)")
    timeline: str = _f("", "write a Chrome trace (JSON) of each step's phases to this path")

    # -- derived ---------------------------------------------------------------------
    def global_batch(self, world: int) -> int:
        """Samples per micro-batch over all ranks."""
        if self.batch_per_rank:
            return self.batch_per_rank * world
        return self.batch_size or 64

    def resolved(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_SECTION = re.compile(r"^[a-z_]+$")


def _coerce(name: str, value: Any) -> Any:
    """Check ``value`` against the field's type; one-line error naming the key."""
    f = FIELDS[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kind = type(default)
    ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))
          or kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise UserError(f"config key {name!r} must be {kind.__name__}, "
                        f"not {type(value).__name__} ({value!r})")
    if kind is float:
        value = float(value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"config key {name!r} must be one of {', '.join(choices)}, not {value!r}")
    return value


def parse_value(name: str, text: str) -> Any:
    """Turn a command-line string into the field's type."""
    if name not in FIELDS:
        raise UserError(f"unknown option {name!r}")
    f = FIELDS[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kind = type(default)
    try:
        if kind is bool:
            low = text.lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return low in ("1", "true", "yes", "on")
        if kind is list:
            return json.loads(text)
        return kind(text)
    except (ValueError, json.JSONDecodeError):
        raise UserError(f"option --{name.replace('_', '-')}: {text!r} is not a valid "
                        f"{kind.__name__}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config; top-level keys may also sit in any [section] (flattened)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {p} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):  # no key takes a table: [model], [optimizer] group
            for k, v in value.items():
                flat[k] = v
        else:
            flat[key] = value
    return flat


def make_config(values: dict[str, Any]) -> Config:
    """A validated Config from plain key/values (config file merged with overrides)."""
    kwargs = {}
    for key, value in values.items():
        if key not in FIELDS:
            close = [k for k in FIELDS if k.startswith(key[:4])]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown config key {key!r}{hint}")
        kwargs[key] = _coerce(key, value)
    for key in ("batch_size", "batch_per_rank"):
        if key in kwargs and kwargs[key] <= 0:
            raise UserError(f"{key} must be a positive number of samples, not {kwargs[key]}")
    cfg = Config(**kwargs)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range checks that do not need the data or the world size."""
    positive = ["epochs", "accum_steps", "eval_batch_size", "keep_last", "max_skips"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"{name} must be positive, not {getattr(cfg, name)}")
    for name in ["batch_size", "batch_per_rank", "max_steps", "warmup_steps", "threads",
                 "log_every", "drift_check_every"]:
        if getattr(cfg, name) < 0:
            raise UserError(f"{name} must be >= 0, not {getattr(cfg, name)}")
    if cfg.batch_size and cfg.batch_per_rank:
        raise UserError("give batch_size (global) or batch_per_rank, not both")
    if cfg.lr <= 0:
        raise UserError(f"lr must be positive, not {cfg.lr}")
    if cfg.bucket_mb <= 0:
        raise UserError(f"bucket_mb must be positive, not {cfg.bucket_mb}")
    if not 0 <= cfg.momentum < 1:
        raise UserError(f"momentum must be in [0, 1), not {cfg.momentum}")
    if cfg.collective_timeout < 0 or cfg.clip_norm < 0 or cfg.weight_decay < 0:
        raise UserError("collective_timeout, clip_norm and weight_decay must be >= 0")
    if not isinstance(cfg.layers, list) or not all(isinstance(x, dict) for x in cfg.layers):
        raise UserError("layers must be a list of tables like {type='dense', units=10}")
    if (len(cfg.synthetic_shape) == 0 or
            not all(isinstance(d, int) and d > 0 for d in cfg.synthetic_shape)):
        raise UserError(f"synthetic_shape must be positive integers, not {cfg.synthetic_shape}")
    parse_checkpoint_every(cfg.checkpoint_every)


def parse_checkpoint_every(text: str) -> tuple[str, float]:
    """'epoch' | 'off' | 'N' (steps) | 'T{s,m,h}' -> (kind, amount)."""
    t = str(text).strip().lower()
    if t in ("epoch", "off"):
        return t, 0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", t)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"checkpoint_every must be 'epoch', 'off', a step count or a time "
                        f"like 10m, not {text!r}")
    if not m.group(2):
        if "." in m.group(1):
            raise UserError(f"checkpoint_every step count must be an integer, not {text!r}")
        return "steps", int(m.group(1))
    return "seconds", float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
