"""Shared by the checkpoint tests: run configurations, launching, waiting, comparing.

The model is small but has everything a resume must carry: BatchNorm (synchronised, so
that training is world-size invariant) with running statistics, dropout, and an optimizer
with state. The digits give 29 steps of 50 samples per epoch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from conftest import HANG_GUARD, child_env, mpi_cmd, run_dptrain
from pause_points import pause_env, reached

from dptrain import checkpoint as ckpt

LAYERS = [{"type": "flatten"}, {"type": "dense", "units": 24},
          {"type": "batchnorm", "sync": True}, {"type": "relu"},
          {"type": "dropout", "rate": 0.2}, {"type": "dense", "units": 10}]
STEPS_PER_EPOCH = 29
BASE = ["--layers", json.dumps(LAYERS), "--dtype", "float64", "--epochs", "2",
        "--batch-size", "50", "--progress", "off"]
ADAM = [*BASE, "--optimizer", "adam", "--lr", "0.01", "--lr-schedule", "cosine",
        "--warmup-steps", "5"]
SGD = [*BASE, "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--nesterov",
       "--weight-decay", "1e-4", "--lr-schedule", "step", "--lr-step-size", "20",
       "--lr-gamma", "0.5"]


def train(run_dir: Path, args: list[str], n: int | None = None, timeout: float = HANG_GUARD,
          fault: str = "") -> subprocess.CompletedProcess[str]:
    """One training run to its end (``fault``: a DPTRAIN_FAULT spec); the finished process."""
    env = child_env(DPTRAIN_FAULT=fault) if fault else child_env()
    return run_dptrain(["--run-dir", str(run_dir), *args], n=n, timeout=timeout, env=env)


def pause_dir(run_dir: Path) -> Path:
    """Where the runs of ``run_dir`` put their pause markers."""
    return Path(f"{run_dir}.pauses")


def start(run_dir: Path, args: list[str], n: int | None = None, pause: tuple[str, ...] = (),
          fault: str = "") -> subprocess.Popen[str]:
    """A training run in the background that pauses at the points ``pause`` (e.g.
    ``("write@7",)``); its output goes to RUN_DIR.log."""
    extra = pause_env(pause_dir(run_dir), *pause) if pause else {}
    if fault:
        extra["DPTRAIN_FAULT"] = fault
    env = child_env(**extra)
    base = ["-m", "dptrain", "--run-dir", str(run_dir), *args]
    cmd = mpi_cmd(n, base) if n else [sys.executable, *base]
    log = open(f"{run_dir}.log", "w")  # noqa: SIM115  (handed to the child)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                            stdin=subprocess.DEVNULL)


def output(run_dir: Path) -> str:
    return Path(f"{run_dir}.log").read_text()


def finish(proc: subprocess.Popen[str], run_dir: Path, timeout: float = HANG_GUARD) -> str:
    """Wait for a background run; its exit code and output."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"run did not end within {timeout} s\n{output(run_dir)}") from None
    return output(run_dir)


def wait_for(what: Callable[[], object], proc: subprocess.Popen[str], run_dir: Path,
             timeout: float = HANG_GUARD) -> object:
    """Poll ``what()`` until it is truthy; fail if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"run ended (code {proc.returncode}) before the awaited "
                                 f"moment\n{output(run_dir)}")
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    raise AssertionError(f"timed out after {timeout:g} s waiting\n{output(run_dir)}")


def wait_paused(proc: subprocess.Popen[str], run_dir: Path, point: str, step: int,
                count: int = 1) -> list[Path]:
    """Wait until ``count`` processes of the run are paused at ``point`` of ``step``;
    their markers (for ``pause_points.release``)."""
    return wait_for(lambda: reached(pause_dir(run_dir), point, step, count), proc, run_dir)


def temp_files(run_dir: Path, step: int | None = None, pid: int | None = None) -> list[Path]:
    """Checkpoint temp files being written (of checkpoint ``step`` or any, by ``pid`` or any)."""
    d = ckpt.checkpoint_dir(run_dir)
    pattern = (f".ckpt-{step:09d}.h5" if step is not None else ".*") + f".{pid or '*'}.tmp"
    return sorted(d.glob(pattern)) if d.is_dir() else []


def steps_on_disk(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:14]) for p in ckpt.list_checkpoints(run_dir))


def arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a checkpoint or model file, by HDF5 path, read and verified."""
    ck = ckpt.read_file(path)
    out = {f"params/{a}/{b}": v for (a, b), v in ck.params.items()}
    out.update({f"state/{a}/{b}": v for (a, b), v in ck.state.items()})
    for slot, group in ck.optimizer_state.items():
        out.update({f"optimizer/{slot}/{a}/{b}": v for (a, b), v in group.items()})
    return out


def assert_identical(a: Path, b: Path) -> None:
    """Bit-identical parameters, model state (and optimizer state for checkpoints)."""
    x, y = arrays(a), arrays(b)
    assert x.keys() == y.keys()
    differ = [k for k in x if not np.array_equal(x[k], y[k])]
    assert not differ, f"{a} and {b} differ in {differ}"


def assert_close(a: Path, b: Path, rtol: float = 1e-10) -> None:
    """Equal within ``rtol`` relative to the largest magnitude in the file (a bias before
    BatchNorm gets no gradient and holds nothing but rounding noise of its own scale)."""
    x, y = arrays(a), arrays(b)
    assert x.keys() == y.keys()
    scale = max(float(np.abs(v).max(initial=0.0)) for v in x.values())
    assert scale > 0.1
    for k in x:
        err = float(np.abs(x[k] - y[k]).max(initial=0.0)) / scale
        assert err <= rtol, f"{k}: relative difference {err:.3g} > {rtol}"


def rank_pid(launcher: int, rank: int, timeout: float = HANG_GUARD) -> int:
    """The pid of MPI rank ``rank`` among the descendants of the mpiexec ``launcher``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parent = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        for pid in parent:
            p, seen = pid, 0
            while p in parent and p != launcher and seen < 50:
                p, seen = parent[p], seen + 1
            if p != launcher or pid == launcher:
                continue
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"dptrain" in cmd and f"PMI_RANK={rank}".encode() in env:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} of mpiexec {launcher} not found")
