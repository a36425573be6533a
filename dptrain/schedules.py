"""Learning-rate schedules: ``lr(step)`` for constant, step and cosine decay and reduce
on plateau, each with an optional linear warmup in front.

The schedules that depend on the step alone are plain functions of it; reduce on plateau
learns from one metric per epoch and keeps that in a state of plain numbers, so that a
checkpoint can hold it and a resumed run goes on exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from .errors import UserError

#: the learning-rate schedules ``make_schedule`` knows
SCHEDULES = ("constant", "step", "cosine", "plateau")
#: ReduceLROnPlateau's threshold modes
THRESHOLD_MODES = ("rel", "abs")


class Schedule:
    """``lr(step)`` for step 0, 1, ... of the run.

    A schedule that decides from the run's progress (``plateau``) is fed one metric value
    per epoch through ``observe``, the same value on every rank, and keeps what it has
    learnt in ``state_dict()``: plain finite numbers for a checkpoint, restored with
    ``load_state_dict``. The other schedules are functions of the step alone.
    """

    #: whether ``observe`` must be called at the end of every epoch
    needs_metric: bool = False

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def observe(self, metric: float, step: int) -> None:
        """Take the epoch's metric, measured after ``step`` optimizer steps."""

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if dict(state):
            raise UserError(f"the checkpoint holds learning-rate schedule state "
                            f"({', '.join(sorted(state))}) but {self.describe()} keeps none")

    def describe(self) -> str:
        return f"lr schedule {type(self).__name__.lower()}"


class _Formula(Schedule):
    """A schedule that is a function of the step alone."""

    def __init__(self, name: str, lr: Callable[[int], float]) -> None:
        self.name, self._lr = name, lr

    def __call__(self, step: int) -> float:
        return self._lr(step)

    def describe(self) -> str:
        return f"lr schedule {self.name!r}"


class Plateau(Schedule):
    """Reduce on plateau, step for step PyTorch's ``ReduceLROnPlateau``.

    An epoch's metric is an improvement when it beats the best so far by the threshold
    (mode ``min``: below best * (1 - threshold) for ``rel``, below best - threshold for
    ``abs``; mode ``max``: above best * (1 + threshold), or above best + threshold).
    After more than ``patience`` epochs in a row without one, the rate is multiplied by
    ``factor`` (not below ``min_lr``; a change smaller than ``eps`` is not made), and the
    next ``cooldown`` epochs count no bad epochs. A non-finite metric is never an
    improvement (and never becomes the best: checkpoints hold finite numbers only).
    """

    needs_metric = True
    _KEYS = ("lr", "best", "has_best", "epochs", "bad_epochs", "cooldown_left")

    def __init__(self, base_lr: float, *, mode: str = "min", factor: float = 0.1,
                 patience: int = 10, threshold: float = 1e-4, threshold_mode: str = "rel",
                 cooldown: int = 0, min_lr: float = 0.0, eps: float = 1e-8) -> None:
        _check_choice("plateau_mode", mode, ("min", "max"))
        _check_choice("plateau_threshold_mode", threshold_mode, THRESHOLD_MODES)
        if not _real(factor) or not 0.0 < factor < 1.0:
            raise UserError(f"plateau_factor must be a number in (0, 1), not {factor!r}")
        _check_count("plateau_patience", patience)
        _check_count("plateau_cooldown", cooldown)
        if not _real(threshold) or threshold < 0:
            raise UserError(f"plateau_threshold must be a finite number >= 0, not "
                            f"{threshold!r}")
        self.base_lr = base_lr
        self.mode, self.factor, self.patience = mode, float(factor), int(patience)
        self.threshold, self.threshold_mode = float(threshold), threshold_mode
        self.cooldown, self.min_lr, self.eps = int(cooldown), float(min_lr), float(eps)
        self.lr = float(base_lr)
        self.best = 0.0
        self.has_best = False
        self.epochs = self.bad_epochs = self.cooldown_left = 0

    def __call__(self, step: int) -> float:
        return self.lr

    def _is_better(self, metric: float) -> bool:
        if not math.isfinite(metric):
            return False
        if not self.has_best:
            return True
        best, th = self.best, self.threshold
        if self.mode == "min":
            return metric < (best * (1.0 - th) if self.threshold_mode == "rel" else best - th)
        return metric > (best * (th + 1.0) if self.threshold_mode == "rel" else best + th)

    def observe(self, metric: float, step: int) -> None:
        metric = float(metric)
        self.epochs += 1
        if self._is_better(metric):
            self.best, self.has_best, self.bad_epochs = metric, True, 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_epochs = 0  # bad epochs in cooldown do not count
        if self.bad_epochs > self.patience:
            new_lr = max(self.lr * self.factor, self.min_lr)
            if self.lr - new_lr > self.eps:
                self.lr = new_lr
            self.cooldown_left = self.cooldown
            self.bad_epochs = 0

    def state_dict(self) -> dict[str, float]:
        return {"lr": self.lr, "best": self.best, "has_best": int(self.has_best),
                "epochs": self.epochs, "bad_epochs": self.bad_epochs,
                "cooldown_left": self.cooldown_left}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        if sorted(state) != sorted(self._KEYS):
            raise UserError(f"the checkpoint's learning-rate schedule state has "
                            f"{', '.join(sorted(state)) or 'nothing'}, not the "
                            f"{', '.join(self._KEYS)} of lr schedule 'plateau'")
        values = {k: float(state[k]) for k in self._KEYS}
        counts = ("has_best", "epochs", "bad_epochs", "cooldown_left")
        if not all(math.isfinite(v) for v in values.values()) or values["lr"] <= 0 or any(
                values[k] < 0 or values[k] != int(values[k]) for k in counts):
            raise UserError(f"the checkpoint's learning-rate schedule state is invalid: "
                            f"{values}")
        self.lr, self.best = values["lr"], values["best"]
        self.has_best = bool(values["has_best"])
        self.epochs, self.bad_epochs, self.cooldown_left = (int(values[k]) for k in counts[1:])

    def describe(self) -> str:
        return "lr schedule 'plateau'"


class Warmup(Schedule):
    """Linear warmup over the first ``steps`` steps, then ``main`` from its own step 0.

    lr(t) = base_lr * (t + 1) / (steps + 1) for t < steps: the rate rises in equal steps
    from base_lr / (steps + 1), never 0 (no step is wasted), and ``main`` takes over at
    step ``steps`` with its own start (base_lr): PyTorch's
    ``SequentialLR([LinearLR(start_factor=1 / (steps + 1), total_iters=steps), main],
    milestones=[steps])``, where the base rate is first used at step ``steps``, once. A
    metric observed before the warmup has ended does not reach ``main``.
    """

    def __init__(self, main: Schedule, base_lr: float, steps: int) -> None:
        self.main, self.base_lr, self.steps = main, base_lr, steps
        self.needs_metric = main.needs_metric

    def __call__(self, step: int) -> float:
        if step < self.steps:
            return self.base_lr * (step + 1) / (self.steps + 1)
        return self.main(step - self.steps)

    def observe(self, metric: float, step: int) -> None:
        if step >= self.steps:
            self.main.observe(metric, step)

    def state_dict(self) -> dict[str, float]:
        return self.main.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.main.load_state_dict(state)

    def describe(self) -> str:
        return self.main.describe()


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{name} must be a whole number >= 0, not {value!r}")


def _check_choice(name: str, value: Any, known: tuple[str, ...]) -> None:
    if value not in known:
        raise UserError(f"{name} must be one of {', '.join(known)}, not {value!r}")


def make_schedule(name: str, base_lr: float, total_steps: int, warmup_steps: int = 0,
                  step_size: int = 1, gamma: float = 0.1, min_lr: float = 0.0, *,
                  plateau_mode: str = "min", plateau_factor: float = 0.1,
                  plateau_patience: int = 10, plateau_threshold: float = 1e-4,
                  plateau_threshold_mode: str = "rel",
                  plateau_cooldown: int = 0) -> Schedule:
    """The schedule ``name`` (constant | step | cosine | plateau), after ``warmup_steps``
    of linear warmup when that is > 0 (see ``Warmup`` for the convention).

    ``step``: base_lr * gamma ** (t // step_size). ``cosine``: from base_lr down to
    ``min_lr`` over the steps after warmup. ``plateau``: ``Plateau`` with the
    ``plateau_*`` settings (mode ``min`` for a loss, ``max`` for an accuracy) and
    ``min_lr``; it needs ``observe`` once per epoch. Here t counts from the end of warmup.
    """
    if not _real(base_lr) or base_lr <= 0:
        raise UserError(f"lr must be positive, not {base_lr}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise UserError("warmup_steps must be >= 0")
    if not _real(min_lr) or not 0.0 <= min_lr <= base_lr:
        raise UserError(f"min_lr must be a number in [0, lr = {base_lr}], not {min_lr!r}")

    main: Schedule
    if name == "constant":
        main = _Formula(name, lambda t: base_lr)
    elif name == "step":
        if step_size <= 0:
            raise UserError("lr_step_size must be positive")
        main = _Formula(name, lambda t: base_lr * gamma ** (t // step_size))
    elif name == "cosine":
        span = max(1, total_steps - warmup_steps)

        def cosine(t: int) -> float:
            frac = min(t, span) / span
            return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * frac))
        main = _Formula(name, cosine)
    elif name == "plateau":
        main = Plateau(base_lr, mode=plateau_mode, factor=plateau_factor,
                       patience=plateau_patience, threshold=plateau_threshold,
                       threshold_mode=plateau_threshold_mode, cooldown=plateau_cooldown,
                       min_lr=min_lr)
    else:
        raise UserError(f"unknown lr schedule {name!r}; known: {', '.join(SCHEDULES)}")
    return Warmup(main, base_lr, warmup_steps) if warmup_steps else main
