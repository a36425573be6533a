"""Soak: 20 runs killed with SIGKILL at random points, each resumed with --resume auto.

Every run must finish with parameters bit-identical to one uninterrupted run on the same
world size, and each resume must start from the newest checkpoint written before the
kill. Most kills come from the fault hook at a random step and point of the step (seeded,
so a failure can be replayed); two come from outside while a checkpoint is being written;
four runs are under mpiexec -n 2 with a random rank killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_GUARD, child_env, run_dptrain
from pause_points import pause_env, reached

from dptrain import checkpoint as ckpt

LAYERS = [{"type": "flatten"}, {"type": "dense", "units": 16}, {"type": "relu"},
          {"type": "dense", "units": 10}]
ARGS = ["--layers", json.dumps(LAYERS), "--dtype", "float64", "--batch-size", "256",
        "--epochs", "2", "--checkpoint-every", "2", "--keep-last", "2", "--progress", "off",
        "--eval-batch-size", "512"]
STEPS = 12  # 6 steps per epoch on the 1,437 digits
POINTS = ("data", "forward", "backward", "allreduce", "optimizer", "checkpoint")
SEED = 20240607


@dataclass
class Trial:
    """One kill: where (a fault-hook point, or 'write' for a kill from outside mid-write)."""

    n: int | None
    where: str
    step: int
    rank: int = 0

    def expected_resume_step(self) -> int:
        """The newest checkpoint on disk when the kill lands (written every 2 steps)."""
        if self.where == "write":  # killed while writing checkpoint `step`
            return self.step - 2
        if self.where == "checkpoint":  # killed just before writing checkpoint `step`
            return self.step - 2
        return (self.step - 1) // 2 * 2  # killed inside step `step`


def plan() -> list[Trial]:
    rng = np.random.default_rng(SEED)
    trials = []
    for i in range(20):
        n = 2 if i % 5 == 4 else None
        if i in (3, 11):
            trials.append(Trial(None, "write", int(rng.integers(1, STEPS // 2 + 1)) * 2))
            continue
        where = str(rng.choice(POINTS))
        if where == "checkpoint":  # only rank 0 writes, at even steps
            trials.append(Trial(n, where, int(rng.integers(1, STEPS // 2 + 1)) * 2, 0))
        else:
            rank = int(rng.integers(0, n)) if n else 0
            trials.append(Trial(n, where, int(rng.integers(1, STEPS + 1)), rank))
    return trials


def params_of(run_dir: Path) -> np.ndarray:
    ck = ckpt.read_file(run_dir / "model.h5")
    return np.concatenate([ck.params[k].ravel() for k in sorted(ck.params)])


def kill_mid_write(run_dir: Path, step: int) -> int:
    """Start a run that pauses half-way through the write of checkpoint ``step``; SIGKILL
    it there, while the checkpoint is a half-written temporary file."""
    pauses = Path(f"{run_dir}.pauses")
    env = child_env(**pause_env(pauses, f"write@{step}"))
    proc = subprocess.Popen([sys.executable, "-m", "dptrain", *ARGS, "--run-dir", str(run_dir)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    tmp = ckpt.checkpoint_dir(run_dir) / f".ckpt-{step:09d}.h5.{proc.pid}.tmp"
    deadline = time.monotonic() + HANG_GUARD
    try:
        while not reached(pauses, "write", step):
            assert proc.poll() is None, "the run ended before the checkpoint write"
            assert time.monotonic() < deadline, "no checkpoint write seen"
            time.sleep(0.01)
        assert tmp.exists()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        code = proc.wait(timeout=HANG_GUARD)
    assert tmp.exists()  # the half file is still there for the resume to ignore
    return code


def run_trial(base: Path, i: int, t: Trial) -> tuple[Trial, np.ndarray, str]:
    run_dir = base / f"trial{i:02d}"
    if t.where == "write":
        code = kill_mid_write(run_dir, t.step)
    else:
        fault = f"rank={t.rank},where={t.where},step={t.step},kind=kill"
        proc = run_dptrain([*ARGS, "--run-dir", str(run_dir)], n=t.n, timeout=HANG_GUARD,
                           env=child_env(DPTRAIN_FAULT=fault))
        code = proc.returncode
    assert code != 0, (i, t)
    if t.n is None:
        assert code == -signal.SIGKILL, (i, t, code)
    assert not (run_dir / "model.h5").exists(), (i, t)
    resumed = run_dptrain([*ARGS, "--run-dir", str(run_dir), "--resume", "auto"], n=t.n,
                          timeout=HANG_GUARD)
    assert resumed.returncode == 0, (i, t, resumed.stdout + resumed.stderr)
    return t, params_of(run_dir), resumed.stdout


@pytest.mark.slow
@pytest.mark.mpi
def test_killed_and_resumed_runs_end_bit_identical(tmp_path):
    refs = {}
    for n in (None, 2):
        proc = run_dptrain([*ARGS, "--run-dir", str(tmp_path / f"ref{n}")], n=n, timeout=HANG_GUARD)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        refs[n] = params_of(tmp_path / f"ref{n}")
    assert not np.array_equal(refs[None], refs[2])  # bitwise equality is a sharp test

    trials = plan()
    assert len({(t.where, t.step) for t in trials}) > 10  # the plan really is spread out
    singles = [(i, t) for i, t in enumerate(trials) if t.n is None]
    with ThreadPoolExecutor(2) as pool:  # one-process runs two at a time (two cores)
        results = list(pool.map(lambda it: run_trial(tmp_path, *it), singles))
    results += [run_trial(tmp_path, i, t) for i, t in enumerate(trials) if t.n is not None]

    assert len(results) == 20
    for t, params, out in results:
        np.testing.assert_array_equal(params, refs[t.n], err_msg=str(t))
        step = t.expected_resume_step()
        if step == 0:
            assert "no checkpoint to resume from" in out, (t, out)
        else:
            assert f"ckpt-{step:09d}.h5 (epoch" in out, (t, out)
