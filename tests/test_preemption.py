"""Preemption under ``mpiexec -n 2``: SIGTERM or SIGUSR1 to one rank (not only rank 0)
stops every rank at the next step boundary with a checkpoint and exit code 75; a second
signal during that save does no harm; the resumed run ends bit-identical to one that was
never interrupted."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from ckpt_runs import (
    ADAM,
    assert_identical,
    finish,
    rank_pid,
    start,
    steps_on_disk,
    temp_files,
    train,
    wait_paused,
)
from pause_points import release

from dptrain import checkpoint as ckpt
from dptrain.errors import EXIT_PREEMPTED

pytestmark = pytest.mark.mpi
ARGS = [*ADAM, "--checkpoint-every", "7"]


@pytest.fixture(scope="module")
def ref2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run on two ranks, never interrupted."""
    run = tmp_path_factory.mktemp("pre") / "ref"
    proc = train(run, ARGS, n=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run


def resume_and_compare(run: Path, ref: Path) -> None:
    proc = train(run, [*ARGS, "--resume", "auto"], n=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resumed from {ckpt.checkpoint_path(run, 8)} (epoch 1, step 8" in proc.stdout
    assert_identical(ref / "model.h5", run / "model.h5")
    assert_identical(ckpt.checkpoint_path(ref, 58), ckpt.checkpoint_path(run, 58))


def test_sigterm_to_rank_1(ref2: Path, tmp_path: Path) -> None:
    run = tmp_path / "b"
    proc = start(run, ARGS, n=2, pause=("write@7",))
    r1 = rank_pid(proc.pid, 1)
    paused = wait_paused(proc, run, "write", 7)  # rank 0 writes, rank 1 waits
    assert temp_files(run, 7)
    os.kill(r1, signal.SIGTERM)  # pending on rank 1 before either rank goes on
    release(paused)
    text = finish(proc, run)  # a job that does not stop at once would reach step 58
    assert proc.returncode == EXIT_PREEMPTED, text
    assert "stopping on a signal on another rank at step 8: checkpoint" in text
    assert steps_on_disk(run) == [7, 8] and not temp_files(run)
    assert ckpt.read_file(ckpt.checkpoint_path(run, 8)).trainer.epoch_pos == 400
    assert not (run / "model.h5").exists() and not (run / ".lock").exists()
    resume_and_compare(run, ref2)


def test_sigusr1_to_rank_0_and_a_second_signal_during_the_save(ref2: Path,
                                                                tmp_path: Path) -> None:
    run = tmp_path / "b"
    proc = start(run, ARGS, n=2, pause=("write@7-8",))
    r0, r1 = rank_pid(proc.pid, 0), rank_pid(proc.pid, 1)
    paused = wait_paused(proc, run, "write", 7)
    os.kill(r0, signal.SIGUSR1)
    release(paused)
    paused = wait_paused(proc, run, "write", 8)  # the preemption checkpoint is half written
    assert temp_files(run, 8)
    for pid, sig in ((r0, signal.SIGTERM), (r1, signal.SIGTERM), (r0, signal.SIGUSR1)):
        os.kill(pid, sig)
    release(paused)
    text = finish(proc, run)
    assert proc.returncode == EXIT_PREEMPTED, text
    assert "stopping on SIGUSR1 at step 8: checkpoint" in text
    assert steps_on_disk(run) == [7, 8] and not temp_files(run)
    resume_and_compare(run, ref2)
