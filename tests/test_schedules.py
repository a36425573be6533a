"""Learning-rate schedules: the warmup convention, reduce on plateau (composition with
warmup, checkpointable state, non-finite metrics) and the range checks of every setting."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest

from dptrain.errors import UserError
from dptrain.schedules import Plateau, make_schedule

METRICS = [1.0, 0.8, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.65, 0.65, 0.65, 0.65,
           0.64, 0.64, 0.64, 0.64, 0.64, 0.64, 0.6, 0.6, 0.6, 0.6, 0.6]
SETTINGS = {"plateau_factor": 0.3, "plateau_patience": 1, "plateau_cooldown": 1,
            "plateau_threshold": 0.02, "min_lr": 0.01}


@pytest.mark.parametrize("w", [1, 2, 5, 13])
@pytest.mark.parametrize("name", ["constant", "step", "cosine"])
def test_warmup_rises_to_the_base_rate_at_step_w(name, w) -> None:
    """lr(t) = base * (t + 1) / (w + 1) for t < w, then the main schedule from its own
    step 0: every warmup step is below the base rate and strictly rising, and the base
    rate (the main schedule's first value) comes at step w, used once there."""
    base = 0.4
    s = make_schedule(name, base, 50, warmup_steps=w, step_size=7, gamma=0.5)
    plain = make_schedule(name, base, 50 - w if name == "cosine" else 50, step_size=7,
                          gamma=0.5)
    warm = [s(t) for t in range(w)]
    assert warm == pytest.approx([base * (t + 1) / (w + 1) for t in range(w)], rel=1e-15)
    assert all(a < b for a, b in zip(warm, warm[1:], strict=False)) and warm[-1] < base
    assert [s(w + t) for t in range(30)] == [plain(t) for t in range(30)]
    assert s(w) == base


def _plateau(**kw):
    return make_schedule("plateau", 1.0, 0, **{**SETTINGS, **kw})


def test_plateau_state_resumes_exactly_through_a_checkpoint_file(tmp_path) -> None:
    """Stop after any epoch, write state_dict() as HDF5 attributes (plain finite
    numbers; JSON without NaN too), load it into a fresh schedule: the rates go on as in
    the uninterrupted run."""
    whole = _plateau()
    want = []
    for m in METRICS:
        whole.observe(m, 1)
        want.append(whole(0))
    assert len(set(want)) >= 4  # reductions, cooldowns and min_lr all happened
    for stop in range(len(METRICS)):
        first = _plateau()
        for m in METRICS[:stop]:
            first.observe(m, 1)
        state = first.state_dict()
        json.dumps(state, allow_nan=False)
        with h5py.File(tmp_path / f"s{stop}.h5", "w") as f:
            f.attrs.update(state)
        with h5py.File(tmp_path / f"s{stop}.h5") as f:
            loaded = {k: f.attrs[k].item() for k in f.attrs}
        second = _plateau()
        second.load_state_dict(loaded)
        got = []
        for m in METRICS[stop:]:
            second.observe(m, 1)
            got.append(second(0))
        assert got == want[stop:], stop
    assert want[-1] == SETTINGS["min_lr"]


def test_plateau_after_warmup() -> None:
    """Warmup first, then plateau: the rate rises over the warmup steps whatever the
    metric, epochs that end inside the warmup are not seen by the plateau, and after it
    the plateau's rate applies."""
    s = make_schedule("plateau", 1.0, 0, warmup_steps=10, plateau_patience=0,
                      plateau_factor=0.5)
    assert s.needs_metric
    s.observe(5.0, step=4)   # inside the warmup: ignored (it would set the best)
    s.observe(9.0, step=8)   # ignored (it would be a bad epoch: a reduction at patience 0)
    assert [s(t) for t in range(10)] == pytest.approx([(t + 1) / 11 for t in range(10)])
    assert s(10) == 1.0 and s.state_dict()["epochs"] == 0
    s.observe(6.0, step=10)  # the first epoch the plateau sees: the best
    s.observe(6.0, step=20)  # no improvement, patience 0: halve
    assert s(25) == 0.5 and s(3) == pytest.approx(4 / 11)
    assert s.state_dict()["epochs"] == 2


def test_non_finite_metrics_never_improve_and_never_reach_the_state() -> None:
    for mode, bad in (("min", [math.nan, math.inf, -math.inf]),
                      ("max", [math.nan, math.inf, -math.inf])):
        s = _plateau(plateau_mode=mode, plateau_patience=5)
        for m in bad:
            s.observe(m, 1)
        state = s.state_dict()
        assert state["has_best"] == 0 and state["bad_epochs"] == 3
        assert all(math.isfinite(v) for v in state.values())
        s.observe(0.5, 1)
        assert s.state_dict()["best"] == 0.5 and s.state_dict()["bad_epochs"] == 0


def test_the_other_schedules_keep_no_state() -> None:
    for name in ("constant", "step", "cosine"):
        s = make_schedule(name, 0.1, 100, warmup_steps=3)
        assert not s.needs_metric and s.state_dict() == {}
        before = [s(t) for t in range(20)]
        s.observe(1.0, 50)
        s.load_state_dict({})
        assert [s(t) for t in range(20)] == before
        with pytest.raises(UserError, match="holds learning-rate schedule state"):
            s.load_state_dict(_plateau().state_dict())


@pytest.mark.parametrize("state,match", [
    ({}, "schedule state has nothing"),
    ({"lr": 0.1}, "schedule state has lr, not"),
    ({**Plateau(1.0).state_dict(), "lr": -1.0}, "state is invalid"),
    ({**Plateau(1.0).state_dict(), "best": math.nan}, "state is invalid"),
    ({**Plateau(1.0).state_dict(), "epochs": 2.5}, "state is invalid"),
    ({**Plateau(1.0).state_dict(), "extra": 1}, "schedule state has"),
])
def test_plateau_refuses_a_foreign_state(state, match) -> None:
    with pytest.raises(UserError, match=match):
        _plateau().load_state_dict(state)


@pytest.mark.parametrize("kw,match", [
    ({"plateau_factor": 0.0}, r"plateau_factor must be a number in \(0, 1\), not 0.0"),
    ({"plateau_factor": 1.0}, r"plateau_factor must be a number in \(0, 1\)"),
    ({"plateau_factor": math.nan}, r"plateau_factor must be a number in \(0, 1\)"),
    ({"plateau_patience": -1}, "plateau_patience must be a whole number >= 0, not -1"),
    ({"plateau_patience": 1.5}, "plateau_patience must be a whole number >= 0"),
    ({"plateau_patience": True}, "plateau_patience must be a whole number >= 0"),
    ({"plateau_cooldown": -2}, "plateau_cooldown must be a whole number >= 0"),
    ({"plateau_threshold": -0.1}, "plateau_threshold must be a finite number >= 0"),
    ({"plateau_threshold": math.inf}, "plateau_threshold must be a finite number >= 0"),
    ({"plateau_threshold_mode": "relative"}, "plateau_threshold_mode must be one of rel, abs"),
    ({"plateau_mode": "up"}, "plateau_mode must be one of min, max, not 'up'"),
    ({"min_lr": 2.0}, r"min_lr must be a number in \[0, lr = 1.0\], not 2.0"),
    ({"min_lr": -0.1}, r"min_lr must be a number in \[0, lr = 1.0\]"),
])
def test_plateau_settings_are_range_checked(kw, match) -> None:
    with pytest.raises(UserError, match=match):
        _plateau(**kw)


def test_schedule_errors_name_the_setting() -> None:
    with pytest.raises(UserError, match="unknown lr schedule 'linear'; known: constant, "
                                        "step, cosine, plateau"):
        make_schedule("linear", 0.1, 10)
    with pytest.raises(UserError, match="lr must be positive"):
        make_schedule("constant", math.nan, 10)
    with pytest.raises(UserError, match="warmup_steps must be >= 0"):
        make_schedule("constant", 0.1, 10, warmup_steps=-1)
    with pytest.raises(UserError, match=r"min_lr must be a number in \[0, lr"):
        make_schedule("cosine", 0.1, 10, min_lr=0.5)
    cos = make_schedule("cosine", 0.1, 10, min_lr=0.1)  # min_lr == lr: a constant
    assert np.allclose([cos(t) for t in range(12)], 0.1)
