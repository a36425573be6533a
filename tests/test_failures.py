"""Failures during training: failing and killed ranks, stalls, NaN/Inf, replica drift.

Faults are injected for real through DPTRAIN_FAULT (dptrain/faults.py): an exception,
a SIGKILL, a sleep or a corrupted array at a named point of a chosen step on a chosen
rank. Every job must end by itself (a generous hang guard catches one that does not), with
a non-zero code, one clear message, no process left behind, and checkpoints on disk that
still verify.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_GUARD, child_env, run_dptrain

from dptrain import checkpoint as ckpt
from dptrain.config import make_config
from dptrain.errors import StopTraining
from dptrain.training import Status, build_trainer
from dptrain.training.extensions import NonFinitePolicy

TINY = ["--model", "mlp", "--epochs", "1", "--batch-size", "50", "--progress", "off",
        "--dtype", "float64"]
DENSE_BN = [{"type": "flatten"}, {"type": "dense", "units": 16}, {"type": "batchnorm"},
            {"type": "relu"}, {"type": "dense", "units": 10}]


def leftover(marker: str, wait: float = 60.0) -> list[str]:
    """Live processes whose command line mentions ``marker``, once they are gone or after
    ``wait`` s (a hang guard: the processes of an ended job exit by themselves)."""
    deadline = time.monotonic() + wait
    while True:
        ps = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True,
                            timeout=30)
        alive = [line for line in ps.stdout.splitlines() if marker in line
                 and line.split()[1][0] != "Z" and int(line.split()[0]) != os.getpid()]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def run(run_dir: Path, *args: str, n: int | None = None, fault: str = "",
        ) -> subprocess.CompletedProcess[str]:
    """The finished job; a job that does not end by itself fails the test."""
    env = child_env(DPTRAIN_FAULT=fault) if fault else child_env()
    try:
        return run_dptrain([*TINY, "--run-dir", str(run_dir), *args], n=n, timeout=HANG_GUARD,
                           env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job did not end within {HANG_GUARD:g} s (args {args}, fault {fault!r})")


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "dptrain: " in line and "error" in line]


def steps_on_disk(run_dir: Path) -> list[int]:
    """Global steps of the checkpoints in ``run_dir``, each read and verified."""
    d = ckpt.checkpoint_dir(run_dir)
    assert not list(d.glob(".*.tmp")), "a temporary checkpoint file was left behind"
    return sorted(ckpt.read_file(p).trainer.global_step for p in ckpt.list_checkpoints(run_dir))


def final_params(run_dir: Path) -> np.ndarray:
    ck = ckpt.read_file(run_dir / "model.h5")
    return np.concatenate([ck.params[k].ravel() for k in sorted(ck.params)])


# -- a rank that raises -------------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.parametrize(("rank", "where", "step"), [
    (1, "data", 3), (1, "forward", 3), (1, "backward", 3), (0, "forward", 3),
    (0, "checkpoint", 4)])
def test_exception_on_one_rank_aborts_the_job(tmp_path, rank, where, step):
    run_dir = tmp_path / "run"
    proc = run(run_dir, "--checkpoint-every", "2", "--max-steps", "6", n=2,
                     fault=f"rank={rank},where={where},step={step},kind=raise")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert error_lines(proc.stderr) == [
        f"[rank {rank}] dptrain: internal error: RuntimeError: injected fault in {where} "
        f"of step {step} on rank {rank}"], out  # once, by the failing rank alone
    assert leftover(str(run_dir)) == []
    assert steps_on_disk(run_dir) == [2]  # the good checkpoint is intact, no half file
    assert not (run_dir / "model.h5").exists()


# -- a rank killed mid-step, then --resume auto -----------------------------------------
@pytest.mark.mpi
def test_sigkill_on_one_rank_ends_the_job_and_resume_finishes_it(tmp_path):
    args = ["--checkpoint-every", "2", "--max-steps", "8"]
    ref = run(tmp_path / "ref", *args, "--collective-timeout", "20", n=2)
    assert ref.returncode == 0, ref.stdout + ref.stderr  # the watchdog leaves healthy runs be

    run_dir = tmp_path / "run"
    proc = run(run_dir, *args, n=2, fault="rank=1,where=backward,step=5,kind=kill")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert leftover(str(run_dir)) == []
    assert steps_on_disk(run_dir) == [2, 4]
    assert not (run_dir / "model.h5").exists()

    resumed = run(run_dir, *args, "--resume", "auto", n=2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "ckpt-000000004.h5" in resumed.stdout
    np.testing.assert_array_equal(final_params(run_dir), final_params(tmp_path / "ref"))


# -- the collective watchdog -------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.parametrize(("fault", "message"), [
    ("rank=1,where=allreduce,step=3,kind=hang",
     "[rank 0] dptrain: error: gradient allreduce of step 3 did not complete within 3 s"),
    ("rank=0,where=checkpoint,step=2,kind=hang",
     "[rank 1] dptrain: error: checkpoint write of step 2 (rank 0 writing) did not complete "
     "within 3 s"),
], ids=["rank-1-stuck-before-allreduce", "rank-0-stuck-in-checkpoint-write"])
def test_collective_timeout_aborts_naming_step_and_operation(tmp_path, fault, message):
    run_dir = tmp_path / "run"
    proc = run(run_dir, "--checkpoint-every", "2", "--max-steps", "6",
                     "--collective-timeout", "3", n=2, fault=fault)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(message), out
    assert leftover(str(run_dir)) == []


# -- non-finite values -------------------------------------------------------------------
@pytest.mark.mpi
def test_nonfinite_gradient_stops_naming_the_step(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(run_dir, "--checkpoint-every", "2", "--max-steps", "6", n=2,
                  fault="rank=1,where=data,step=3,kind=nan")  # one bad sample on rank 1
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "dptrain: error: non-finite loss or gradient at step 3 (use --debug to find the "
        "layer, or --on-nonfinite skip)"]
    assert steps_on_disk(run_dir) == [2]
    assert not (run_dir / "model.h5").exists()


def test_debug_names_the_first_layer_that_overflows(tmp_path):
    """SGD with lr 1e10 in float32 overflows for real. Without --debug the guard must
    name the same step as --debug's per-layer check (a huge but finite gradient, whose
    sum of squares overflows, is not non-finite); --debug names the layer."""
    blowup = ["--dtype", "float32", "--optimizer", "sgd", "--momentum", "0", "--lr", "1e10"]
    plain = run(tmp_path / "a", *blowup)
    debug = run(tmp_path / "b", *blowup, "--debug")
    assert plain.returncode == debug.returncode == 1, plain.stderr + debug.stderr
    [p_line] = plain.stderr.strip().splitlines()
    [d_line] = debug.stderr.strip().splitlines()
    p_match = re.fullmatch(r"dptrain: error: non-finite loss or gradient at step (\d+) \(use "
                           r"--debug to find the layer, or --on-nonfinite skip\)", p_line)
    d_match = re.fullmatch(r"dptrain: error: non-finite values at step (\d+): layer "
                           r"03_dense produced non-finite values", d_line)
    assert p_match and d_match, (p_line, d_line)
    assert p_match.group(1) == d_match.group(1) != "1"


def test_guard_tells_huge_from_non_finite_gradients(tmp_path):
    cfg = make_config({"model": "mlp", "dtype": "float32", "run_dir": str(tmp_path / "run"),
                       "on_nonfinite": "stop"})
    trainer = build_trainer(cfg)
    grads = trainer.model.grads
    grads[:] = 1e20  # every element finite, the sum of squares is not
    assert trainer.step.gradient_finite()[0] is True
    grads[-1] = np.inf
    assert trainer.step.gradient_finite()[0] is False
    status = Status(step=1, epoch=0, epoch_end=False, last=False, stop_requested=False,
                    elapsed=0.0, skipped=True)
    with pytest.raises(StopTraining, match="non-finite loss or gradient at step 1 "):
        NonFinitePolicy("stop")(trainer, status)


@pytest.mark.mpi
def test_skip_leaves_the_parameters_as_they_were(tmp_path):
    """A NaN gradient from rank 1 at step 3: with `skip`, both ranks skip that update, so
    three steps end where two clean steps end, and metrics.jsonl counts the skip."""
    clean = run(tmp_path / "clean", "--max-steps", "2", n=2)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    run_dir = tmp_path / "run"
    proc = run(run_dir, "--max-steps", "3", "--on-nonfinite", "skip",
                  "--drift-check-every", "1", n=2, fault="rank=1,where=backward,step=3,kind=nan")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("non-finite gradient at step 3; update skipped") == 1
    np.testing.assert_array_equal(final_params(run_dir), final_params(tmp_path / "clean"))
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "skipped_step"] == [3]
    epoch = [e for e in events if e["event"] == "epoch"][-1]
    assert epoch["skipped_steps"] == 1 and np.isfinite(epoch["train_loss"])


def test_skip_keeps_batchnorm_statistics_clean(tmp_path):
    """A NaN batch at step 3 with `skip`: BatchNorm's running statistics are restored too,
    so the model (parameters and state) equals the one after two clean steps."""
    bn = ["--layers", json.dumps([{"type": "flatten"}, {"type": "dense", "units": 16},
                                  {"type": "batchnorm"}, {"type": "relu"},
                                  {"type": "dense", "units": 10}])]
    clean = run(tmp_path / "clean", *bn, "--max-steps", "2")
    assert clean.returncode == 0, clean.stderr
    proc = run(tmp_path / "run", *bn, "--max-steps", "3", "--on-nonfinite", "skip",
                  fault="where=data,step=3,kind=nan")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a = ckpt.read_file(tmp_path / "run" / "model.h5")
    b = ckpt.read_file(tmp_path / "clean" / "model.h5")
    for key in b.state:
        assert np.isfinite(a.state[key]).all(), key
        np.testing.assert_array_equal(a.state[key], b.state[key])
    np.testing.assert_array_equal(final_params(tmp_path / "run"),
                                  final_params(tmp_path / "clean"))


def test_too_many_consecutive_skips_stop(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(run_dir, "--on-nonfinite", "skip", "--max-skips", "3",
                  fault="where=data,step=2-100,kind=nan")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "dptrain: error: 3 consecutive non-finite steps (up to step 4); stopping"]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["consecutive"]) for e in events if e["event"] == "skipped_step"] \
        == [(2, 1), (3, 2), (4, 3)]


# -- replica drift -------------------------------------------------------------------------
@pytest.mark.mpi
def test_drift_on_one_rank_is_found_and_named(tmp_path):
    # one replica per rank, as across nodes (on one node the ranks share one copy)
    proc = run(tmp_path / "run", "--drift-check-every", "2", "--max-steps", "8",
                  "--no-shared-memory-sync", n=3,
                  fault="rank=1,where=optimizer,step=3,kind=drift")  # one ulp, one rank
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "dptrain: error: replica drift at drift check (step 4): parameters differ between "
        "ranks [0, 2]; ranks [1]"]


@pytest.mark.mpi
def test_drift_check_ignores_per_rank_batchnorm_statistics(tmp_path):
    """BatchNorm(sync=false) keeps per-rank running statistics until the epoch's end:
    a mid-epoch check compares parameters only, so it must not cry drift."""
    proc = run(tmp_path / "run", "--layers", json.dumps(DENSE_BN), "--drift-check-every",
                  "2", "--max-steps", "6", n=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_updates_undone_one_after_another_count_as_consecutive_skips(tmp_path, capsys):
    """A learning rate so high that every update makes the parameters non-finite: each
    shows only in the next step's gradient, which undoes it. With `skip` the undone steps
    count as skipped (they do not end a run of skips), so --max-skips stops the run at
    step 4, and the parameters are still the initial ones."""
    cfg = make_config({"layers": [{"type": "flatten"}, {"type": "dense", "units": 10}],
                       "dtype": "float32", "optimizer": "sgd", "lr": 1e300,
                       "on_nonfinite": "skip", "max_skips": 4, "checkpoint_every": "off",
                       "progress": "off", "run_dir": str(tmp_path / "run")})
    trainer = build_trainer(cfg)
    initial = trainer.model.params.copy()
    with pytest.raises(StopTraining, match=r"^4 consecutive non-finite steps \(up to step 4\)"):
        trainer.run()
    out = capsys.readouterr().out
    assert [ln for ln in out.splitlines() if ln.startswith("warning:")] == [
        "warning: the update of step 1 made parameters non-finite; it is undone and step 2 "
        "skipped (2 in a row)",
        "warning: the update of step 3 made parameters non-finite; it is undone and step 4 "
        "skipped (4 in a row)"]
    np.testing.assert_array_equal(trainer.model.params, initial)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [(e["step"], e["consecutive"], e["skipped_steps"]) for e in events
            if e["event"] == "skipped_step"] == [(2, 2, 2), (4, 4, 4)]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_update_that_breaks_the_parameters_is_named_and_never_written(tmp_path):
    """The gradient of step 1 is finite but its update is not: the guard finds it in step
    2's gradient and names step 1's update; a checkpoint due at step 1 finds it first and
    is not written."""
    for every, where in (("off", ""), ("1", "; no checkpoint was written")):
        run_dir = tmp_path / f"every-{every}"
        cfg = make_config({"layers": [{"type": "flatten"}, {"type": "dense", "units": 10}],
                           "dtype": "float32", "optimizer": "sgd", "lr": 1e300,
                           "checkpoint_every": every, "progress": "off",
                           "run_dir": str(run_dir)})
        with pytest.raises(StopTraining) as stop:
            build_trainer(cfg).run()
        assert str(stop.value) == ("non-finite parameters or optimizer state after the update "
                                   "of step 1 (lower the learning rate, clip with --clip-norm, "
                                   "or use --dtype float64)" + where)
        assert not (run_dir / "model.h5").exists()
        assert not list(run_dir.glob("checkpoints/*.h5"))
