"""Pause points (dptrain/faults.py), the event-based hooks that let tests act at an exact
moment: which points pause, what the marker says, release by deleting it, the hang guard,
and a spec that cannot be read."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from conftest import child_env, run_dptrain
from pause_points import info, pause_env, reached, release

from dptrain import faults
from dptrain.errors import UserError


@pytest.fixture
def arm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """arm(*points) -> the marker directory; the hooks are disarmed again afterwards."""
    monkeypatch.setattr(faults, "_pauses", None)
    monkeypatch.setattr(faults, "_active", None)

    def armed(*points: str) -> Path:
        for k, v in pause_env(tmp_path / "pauses", *points).items():
            monkeypatch.setenv(k, v)
        faults.load()
        return tmp_path / "pauses"
    return armed


def in_thread(*args, **kwargs) -> tuple[threading.Thread, list[BaseException]]:
    """faults.pause_point(*args, **kwargs) in a thread; what it raised, if anything."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            faults.pause_point(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001  (handed to the test)
            raised.append(e)
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, raised


def wait_marker(directory: Path, point: str, step: int | None, t: threading.Thread) -> Path:
    deadline = time.monotonic() + 60  # a hang guard
    while not (found := reached(directory, point, step)):
        assert t.is_alive(), "the pause point returned without pausing"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    [marker] = found
    return marker


def test_a_point_pauses_until_its_marker_is_deleted(arm) -> None:
    d = arm("checkpoint@7")
    t, raised = in_thread("checkpoint", 7, rank=1, path="x.h5")
    marker = wait_marker(d, "checkpoint", 7, t)
    assert marker.name == f"checkpoint-7.{os.getpid()}.{faults._paused - 1}.paused"
    assert info(marker) == {"point": "checkpoint", "step": 7, "pid": os.getpid(), "rank": 1,
                            "path": "x.h5"}
    t.join(0.2)
    assert t.is_alive()  # still waiting: nothing but the marker's removal lets it go
    release([marker])
    t.join(60)
    assert not t.is_alive() and not raised
    assert sorted(p.name for p in d.iterdir()) == []  # no temporary file left either


def test_only_the_named_points_and_steps_pause(arm, tmp_path: Path) -> None:
    d = arm("write@7-8", "start")
    for point, step in (("write", 6), ("write", 9), ("write", None), ("checkpoint", 7),
                        ("signal", 7)):
        faults.pause_point(point, step)  # returns at once: not armed there
    assert list(d.iterdir()) == []
    for point, step in (("write", 8), ("start", None), ("start", 3)):
        t, raised = in_thread(point, step)
        release([wait_marker(d, point, step, t)])
        t.join(60)
        assert not t.is_alive() and not raised


def test_unset_pause_points_do_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(faults.PAUSE_ENV, raising=False)
    monkeypatch.setenv(faults.PAUSE_DIR_ENV, str(tmp_path / "pauses"))
    monkeypatch.setattr(faults, "_pauses", None)
    monkeypatch.setattr(faults, "_active", None)
    faults.load()
    assert faults.pauses() is None
    for point in faults.POINTS:
        faults.pause_point(point, 1)
    assert not (tmp_path / "pauses").exists()


def test_an_unreleased_pause_fails_after_the_hang_guard(arm, monkeypatch) -> None:
    d = arm("signal")
    monkeypatch.setattr(faults, "PAUSE_LIMIT", 0.0)
    with pytest.raises(RuntimeError, match=r"the pause at signal-4\.\d+\.\d+\.paused was not "
                                           r"released within 0 s"):
        faults.pause_point("signal", 4)
    assert list(d.iterdir()) == []


@pytest.mark.parametrize(("spec", "directory", "message"), [
    ("nowhere", "d", "unknown pause point 'nowhere' (expected NAME, NAME@N or NAME@N-M"),
    ("write@x", "d", "the steps of 'write@x' must be N or N-M"),
    ("write@9-3", "d", "the steps of 'write@9-3' must be N or N-M (N <= M)"),
    ("write@7", "", "DPTRAIN_TEST_PAUSE is set but DPTRAIN_TEST_PAUSE_DIR"),
])
def test_unreadable_specs_name_the_variable(spec: str, directory: str, message: str) -> None:
    with pytest.raises(UserError, match="^DPTRAIN_TEST_PAUSE") as e:
        faults.parse_pauses(spec, directory)
    assert message in str(e.value)


def test_the_run_says_where_it_will_pause_and_refuses_a_bad_spec(tmp_path: Path) -> None:
    tiny = ["--model", "mlp", "--max-steps", "2", "--progress", "off"]
    env = child_env(**pause_env(tmp_path / "p", "write@99"))  # never reached
    proc = run_dptrain([*tiny, "--run-dir", str(tmp_path / "a")], env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (f"note: DPTRAIN_TEST_PAUSE is set; pausing for a test at write@99 (markers in "
            f"{tmp_path / 'p'})") in proc.stdout
    env = child_env(DPTRAIN_TEST_PAUSE="write@7", DPTRAIN_TEST_PAUSE_DIR="")
    proc = run_dptrain([*tiny, "--run-dir", str(tmp_path / "b")], env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        "dptrain: error: DPTRAIN_TEST_PAUSE is set but DPTRAIN_TEST_PAUSE_DIR (where the "
        "markers go) is not"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "p"]  # no run directory b
