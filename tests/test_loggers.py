"""The CSV and TensorBoard loggers: the figures of metrics.jsonl, rank 0 writing in the run
directory, a resumed run appending under the same columns (and dropping what an
interrupted run logged after its checkpoint), TensorBoard events read back with
TensorBoard's own reader, and one-line errors for a bad logger or a missing package."""

from __future__ import annotations

import csv
import os

import pytest
from comfort_runs import STEPS_PER_EPOCH, events, one_error, train
from conftest import child_env, run_dptrain

from dptrain import checkpoint as ckpt

FIELDS = ("train_loss", "train_acc", "train_top5", "test_loss", "test_acc", "test_top5",
          "lr", "samples_per_sec", "epoch_time")


def _rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _interrupted_after_epoch_3(tmp_path, args):
    """A 3-epoch run whose checkpoint of epoch 3 was lost: it resumes from epoch 2 and
    trains epoch 3 again (as after a kill between the epoch's records and its checkpoint)."""
    run = tmp_path / "run"
    train(run, [*args, "--epochs", "3", "--checkpoint-every", "epoch"])
    ckpt.checkpoint_path(run, 3 * STEPS_PER_EPOCH).unlink()
    out = train(run, [*args, "--epochs", "4", "--resume", "auto"])
    assert f"step {2 * STEPS_PER_EPOCH}, saved by 1 rank(s)" in out
    return run


def test_csv_rows_are_the_epoch_records(tmp_path):
    run = tmp_path / "run"
    train(run, ["--epochs", "2", "--loggers", "csv"])
    rows, recs = _rows(run), events(run, "epoch")
    assert list(rows[0]) == ["epoch", "step", "lr", "train_loss", "train_acc", "train_top5",
                             "test_loss", "test_acc", "test_top5", "samples_per_sec",
                             "epoch_time", "skipped_steps"]
    assert len(rows) == len(recs) == 2
    for row, rec in zip(rows, recs, strict=True):
        assert int(row["epoch"]) == rec["epoch"] and int(row["step"]) == rec["step"]
        for k in FIELDS:  # floats round-trip exactly
            assert float(row[k]) == rec[k], k


def test_csv_resume_appends_and_drops_what_came_after_the_checkpoint(tmp_path):
    run = _interrupted_after_epoch_3(tmp_path, ["--loggers", "csv"])
    rows = _rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    # the epoch trained again replaces the first run's row: the file is the run's history
    third = [e for e in events(run, "epoch") if e["epoch"] == 3]
    assert len(third) == 2 and float(rows[2]["test_loss"]) == third[-1]["test_loss"]
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]


def test_csv_columns_stay_those_of_the_file(tmp_path):
    """A resumed run whose records have fewer figures keeps the file's header."""
    run = tmp_path / "run"
    train(run, ["--epochs", "1", "--loggers", "csv"])
    header = list(_rows(run)[0])
    train(run, ["--epochs", "2", "--loggers", "csv", "--resume", "auto"])
    rows = _rows(run)
    assert list(rows[1]) == header and [r["epoch"] for r in rows] == ["1", "2"]


def test_a_fresh_run_moves_an_earlier_runs_logs_aside(tmp_path):
    run = tmp_path / "run"
    train(run, ["--epochs", "1", "--loggers", "csv"])
    first = (run / "metrics.csv").read_text()
    out = train(run, ["--epochs", "1", "--loggers", "csv"])
    assert "held an earlier run" in out
    (kept,) = (run / "previous").glob("*/metrics.csv")
    assert kept.read_text() == first and len(_rows(run)) == 1


def _tensorboard_scalars(logdir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415

    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_the_epoch_figures(tmp_path):
    pytest.importorskip("tensorboardX")
    run = tmp_path / "run"
    train(run, ["--epochs", "2", "--loggers", "csv,tensorboard", "--log-every", "5"])
    scalars = _tensorboard_scalars(run / "tensorboard")
    recs = events(run, "epoch")
    for key, tag in (("train_loss", "train/loss"), ("test_loss", "test/loss"),
                     ("test_acc", "test/accuracy"), ("test_top5", "test/top5"),
                     ("lr", "lr")):
        got = scalars[tag]
        assert [s for s, _ in got] == [r["step"] for r in recs], tag
        assert [v for _, v in got] == pytest.approx([r[key] for r in recs], rel=1e-6), tag
    steps = [r["step"] for r in events(run, "step")]
    assert [s for s, _ in scalars["train_step/loss"]] == steps == [5, 10, 20, 25]


def test_tensorboard_resume_hides_what_came_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboardX")
    run = _interrupted_after_epoch_3(tmp_path, ["--loggers", "tensorboard"])
    assert len(list((run / "tensorboard").iterdir())) == 2  # one event file per run
    loss = _tensorboard_scalars(run / "tensorboard")["test/loss"]
    recs = events(run, "epoch")
    assert [s for s, _ in loss] == [e * STEPS_PER_EPOCH for e in (1, 2, 3, 4)]
    assert loss[2][1] == pytest.approx(recs[-2]["test_loss"], rel=1e-6)  # the second epoch 3


def test_a_missing_tensorboardx_is_one_line_before_training(tmp_path):
    shadow = tmp_path / "shadow" / "tensorboardX"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = child_env(PYTHONPATH=f"{tmp_path / 'shadow'}{os.pathsep}{child_env()['PYTHONPATH']}")
    proc = run_dptrain(["--run-dir", str(tmp_path / "run"), "--epochs", "1", "--loggers",
                        "tensorboard"], env=env, timeout=60)
    one_error(proc, "needs the tensorboardX package", "pip install 'dptrain[tensorboard]'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value,part", [
    ("csv,wandb", "'wandb' is not one of csv, tensorboard"),
    ("csv,csv", "names an entry twice"),
])
def test_bad_loggers_are_one_line(tmp_path, value, part):
    proc = run_dptrain(["--run-dir", str(tmp_path / "run"), "--epochs", "1", "--loggers",
                        value], timeout=60)
    one_error(proc, part)
    assert not (tmp_path / "run").exists()


@pytest.mark.mpi
def test_rank_0_writes_under_mpi(tmp_path):
    run = tmp_path / "run"
    train(run, ["--epochs", "1", "--loggers", "csv"], n=2, timeout=240)
    assert [r["epoch"] for r in _rows(run)] == ["1"]
