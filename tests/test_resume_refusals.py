"""A refused run changes nothing: every check of a resume (and of the output paths) runs
before the run directory is touched, on one rank and on two."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ckpt_runs import BASE, STEPS_PER_EPOCH, train
from conftest import run_dptrain
from refused import assert_one_error, assert_unchanged, snapshot

from dptrain import checkpoint as ckpt

ARGS = [*BASE, "--optimizer", "adam", "--lr", "0.01", "--checkpoint-every", "10",
        "--max-steps", "20"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("refusals") / "run"
    proc = train(run, ARGS)
    assert proc.returncode == 0, proc.stderr
    return run


REFUSALS = [
    (["--layers", json.dumps([{"type": "flatten"}, {"type": "dense", "units": 10}])],
     "does not match the model at layer 1"),
    (["--optimizer", "sgd"], "was written with optimizer adam, the config asks for sgd"),
    (["--lr", "0.02"], "was written with other options: lr 0.01 -> 0.02"),
    (["--batch-size", "40", "--seed", "3"],
     "was written with other options: batch_size 50 -> 40, seed 0 -> 3"),
]


@pytest.mark.parametrize("n", [None, 2])
@pytest.mark.parametrize("extra,fragment", REFUSALS)
def test_refused_resume_leaves_the_run_directory_as_it_was(finished, extra, fragment, n):
    before = snapshot(finished)
    proc = run_dptrain(["--run-dir", str(finished), *ARGS, "--max-steps", "30", *extra,
                        "--resume", "auto"], n=n, timeout=120)
    assert_one_error(proc, fragment)
    assert_unchanged(before, finished)


def test_truncated_resume_path_changes_nothing(finished, tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(ckpt.checkpoint_path(finished, 20).read_bytes()[:-100])
    before = snapshot(finished)
    proc = run_dptrain(["--run-dir", str(finished), *ARGS, "--resume", str(bad)], timeout=60)
    assert_one_error(proc, f"checkpoint {bad} is not a readable HDF5 file")
    assert_unchanged(before, finished)


def test_allowed_change_keeps_the_earlier_config(finished, tmp_path):
    run = tmp_path / "run"
    for p in finished.rglob("*"):
        if p.is_file():
            dest = run / p.relative_to(finished)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(p.read_bytes())
    old = json.loads((run / "config.json").read_text())
    proc = run_dptrain(["--run-dir", str(run), *ARGS, "--max-steps", str(STEPS_PER_EPOCH + 1),
                        "--lr", "0.02", "--allow-config-change", "--resume", "auto"],
                       timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "options changed: lr" in proc.stdout
    kept = run / "config.step-000000020.json"
    assert json.loads(kept.read_text()) == old and old["lr"] == 0.01
    assert json.loads((run / "config.json").read_text())["lr"] == 0.02
    assert ckpt.read_file(ckpt.list_checkpoints(run)[0]).trainer.global_step == \
        STEPS_PER_EPOCH + 1


def test_resume_with_the_same_options_keeps_one_config(finished, tmp_path):
    run = tmp_path / "same"
    proc = train(run, ARGS)
    assert proc.returncode == 0, proc.stderr
    ckpt.checkpoint_path(run, 20).unlink()  # as if it had stopped after step 10
    proc = run_dptrain(["--run-dir", str(run), *ARGS, "--resume", "auto"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "step 10" in proc.stdout
    assert sorted(p.name for p in run.glob("config*")) == ["config.json"]


@pytest.mark.parametrize("n", [None, 2])
def test_unwritable_output_paths_are_refused_before_training(tmp_path, n):
    run = tmp_path / "run"
    proc = run_dptrain(["--run-dir", str(run), *ARGS, "--timeline", "/nonexistent/t.json"],
                       n=n, timeout=60)
    assert_one_error(proc, "timeline /nonexistent/t.json: directory /nonexistent does not exist")
    assert not run.exists()
    proc = run_dptrain(["--run-dir", str(run), *ARGS, "--timeline", str(tmp_path)], timeout=60)
    assert_one_error(proc, "is a directory; give a file name")


def test_more_threads_than_cores_is_refused(tmp_path):
    import os

    cores = len(os.sched_getaffinity(0))
    proc = run_dptrain(["--run-dir", str(tmp_path / "run"), *ARGS, "--threads",
                        str(cores + 1)], timeout=60)
    assert_one_error(proc, f"threads {cores + 1} is more than the {cores} core(s)")
