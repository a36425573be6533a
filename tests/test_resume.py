"""Resuming through the command line: bit-exact on the same world size, within 1e-10 on
another, after SIGTERM, --max-steps or SIGKILL at any moment; retention, best, schedules,
failed writes, eval from a checkpoint alone, and a finished run that is resumed."""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from ckpt_runs import (
    ADAM,
    LAYERS,
    SGD,
    STEPS_PER_EPOCH,
    assert_close,
    assert_identical,
    finish,
    output,
    start,
    steps_on_disk,
    temp_files,
    train,
    wait_paused,
)
from conftest import HANG_GUARD, ROOT, child_env, run_dptrain
from pause_points import info, release

from dptrain import checkpoint as ckpt

STEPS = 2 * STEPS_PER_EPOCH


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def one_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("dptrain: error: "), proc.stderr
    assert fragment in errors[0], errors[0]


def epochs_logged(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "epoch"]


@pytest.fixture(scope="module")
def adam_ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Adam, cosine schedule with warmup, dropout, BatchNorm: one uninterrupted run."""
    run = tmp_path_factory.mktemp("adam") / "ref"
    ok(train(run, [*ADAM, "--checkpoint-every", "7", "--keep-last", "2"]))
    return run


@pytest.fixture(scope="module")
def sgd_ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SGD with Nesterov momentum, weight decay, step schedule: one uninterrupted run."""
    run = tmp_path_factory.mktemp("sgd") / "ref"
    ok(train(run, [*SGD, "--checkpoint-every", "7"]))
    return run


@pytest.fixture(scope="module")
def sgd_stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SGD run stopped mid-epoch by --max-steps 20."""
    run = tmp_path_factory.mktemp("sgd") / "stopped"
    ok(train(run, [*SGD, "--checkpoint-every", "7", "--max-steps", "20"]))
    assert steps_on_disk(run) == [7, 14, 20]
    t = ckpt.read_file(ckpt.checkpoint_path(run, 20)).trainer
    assert (t.epoch, t.epoch_pos, t.global_step, t.samples_seen) == (0, 1000, 20, 1000)
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- exact resume ---------------------------------------------------------------------------
def test_sigterm_mid_epoch_then_resume_is_bit_exact(adam_ref: Path, tmp_path: Path) -> None:
    run = tmp_path / "b"
    proc = start(run, [*ADAM, "--checkpoint-every", "7", "--keep-last", "2"],
                 pause=("write@7",))
    paused = wait_paused(proc, run, "write", 7)  # inside the write of checkpoint 7
    assert temp_files(run, 7)
    proc.send_signal(signal.SIGTERM)
    release(paused)
    text = finish(proc, run)
    assert proc.returncode == 75, text
    assert "stopping on SIGTERM at step 8: checkpoint" in text and "--resume auto" in text
    assert steps_on_disk(run) == [7, 8] and not temp_files(run)
    t = ckpt.read_file(ckpt.checkpoint_path(run, 8)).trainer
    assert (t.epoch, t.epoch_pos, t.global_step) == (0, 400, 8)
    assert not (run / "model.h5").exists()

    text = ok(train(run, [*ADAM, "--checkpoint-every", "7", "--keep-last", "2",
                          "--resume", "auto"]))
    assert f"resumed from {ckpt.checkpoint_path(run, 8)} (epoch 1, step 8" in text
    assert_identical(adam_ref / "model.h5", run / "model.h5")
    a, b = (ckpt.read_file(ckpt.checkpoint_path(r, STEPS)) for r in (adam_ref, run))
    assert_identical(ckpt.checkpoint_path(adam_ref, STEPS), ckpt.checkpoint_path(run, STEPS))
    assert a.trainer == b.trainer and a.optimizer_step == b.optimizer_step == STEPS
    assert not np.isnan(a.trainer.best_metric)
    assert [e["test_acc"] for e in epochs_logged(adam_ref)] == \
        [e["test_acc"] for e in epochs_logged(run)]


def test_max_steps_stop_then_resume_is_bit_exact(sgd_ref: Path, sgd_stopped: Path,
                                                 tmp_path: Path) -> None:
    run = copy_run(sgd_stopped, tmp_path / "b")
    text = ok(train(run, [*SGD, "--checkpoint-every", "7", "--resume", "auto"]))
    assert "resumed from" in text and "ckpt-000000020.h5 (epoch 1, step 20" in text
    assert_identical(sgd_ref / "model.h5", run / "model.h5")
    assert_identical(ckpt.checkpoint_path(sgd_ref, STEPS), ckpt.checkpoint_path(run, STEPS))
    a, b = (ckpt.read_file(ckpt.checkpoint_path(r, STEPS)) for r in (sgd_ref, run))
    assert a.trainer == b.trainer and sorted(b.optimizer_state) == ["momentum"]


@pytest.mark.mpi
def test_resume_on_three_ranks_from_one(sgd_ref: Path, sgd_stopped: Path,
                                        tmp_path: Path) -> None:
    run = copy_run(sgd_stopped, tmp_path / "b")
    text = ok(train(run, [*SGD, "--checkpoint-every", "7", "--resume", "auto"], n=3))
    assert "step 20, saved by 1 rank(s)" in text
    assert ckpt.read_file(run / "model.h5").meta["world_size"] == 3
    assert_close(sgd_ref / "model.h5", run / "model.h5", 1e-10)


@pytest.mark.mpi
def test_resume_on_two_ranks_from_four(sgd_ref: Path, tmp_path: Path) -> None:
    run = tmp_path / "b"
    ok(train(run, [*SGD, "--checkpoint-every", "11", "--max-steps", "40"], n=4))
    assert steps_on_disk(run) == [22, 33, 40]
    assert ckpt.read_file(ckpt.checkpoint_path(run, 40)).meta["world_size"] == 4
    text = ok(train(run, [*SGD, "--checkpoint-every", "11", "--resume", "auto"], n=2))
    assert "step 40, saved by 4 rank(s)" in text
    assert_close(sgd_ref / "model.h5", run / "model.h5", 1e-10)


# -- SIGKILL at many moments ----------------------------------------------------------------
def test_sigkill_at_many_moments_always_resumes(adam_ref: Path, tmp_path: Path) -> None:
    """Killed inside a write, right after one, during start-up and mid-step; then the newest
    file is damaged. Each restart takes the newest checkpoint that verifies, and the run
    ends bit-identical to the uninterrupted one."""
    run = tmp_path / "b"
    args = [*ADAM, "--checkpoint-every", "7", "--keep-last", "2", "--resume", "auto"]

    proc = start(run, args, pause=("write@7",))  # 1: inside the first write
    wait_paused(proc, run, "write", 7)
    proc.kill()
    proc.wait()
    assert steps_on_disk(run) == [] and len(temp_files(run)) == len(temp_files(run, 7)) == 1
    assert (run / ".lock").exists()  # left behind by the killed process

    proc = start(run, args, pause=("checkpoint@14",))  # 2: the moment checkpoint 14 is complete
    wait_paused(proc, run, "checkpoint", 14)
    proc.kill()
    proc.wait()
    assert "no checkpoint to resume from" in output(run)
    assert steps_on_disk(run) == [7, 14] and not temp_files(run)  # the stale temp file went

    proc = start(run, args, pause=("write@21",))  # 3: inside a later write
    wait_paused(proc, run, "write", 21)
    proc.kill()
    proc.wait()
    assert f"resumed from {ckpt.checkpoint_path(run, 14)}" in output(run)
    assert steps_on_disk(run) == [7, 14] and len(temp_files(run, 21)) == 1

    proc = start(run, args, pause=("start",))  # 4: resumed, before its first step
    [paused] = wait_paused(proc, run, "start", 14)
    assert info(paused)["pid"] == proc.pid
    proc.kill()
    proc.wait()
    assert f"resumed from {ckpt.checkpoint_path(run, 14)}" in output(run)
    assert steps_on_disk(run) == [7, 14]

    # 5: mid-step (in backward of step 24), after the resume and checkpoint 21
    proc = start(run, args, fault="where=backward,step=24,kind=kill")
    text = finish(proc, run)
    assert proc.returncode == -signal.SIGKILL, text
    assert f"resumed from {ckpt.checkpoint_path(run, 14)}" in text
    assert steps_on_disk(run) == [14, 21]

    on_disk = steps_on_disk(run)
    for step in on_disk:
        ckpt.read_file(ckpt.checkpoint_path(run, step))  # everything listed verifies
    newest, older = on_disk[-1], on_disk[-2]
    torn = ckpt.checkpoint_path(run, newest)
    torn.write_bytes(torn.read_bytes()[:5000])  # e.g. a copy that stopped half-way
    text = ok(train(run, args))
    assert f"warning: skipping {torn.name}: checkpoint {torn} is not a readable HDF5 file " \
           "(truncated or corrupt?)" in text
    assert f"resumed from {ckpt.checkpoint_path(run, older)}" in text
    assert not temp_files(run) and not (run / ".lock").exists()
    assert_identical(adam_ref / "model.h5", run / "model.h5")


# -- retention, best, schedules ---------------------------------------------------------------
def test_keeps_the_last_k_plus_best(adam_ref: Path) -> None:
    names = sorted(p.name for p in ckpt.checkpoint_dir(adam_ref).iterdir())
    assert names == ["best.h5", "ckpt-000000056.h5", "ckpt-000000058.h5"]
    accs = [e["test_acc"] for e in epochs_logged(adam_ref)]
    best = ckpt.read_file(ckpt.checkpoint_dir(adam_ref) / ckpt.BEST_NAME)
    assert len(accs) == 2 and best.trainer.best_metric == max(accs)
    assert best.trainer.epoch == 1 + int(np.argmax(accs)) and best.trainer.epoch_pos == 0


def test_time_schedule(tmp_path: Path) -> None:
    run = tmp_path / "fast"  # every step: any step takes longer than a nanosecond
    ok(train(run, [*ADAM, "--checkpoint-every", "0.000000001s", "--keep-last", "20",
                   "--max-steps", "6"]))
    assert steps_on_disk(run) == [1, 2, 3, 4, 5, 6]
    run = tmp_path / "slow"
    ok(train(run, [*ADAM, "--checkpoint-every", "10m", "--max-steps", "6"]))
    assert steps_on_disk(run) == [6]  # only the final one


# -- finished runs and eval ----------------------------------------------------------------
def test_resuming_a_finished_run_trains_nothing(adam_ref: Path, tmp_path: Path) -> None:
    run = copy_run(adam_ref, tmp_path / "again")
    before = {p.name: p.read_bytes() for p in ckpt.checkpoint_dir(run).iterdir()}
    text = ok(train(run, [*ADAM, "--checkpoint-every", "7", "--keep-last", "2",
                          "--resume", "auto"]))
    assert f"nothing to train: the run is complete (epoch 2/2, step {STEPS})" in text
    assert "epoch 1/2" not in text and "epoch 2/2  train" not in text
    assert {p.name: p.read_bytes() for p in ckpt.checkpoint_dir(run).iterdir()} == before
    assert_identical(adam_ref / "model.h5", run / "model.h5")


def test_eval_rebuilds_the_model_from_the_file_alone(adam_ref: Path, tmp_path: Path) -> None:
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    last = epochs_logged(adam_ref)[-1]
    for f in (adam_ref / "model.h5", ckpt.checkpoint_path(adam_ref, STEPS)):
        proc = run_dptrain(["eval", "--checkpoint", str(f)], cwd=empty)
        m = re.search(r"test loss (\S+) accuracy (\S+) \((\d+) samples, digits\)", ok(proc))
        assert m, proc.stdout
        assert float(m.group(2)) == pytest.approx(last["test_acc"], abs=1e-4)
        assert float(m.group(1)) == pytest.approx(last["test_loss"], abs=1e-4)
    assert list(empty.iterdir()) == []


# -- bad resumes and failed writes ---------------------------------------------------------
def test_resume_path_with_other_architecture_or_bad_file(adam_ref: Path,
                                                         tmp_path: Path) -> None:
    path = ckpt.checkpoint_path(adam_ref, STEPS)
    other = [*ADAM, "--layers", '[{"type": "flatten"}, {"type": "dense", "units": 10}]']
    one_error(train(tmp_path / "r1", [*other, "--resume", str(path)]),
              f"checkpoint {path} does not match the model at layer 1: ")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(path.read_bytes()[:-100])
    one_error(train(tmp_path / "r2", [*ADAM, "--resume", str(bad)]),
              f"checkpoint {bad} is not a readable HDF5 file (truncated or corrupt?)")
    assert not (tmp_path / "r2" / "checkpoints").exists()
    synthetic = ["--dataset", "synthetic", "--synthetic-shape", "8,8,1",
                 "--synthetic-samples", "600"]
    one_error(train(tmp_path / "r3", [*ADAM, *synthetic, "--resume", str(path)]),
              f"checkpoint {path} was taken over a training set of 1437 samples, this one "
              "has 480")


def test_resume_checks_the_stored_sample_order(adam_ref: Path, tmp_path: Path) -> None:
    """The sampler's state in the file is compared with what this numpy draws."""
    run = copy_run(adam_ref, tmp_path / "order")
    path = ckpt.checkpoint_path(run, 56)
    with h5py.File(path, "r+") as f:
        order = f["rng/epoch_order"]
        assert f["rng"].attrs["epoch"] == 1 and f["rng"].attrs["epoch_pos"] == 27 * 50
        assert np.array_equal(order[()], np.random.default_rng([0, 1]).permutation(1437))
        order[...] = order[()][::-1]
    ckpt.seal(path)
    text = ok(train(run, [*ADAM, "--resume", str(path)]))
    assert "warning: this numpy (" in text and ") draws another sample order for epoch 2 " \
           f"than the one that wrote {path}" in text


def _drop_dac_override() -> None:
    """preexec: as root, give up the capability that ignores directory permissions."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP: gone after exec


def _small_files() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))  # a "full disk"


def _resume_limited(run: Path, preexec: object, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dptrain", "--run-dir", str(run), *ADAM,
           "--checkpoint-every", "7", "--keep-last", "2", "--epochs", "3", "--resume", "auto",
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD,
                          env=child_env(), preexec_fn=preexec, cwd=ROOT,
                          stdin=subprocess.DEVNULL)


def test_full_disk_stops_with_exit_2_and_keeps_checkpoints(adam_ref: Path,
                                                           tmp_path: Path) -> None:
    run = copy_run(adam_ref, tmp_path / "full")
    d = ckpt.checkpoint_dir(run)
    assert min(p.stat().st_size for p in d.iterdir()) > 40_000
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    proc = _resume_limited(run, _small_files)
    one_error(proc, f"checkpoint write failed: cannot write {ckpt.checkpoint_path(run, 63)}: "
                    "File too large (previous checkpoints are intact)")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # no temp file either


def test_unwritable_checkpoint_dir(adam_ref: Path, tmp_path: Path) -> None:
    run = copy_run(adam_ref, tmp_path / "ro")
    d = ckpt.checkpoint_dir(run)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    d.chmod(0o555)
    try:
        probe = subprocess.run([sys.executable, "-c", f"open({str(d / 'p')!r}, 'w')"],
                               preexec_fn=_drop_dac_override, capture_output=True, timeout=30)
        if probe.returncode == 0:
            pytest.skip("cannot make a directory unwritable here")
        proc = _resume_limited(run, _drop_dac_override)
        one_error(proc, f"checkpoint write failed: cannot write {ckpt.checkpoint_path(run, 63)}"
                        ": Permission denied (previous checkpoints are intact)")
        assert epochs_logged(run)[-1]["epoch"] == 2  # stopped in epoch 3, at step 63
        proc = _resume_limited(run, _drop_dac_override, "--continue-on-checkpoint-error")
        assert proc.returncode == 2  # the final checkpoint cannot be skipped
        assert "training goes on (continue_on_checkpoint_error)" in proc.stdout
        assert epochs_logged(run)[-1]["epoch"] == 3  # ... but training went on to the end
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    finally:
        d.chmod(0o755)


def test_skipped_steps_and_optimizer_step_count_survive_a_resume(tmp_path: Path) -> None:
    """A NaN batch at step 3 is skipped: Adam's step count (its bias correction) lags the
    global step by one, and both must come back from the file for an exact resume.
    (No BatchNorm here: the skipped step's NaN batch still reaches its running statistics.)"""
    layers = [s for s in LAYERS if s["type"] != "batchnorm"]
    args = [*ADAM, "--layers", json.dumps(layers), "--lr-schedule", "constant", "--epochs",
            "1", "--on-nonfinite", "skip", "--checkpoint-every", "5"]
    nan = "where=data,kind=nan,step=3"
    ref, run = tmp_path / "ref", tmp_path / "b"
    assert "non-finite gradient at step 3; update skipped" in ok(train(ref, args, fault=nan))
    ok(train(run, [*args, "--max-steps", "12"], fault=nan))
    stopped = ckpt.read_file(ckpt.checkpoint_path(run, 12))
    assert (stopped.trainer.skipped_steps, stopped.optimizer_step) == (1, 11)
    ok(train(run, [*args, "--resume", "auto"]))
    a, b = (ckpt.read_file(ckpt.checkpoint_path(r, STEPS_PER_EPOCH)) for r in (ref, run))
    assert a.trainer == b.trainer and a.trainer.skipped_steps == 1
    assert a.optimizer_step == b.optimizer_step == STEPS_PER_EPOCH - 1
    assert_identical(ref / "model.h5", run / "model.h5")
