"""The typed run configuration, in sections: defaults, ranges, TOML loading, validation.

Every option is declared once, beside its section, with its default, help text, choices
and allowed range; the command line offers each as a flat ``--option-name`` and ``--help``
shows the range, so the config file, the CLI and the help can never disagree. Option names
are unique across sections, so a TOML file may give them at the top level or in any table
(``[optim]``, ``[model]``, ... are the canonical sections, which ``config.json`` uses).
A validated ``Config`` is frozen: code that needs another value builds a new one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# -- declaring options -------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """Allowed values of a number: ``low``/``high`` (None: unbounded), open or closed.
    Floats must also be finite: NaN and Inf are never a valid setting."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return not (self.high is not None
                    and (v > self.high or (self.high_open and v == self.high)))

    def text(self) -> str:
        """``> 0``, ``>= 1``, ``in [0, 1)``, ``0 to 4096``."""
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            if not (self.low_open or self.high_open):
                return f"{_num(lo)} to {_num(hi)}"
            return (f"in {'(' if self.low_open else '['}{_num(lo)}, "
                    f"{_num(hi)}{')' if self.high_open else ']'}")
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {_num(lo)}"
        if hi is not None:
            return f"{'<' if self.high_open else '<='} {_num(hi)}"
        return "finite"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


POSITIVE = Range(0, None, low_open=True)
NON_NEGATIVE = Range(0)
FINITE = Range()
UNIT_OPEN = Range(0, 1, high_open=True)       # [0, 1)
COUNT = Range(1, 10**12)
COUNT0 = Range(0, 10**12)                    # 0 = off / no limit
#: the loggers a run can add to metrics.jsonl
LOGGERS = ("csv", "tensorboard")
#: the per-epoch figures a schedule or early stopping can watch
METRICS = ("test_loss", "test_acc", "train_loss", "train_acc")


def opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
        range: Range | None = None, default_text: str = "",
        message: str = "", metavar: str = "") -> Any:
    """A config option: its default, help text, and what values it allows.

    ``message`` replaces the range error's wording (``{name}``, ``{value}``, ``{range}``)."""
    meta = {"help": help, "choices": choices, "range": range, "default_text": default_text,
            "message": message, "metavar": metavar}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


# -- the sections --------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """What is trained: the architecture, its number type and its loss."""

    model: str = opt("cnn", "model preset: mlp, cnn, resnet20, resnet56, resnet18 or vgg11 "
                            "(sized from the data); ignored when `layers` is given",
                     metavar="NAME")
    layers: tuple = opt((), "custom model: a list of layer specs, in a config file or as JSON "
                            "on the command line, e.g. "
                            "'[{\"type\": \"flatten\"}, {\"type\": \"dense\", \"units\": 10}]'",
                        default_text="none (use `model`)")
    dtype: str = opt("float32", "floating-point type of parameters and data",
                     choices=("float32", "float64"))
    loss: str = opt("cross_entropy", "cross_entropy (from logits), cross_entropy_probs "
                                     "(after a softmax layer), or mse",
                    choices=("cross_entropy", "cross_entropy_probs", "mse"))
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy losses (PyTorch's): "
                                      "the training target becomes (1 - s) * target + s / "
                                      "classes; test losses are reported without it",
                                 range=UNIT_OPEN)


@dataclass(frozen=True)
class DataConfig:
    """Where the samples come from."""

    dataset: str = opt("digits", "digits (built in), synthetic, or a path to .h5/.hdf5/.npz",
                       metavar="NAME|PATH")
    synthetic_shape: tuple = opt((28, 28, 1), "sample shape of the synthetic dataset, e.g. "
                                              "28,28,1", metavar="H,W,C")
    synthetic_classes: int = opt(10, "classes of the synthetic dataset", range=Range(2, 10**6))
    synthetic_samples: int = opt(2048, "samples (train + test) of the synthetic dataset",
                                 range=Range(2, 10**9))
    data_dir: str = opt("", "directory of the IDX files of fashion_mnist, mnist or kmnist",
                        default_text="the system's, e.g. /usr/share/datasets/fashion-mnist")
    cache_dir: str = opt("", "where IDX datasets are converted to HDF5 once",
                         default_text="$DPTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/dptrain, else "
                                      "~/.cache/dptrain")
    loader: str = opt("auto", "memory (the split in RAM, one copy per node), stream (each "
                              "rank reads its rows of each batch from the HDF5 file), or auto "
                              "(memory when the node's copies take at most half the available "
                              "memory; the start line says which and why)",
                      choices=("auto", "memory", "stream"))
    prefetch: str = opt("auto", "prepare the next batch while the step computes: in a "
                                "thread, in a worker process (streamed data), or off; auto: a "
                                "process when streamed rows need HDF5 decoding (compressed or "
                                "checksummed), else a thread",
                        choices=("auto", "thread", "process", "off"))
    augment_crop: int = opt(0, "random crop: pad images with this many zero pixels per side, "
                               "cut a window of the original size (0 = off)",
                            range=Range(0, 4096))
    augment_flip: bool = opt(False, "random horizontal flip (probability 1/2)")
    augment_erase: float = opt(0.0, "random erasing (cutout): probability that an image gets "
                                    "one erased rectangle (0 = off)", range=Range(0, 1))
    augment_erase_area: tuple = opt((0.02, 0.33), "erased area as a fraction of the image: "
                                                  "low,high in (0, 1]")
    augment_erase_ratio: tuple = opt((0.3, 3.3), "aspect ratio (height/width) of the erased "
                                                 "rectangle: low,high (log-uniform)")
    normalize: str = opt("none", "per-channel normalisation: channel ((x - mean) / std with "
                                 "statistics of the training split, computed once per run and "
                                 "stored with it) or none", choices=("none", "channel"))


@dataclass(frozen=True)
class ScheduleConfig:
    """How much training, in which batches, at which learning rate."""

    epochs: int = opt(20, "passes over the training set", range=COUNT,
                      message="{name} must be positive, not {value} (range {range})")
    max_steps: int = opt(0, "stop after this many optimizer steps in total (0 = no limit)",
                         range=COUNT0)
    batch_size: int = opt(0, "global batch per optimizer step, over all ranks (world-size "
                             "invariant)", range=Range(1, 10**8),
                          default_text="64, unless batch_per_rank is given",
                          message="{name} must be a positive number of samples, not {value}")
    batch_per_rank: int = opt(0, "alternative to batch_size: samples per rank per step (weak "
                                 "scaling); giving both is an error", range=Range(1, 10**8),
                              default_text="not used",
                              message="{name} must be a positive number of samples, "
                                      "not {value}")
    accum_steps: int = opt(1, "micro-batches accumulated per optimizer step (no communication "
                              "on the first accum_steps - 1)", range=Range(1, 10**6))
    eval_batch_size: int = opt(256, "global batch size for evaluation", range=Range(1, 10**8))
    lr_schedule: str = opt("constant", "learning-rate schedule (plateau: reduce on plateau of "
                                       "plateau_metric, once per epoch)",
                           choices=("constant", "step", "cosine", "plateau"))
    warmup_steps: int = opt(0, "linear warmup steps before the schedule (0 = none)",
                            range=COUNT0)
    lr_step_size: int = opt(1000, "steps between decays of the step schedule", range=COUNT)
    lr_gamma: float = opt(0.1, "decay factor of the step schedule",
                          range=Range(0, 1, low_open=True))
    min_lr: float = opt(0.0, "final learning rate of the cosine schedule; the floor of the "
                             "plateau schedule", range=NON_NEGATIVE)
    plateau_metric: str = opt("test_loss", "what the plateau schedule watches (losses should "
                                           "fall, accuracies rise)", choices=METRICS)
    plateau_factor: float = opt(0.1, "the plateau schedule multiplies the rate by this",
                                range=Range(0, 1, low_open=True, high_open=True))
    plateau_patience: int = opt(10, "epochs without improvement before the plateau schedule "
                                    "lowers the rate (it lowers it on the next one)",
                                range=COUNT0)
    plateau_cooldown: int = opt(0, "epochs after a reduction in which the plateau schedule "
                                   "counts no bad epochs", range=COUNT0)
    plateau_threshold: float = opt(1e-4, "how much better than the best an epoch must be to "
                                         "count as an improvement (plateau schedule)",
                                   range=NON_NEGATIVE)
    plateau_threshold_mode: str = opt("rel", "plateau_threshold relative to the best (rel) or "
                                             "absolute (abs)", choices=("rel", "abs"))
    early_stop_patience: int = opt(0, "stop after this many epochs in a row without an "
                                      "improvement of early_stop_metric (0 = never stop "
                                      "early)", range=COUNT0)
    early_stop_metric: str = opt("test_acc", "the metric that picks the best epoch (best.h5, "
                                             "restore_best) and that early stopping watches",
                                 choices=("test_loss", "test_acc"))
    early_stop_min_delta: float = opt(0.0, "an epoch improves on the best when it is better by "
                                           "at least this much (and better at all)",
                                      range=NON_NEGATIVE)

    def global_batch(self, world: int) -> int:
        """Samples per micro-batch over all ranks."""
        if self.batch_per_rank:
            return self.batch_per_rank * world
        return self.batch_size or 64


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer and its hyperparameters."""

    optimizer: str = opt("adam", "optimizer", choices=("sgd", "adam", "adamw"))
    lr: float = opt(1e-3, "base learning rate", range=POSITIVE)
    momentum: float = opt(0.9, "SGD momentum (0 disables it)", range=UNIT_OPEN)
    nesterov: bool = opt(False, "Nesterov momentum for SGD (needs momentum > 0)")
    beta1: float = opt(0.9, "Adam beta1", range=UNIT_OPEN)
    beta2: float = opt(0.999, "Adam beta2", range=UNIT_OPEN)
    eps: float = opt(1e-8, "Adam epsilon", range=Range(0, 1, low_open=True))
    weight_decay: float = opt(0.0, "weight decay (L2 for sgd/adam, decoupled for adamw)",
                              range=NON_NEGATIVE)
    decay_bias_norm: bool = opt(False, "also decay biases and normalisation parameters")
    clip_norm: float = opt(0.0, "clip the global gradient norm to this value (0 = off)",
                           range=NON_NEGATIVE)


@dataclass(frozen=True)
class ParallelConfig:
    """How ranks, threads and devices share the work."""

    comm: str = opt("auto", "communicator: auto (MPI when launched by mpiexec/srun), mpi, "
                            "local, or nccl (MPI, with NCCL for GPU arrays)",
                    choices=("auto", "mpi", "local", "nccl"))
    bucket_mb: float = opt(4.0, "gradient bucket size in MiB", range=Range(0, 4096,
                                                                            low_open=True))
    overlap: bool = opt(True, "start each bucket's allreduce during backward")
    shared_memory_sync: bool = opt(True, "when every rank is on one node (CPU), keep "
                                         "gradients, parameters and optimizer state in memory "
                                         "the ranks share: each rank sums and updates its own "
                                         "slice (off: one replica per rank, MPI allreduces)")
    threads: int = opt(0, "BLAS threads per rank (0 = cores on the node / ranks on the node, "
                          "unless OMP_NUM_THREADS etc. are set)", range=Range(0, 4096))
    device: str = opt("cpu", "cpu, gpu (CuPy, one GPU per rank) or auto",
                      choices=("cpu", "gpu", "auto"))
    allow_gpu_sharing: bool = opt(False, "allow more ranks than GPUs on a node")
    gpu_aware_mpi: str = opt("auto", "hand GPU buffers to MPI directly: auto (when the MPI "
                                     "library reports CUDA support), on, or off (stage them "
                                     "through pinned host memory)", choices=("auto", "on", "off"))
    collective_timeout: float = opt(0.0, "abort when one step's communication takes longer "
                                         "than this many seconds (0 = off)",
                                    range=Range(0, 10**7))
    drift_check_every: int = opt(0, "compare parameter checksums across ranks every N steps "
                                    "(0 = at the end of each epoch)", range=COUNT0)


@dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written, how many are kept, where training resumes from."""

    checkpoint_every: str = opt("epoch", "checkpoint schedule: 'epoch', 'N' steps, 'Ts'/'Tm'/"
                                         "'Th' time, or 'off' (a final checkpoint is always "
                                         "written)", metavar="SCHEDULE")
    keep_last: int = opt(3, "step checkpoints to keep besides best.h5", range=Range(1, 10**6),
                         message="{name} must be positive, not {value} (range {range})")
    resume: str = opt("", "resume from 'auto' (newest good checkpoint in run_dir, or a fresh "
                          "start without one) or a checkpoint path", default_text="none",
                      metavar="auto|PATH")
    continue_on_checkpoint_error: bool = opt(False, "keep training when a checkpoint write "
                                                    "fails (the final one must succeed)")
    allow_config_change: bool = opt(False, "let a resumed run change options that alter the "
                                           "training trajectory (lr, batch size, ...); the "
                                           "earlier config.json is kept beside the new one")
    restore_best: bool = opt(False, "at the end, model.h5 gets the weights of the best epoch "
                                    "(best.h5, by early_stop_metric) instead of the last")


@dataclass(frozen=True)
class RunConfig:
    """The run directory, randomness, output and failure policy."""

    run_dir: str = opt("runs/default", "run directory: resolved config, metrics.jsonl, "
                                       "checkpoints, final model", metavar="DIR")
    keep_previous: int = opt(3, "earlier runs a fresh run in the same run_dir keeps under "
                                "run_dir/previous/ (the oldest beyond this are removed)",
                             range=Range(0, 10**6))
    seed: int = opt(0, "seed for initialisation, shuffling and dropout",
                    range=Range(0, 2**63 - 1))
    log_every: int = opt(0, "also log every N steps (0 = per epoch only)", range=COUNT0)
    progress: str = opt("auto", "progress on rank 0: auto (a live line where a terminal "
                                "shows the output, also through mpiexec; plain lines every "
                                "30 s in logs), bar (always the live line; also: on), lines, "
                                "or off", choices=("auto", "bar", "on", "lines", "off"))
    progress_every: float = opt(30.0, "seconds between plain progress lines (progress = "
                                      "lines, or auto in a log)", range=Range(0, 86400))
    verbose: bool = opt(False, "every rank prints, each line tagged with its rank")
    debug: bool = opt(False, "one process without MPI, non-finite checks per layer and a "
                             "finite-difference gradient check before training")
    on_nonfinite: str = opt("stop", "on NaN/Inf loss or gradient: stop, or skip the update",
                            choices=("stop", "skip"))
    max_skips: int = opt(10, "with on_nonfinite=skip, stop after this many consecutive skips",
                         range=Range(1, 10**6),
                         message="{name} must be positive, not {value} (range {range})")
    timeline: str = opt("", "write a Chrome trace (JSON) of each step's phases to this path",
                        default_text="none", metavar="FILE")
    loggers: tuple = opt((), "more per-epoch logs besides metrics.jsonl, in the run directory: "
                             "csv (metrics.csv), tensorboard (event files in tensorboard/; "
                             "needs the tensorboardX package)", choices=LOGGERS)


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "schedule": ScheduleConfig,
    "optim": OptimConfig, "parallel": ParallelConfig, "checkpoint": CheckpointConfig,
    "run": RunConfig}


@dataclass(frozen=True)
class Option:
    """One option as the CLI, the TOML loader and ``--help`` see it."""

    name: str
    section: str
    default: Any
    kind: type
    help: str
    choices: tuple[str, ...] | None
    range: Range | None
    default_text: str
    message: str
    metavar: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def shown_default(self) -> str:
        if self.default_text:
            return self.default_text
        if self.kind is tuple:
            return ",".join(str(v) for v in self.default) or "none"
        if self.kind is bool:
            return "on" if self.default else "off"
        return repr(self.default) if self.kind is str else f"{self.default:g}" \
            if self.kind is float else str(self.default)


def _options() -> dict[str, Option]:
    out: dict[str, Option] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            m = f.metadata
            assert f.name not in out, f"option {f.name} declared twice"
            out[f.name] = Option(f.name, section, default, type(default), m["help"],
                                 m["choices"], m["range"], m["default_text"], m["message"],
                                 m["metavar"])
    return out


#: every option by its (flat, unique) name
FIELDS: dict[str, Option] = _options()
#: options a run records as 0 when they were not given
_ZERO_IS_UNSET = ("batch_size", "batch_per_rank")


@dataclass(frozen=True)
class Config:
    """Everything a training run needs, by section; ``resolved()`` is what a run records."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def resolved(self) -> dict[str, Any]:
        """Every option by name (JSON types), as ``config.json`` and checkpoints record it."""
        return {name: _jsonable(getattr(getattr(self, o.section), name))
                for name, o in FIELDS.items()}

    def replace(self, **values: Any) -> Config:
        """A validated copy with some options (by flat name) changed."""
        return config_from_dict({**self.resolved(), **values})

    def differences(self, other: dict[str, Any], keys: Iterator[str] | list[str]) -> list[str]:
        """The names in ``keys`` whose value differs in ``other`` (a flat or sectioned
        config, as read from a file)."""
        theirs = flatten_sections(other)
        mine = self.resolved()
        return [k for k in keys if k in theirs and _jsonable(theirs[k]) != mine[k]]


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


# -- values from files and the command line -----------------------------------------------
def _coerce(name: str, value: Any) -> Any:
    """Check ``value`` against the option's type, choices and range; one-line errors."""
    o = FIELDS[name]
    kind = o.kind
    if kind is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {name!r} must be a list, not "
                            f"{type(value).__name__} ({value!r})")
        if o.choices:  # a list of names, each one of the choices, none twice
            bad = [v for v in value if v not in o.choices]
            if bad:
                raise UserError(f"config key {name!r}: {bad[0]!r} is not one of "
                                f"{', '.join(o.choices)}")
            if len(set(value)) != len(value):
                raise UserError(f"config key {name!r} names an entry twice: {list(value)}")
        return tuple(value)
    ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))
          or kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise UserError(f"config key {name!r} must be {kind.__name__}, "
                        f"not {type(value).__name__} ({value!r})")
    if kind is float:
        value = float(value)
    if o.choices and value not in o.choices:
        raise UserError(f"config key {name!r} must be one of {', '.join(o.choices)}, "
                        f"not {value!r}")
    if o.range is not None and not o.range.contains(value):
        if isinstance(value, float) and not math.isfinite(value):
            text = "{name} must be a finite number ({range}), not {value}"
        else:
            text = o.message or "{name} must be {range}, not {value}"
        raise UserError(text.format(name=name, value=value, range=o.range.text()))
    return value


def parse_value(name: str, text: str) -> Any:
    """Turn a command-line string into the option's type."""
    if name not in FIELDS:
        raise UserError(f"unknown option {name!r}")
    o = FIELDS[name]
    kind = o.kind
    try:
        if kind is bool:
            low = text.lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return low in ("1", "true", "yes", "on")
        if kind is tuple and o.choices and not text.lstrip().startswith("["):
            return [w.strip() for w in text.split(",") if w.strip()]  # csv,tensorboard
        if kind is tuple:
            v = json.loads(text if text.lstrip().startswith("[") else f"[{text}]")
            if not isinstance(v, list):
                raise ValueError
            return v
        if kind is int:
            return int(text, 10)
        return kind(text)
    except (ValueError, json.JSONDecodeError):
        what = "JSON list" if kind is tuple else kind.__name__
        raise UserError(f"option {o.flag}: {text!r} is not a valid {what}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config: options at the top level or in any table (one level deep)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {p} is not valid TOML: {e}") from None
    except OSError as e:
        raise UserError(f"config file {p} cannot be read: {e.strerror or e}") from None
    return flatten_sections(data, where=f"config file {p}")


def flatten_sections(data: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """Options by name from a flat or sectioned mapping (a table holds options; no option
    takes a table as its value). An option given twice is an error."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for k, v in items:
            if k in flat:
                raise UserError(f"{where}: option {k!r} is given twice")
            flat[k] = v
    return flat


def _unknown(key: str) -> UserError:
    close = [k for k in FIELDS if k.startswith(key[:4])] or \
        [k for k in FIELDS if key.replace("-", "_") == k]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UserError(f"unknown config key {key!r}{hint}")


def make_config(values: dict[str, Any]) -> Config:
    """A validated, frozen Config from options by name (a config file merged with the
    command line's overrides)."""
    by_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in values.items():
        if key not in FIELDS:
            raise _unknown(key)
        by_section[FIELDS[key].section][key] = _coerce(key, value)
    cfg = Config(**{s: SECTIONS[s](**kw) for s, kw in by_section.items()})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks across options that need neither the data nor the world size."""
    s, o = cfg.schedule, cfg.optim
    if s.batch_size and s.batch_per_rank:
        raise UserError("give batch_size (global) or batch_per_rank, not both")
    layers = cfg.model.layers
    if not all(isinstance(x, dict) for x in layers):
        raise UserError("layers must be a list of tables like {type='dense', units=10}")
    shape = cfg.data.synthetic_shape
    if (len(shape) == 0 or not all(isinstance(d, int) and not isinstance(d, bool)
                                   and 0 < d <= 65536 for d in shape)):
        raise UserError(f"synthetic_shape must be 1 to 65536 in each dimension, not "
                        f"{list(shape)}")
    _check_pair(cfg.data.augment_erase_area, "augment_erase_area", high=1.0)
    _check_pair(cfg.data.augment_erase_ratio, "augment_erase_ratio")
    if o.nesterov and not o.momentum:
        raise UserError("nesterov needs momentum > 0")
    if s.lr_schedule in ("cosine", "plateau") and s.min_lr > o.lr:
        raise UserError(f"min_lr ({s.min_lr:g}) must not exceed lr ({o.lr:g})")
    if not cfg.run.run_dir.strip():
        raise UserError("run_dir must not be empty")
    parse_checkpoint_every(cfg.checkpoint.checkpoint_every)


def _check_pair(pair: tuple, name: str, high: float | None = None) -> None:
    """A (low, high) range option: two finite numbers, 0 < low <= high (<= ``high``)."""
    ok = (len(pair) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 and math.isfinite(v) for v in pair)
          and 0 < pair[0] <= pair[1] and (high is None or pair[1] <= high))
    if not ok:
        bound = f" <= {_num(high)}" if high is not None else ""
        raise UserError(f"{name} must be two numbers low,high with 0 < low <= high{bound}, "
                        f"not {list(pair)}")


def config_from_dict(data: dict[str, Any]) -> Config:
    """A Config from what a run directory or checkpoint recorded (options by name; a
    sectioned mapping is read too)."""
    flat = flatten_sections(data, where="recorded config")
    return make_config({k: v for k, v in flat.items()
                        if not (k in _ZERO_IS_UNSET and v == 0)})


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
        if int(m.group(1)) > 10**12:
            raise UserError(f"checkpoint_every step count is too large: {text!r}")
        return "steps", int(m.group(1))
    seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
    if seconds > 10**8:
        raise UserError(f"checkpoint_every time is too long: {text!r}")
    return "seconds", seconds
