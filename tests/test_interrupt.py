"""Ctrl-C: the first one is a preemption (a checkpoint at the next step boundary, one line,
exit 130, nothing left in /dev/shm); a second one ends the run at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import _mapped_shm, child_env, mpi_cmd

from dptrain import checkpoint as ckpt

ARGS = ["--model", "mlp", "--dtype", "float64", "--batch-size", "50", "--epochs", "3",
        "--progress", "off", "--checkpoint-every", "2"]


def shm_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("*")} if Path("/dev/shm").is_dir() else set()


def left_behind(before: set[str]) -> set[str]:
    """Files that appeared in /dev/shm and that no live process maps (another job's
    files, still in use, are not ours)."""
    return (shm_files() - before) - _mapped_shm()


def start(run: Path, n: int | None, fault: str = "") -> tuple[subprocess.Popen, Path]:
    """A run in a session of its own (as a terminal's foreground job), output to a file."""
    log = run.with_suffix(".log")
    base = ["-m", "dptrain", "--run-dir", str(run), *ARGS]
    cmd = mpi_cmd(n, base) if n else [sys.executable, *base]
    env = child_env(**({"DPTRAIN_FAULT": fault} if fault else {}))
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, log


def wait_until(what, proc: subprocess.Popen, log: Path, limit: float = 120) -> None:
    end = time.monotonic() + limit  # a hang guard only: the moment is the event
    while not what():
        if proc.poll() is not None:
            raise AssertionError(f"ended early ({proc.returncode}):\n{log.read_text()}")
        if time.monotonic() > end:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"the awaited moment never came:\n{log.read_text()}")
        time.sleep(0.01)


def group_ends(pgid: int, limit: float = 60) -> bool:
    """Every process of the group ``pgid`` has ended (within a hang guard)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGKILL)
    return False


def ctrl_c(proc: subprocess.Popen) -> None:
    """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group."""
    os.killpg(proc.pid, signal.SIGINT)


@pytest.mark.parametrize("n", [None, 2])
def test_first_ctrl_c_checkpoints_and_exits_130(tmp_path, n):
    run = tmp_path / "run"
    shm_before = shm_files()
    proc, log = start(run, n)
    wait_until(lambda: ckpt.list_checkpoints(run), proc, log)  # training is under way
    ctrl_c(proc)
    code = proc.wait(timeout=120)
    text = log.read_text()
    assert code == 130, text
    stops = [ln for ln in text.splitlines() if ln.startswith("interrupted at step")]
    assert len(stops) == 1, text
    step = int(stops[0].split()[3].rstrip(":"))
    newest = ckpt.list_checkpoints(run)[0]
    assert f"checkpoint written to {newest}; continue with --resume auto" in stops[0]
    assert ckpt.read_file(newest).trainer.global_step == step
    assert text.count("interrupted: stopping with a checkpoint") == 1
    assert "Abort" not in text and "Traceback" not in text
    assert not (run / "model.h5").exists()
    assert left_behind(shm_before) == set()


@pytest.mark.parametrize("n", [None, 2])
def test_second_ctrl_c_ends_at_once(tmp_path, n):
    run = tmp_path / "run"
    # every rank hangs in step 5 (after checkpoint 4): a step boundary never comes
    proc, log = start(run, n, fault="where=forward,step=5,kind=hang")
    wait_until(lambda: 4 in [ckpt.read_file(p).trainer.global_step
                             for p in ckpt.list_checkpoints(run)], proc, log)
    ctrl_c(proc)
    wait_until(lambda: "Ctrl-C again to stop at once" in log.read_text(), proc, log)
    ctrl_c(proc)
    code = proc.wait(timeout=60)  # a hang guard: without the second Ctrl-C it would hang
    if n is None:
        assert code == -signal.SIGINT, log.read_text()  # died of the second SIGINT
    # under mpiexec the code is mpiexec's: MPICH's own second-Ctrl-C clean-up reports 0 at
    # times; what counts is that every rank is gone
    assert group_ends(proc.pid), log.read_text()
    assert [ckpt.read_file(p).trainer.global_step for p in ckpt.list_checkpoints(run)] == [4, 2]
