"""Early stopping and the best epoch: the rule, the same stopping epoch on every rank under
mpiexec (no hang), best.h5 and restore_best following early_stop_metric, a resume part-way
through the patience stopping where an uninterrupted run stops, a stopped run staying
stopped, and damaged counters refused before the run directory changes."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
from ckpt_runs import arrays, assert_identical
from comfort_runs import BASE, STEPS_PER_EPOCH, epoch_lines, events, one_error, train
from conftest import run_dptrain

from dptrain import checkpoint as ckpt
from dptrain.training.monitor import improves

# test loss falls by less than 1 in the two epochs after the first: epoch 1 stays the best, and
# with patience 2 the run stops after epoch 3 (a wait of 1 after epoch 2)
STOP_AT_3 = ["--epochs", "8", "--early-stop-patience", "2", "--early-stop-metric",
             "test_loss", "--early-stop-min-delta", "1.0"]


@pytest.mark.parametrize("value,best,metric,delta,want", [
    (0.5, math.nan, "test_loss", 0.0, True),    # the first figure is the best
    (0.5, 0.6, "test_loss", 0.0, True),
    (0.6, 0.6, "test_loss", 0.0, False),        # equal is no improvement
    (0.55, 0.6, "test_loss", 0.1, False),       # better, but by less than min_delta
    (0.5, 0.75, "test_loss", 0.25, True),       # by exactly min_delta: improvement
    (0.9, 0.8, "test_acc", 0.0, True),
    (0.7, 0.8, "test_acc", 0.0, False),
    (math.nan, 0.8, "test_acc", 0.0, False),    # NaN never improves
    (math.inf, math.nan, "test_loss", 0.0, False),
])
def test_what_counts_as_an_improvement(value, best, metric, delta, want):
    assert improves(value, best, metric, delta) is want


def _losses(run_dir):
    return [e["test_loss"] for e in events(run_dir, "epoch")]


def test_stops_after_patience_epochs_and_restores_the_best(tmp_path):
    run = tmp_path / "run"
    out = train(run, [*STOP_AT_3, "--restore-best"])
    epochs = events(run, "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    losses = _losses(run)
    assert losses[0] - min(losses[1:]) < 1.0 and losses[2] < losses[0]  # it did improve
    (stop,) = events(run, "early_stop")
    assert stop["epoch"] == 3 and stop["best_epoch"] == 1 and stop["best"] == losses[0]
    assert "early stopping after epoch 3: test_loss has not improved by 1 for 2 epoch(s)" \
        in out
    assert events(run)[-1]["event"] == "end"
    final = ckpt.read_file(ckpt.list_checkpoints(run)[0])
    assert final.trainer.epoch == 3 and final.trainer.global_step == 3 * STEPS_PER_EPOCH
    assert final.trainer.best_metric == losses[0]
    assert final.trainer.extras["best_epoch"] == 1 and final.trainer.extras["best_of"] == 1
    assert final.trainer.extras["early_stop_wait"] == 2
    best = ckpt.checkpoint_dir(run) / ckpt.BEST_NAME
    assert ckpt.read_file(best).trainer.epoch == 1
    # model.h5 holds the best epoch's weights, not the last ones
    model, last, kept = arrays(run / "model.h5"), arrays(final_path(run)), arrays(best)
    assert all(np.array_equal(model[k], kept[k]) for k in model)
    assert any(not np.array_equal(model[k], last[k]) for k in model)
    assert "the weights of epoch 1, the best by test_loss" in out
    # evaluated again from the file, model.h5 gives the best epoch's test loss
    proc = run_dptrain(["eval", "--checkpoint", str(run / "model.h5")], timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = float(proc.stdout.split(" loss ")[1].split()[0])
    assert got == pytest.approx(losses[0], abs=1e-4)


def final_path(run):
    return ckpt.list_checkpoints(run)[0]


def test_best_follows_the_metric(tmp_path):
    """best.h5 is the epoch of the lowest test loss, or of the highest test accuracy."""
    for metric in ("test_loss", "test_acc"):
        run = tmp_path / metric
        train(run, ["--epochs", "4", "--early-stop-metric", metric, "--keep-last", "4"])
        figures = [e[metric] for e in events(run, "epoch")]
        pick = np.argmin if metric == "test_loss" else np.argmax
        best_epoch = int(pick(figures)) + 1  # the first of equal figures
        best = ckpt.read_file(ckpt.checkpoint_dir(run) / ckpt.BEST_NAME)
        assert best.trainer.epoch == best_epoch, (metric, figures)
        assert best.trainer.best_metric == figures[best_epoch - 1]
        assert_identical(ckpt.checkpoint_dir(run) / ckpt.BEST_NAME,
                         ckpt.checkpoint_path(run, best_epoch * STEPS_PER_EPOCH))


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_every_rank_stops_at_the_same_epoch(tmp_path, n):
    run = tmp_path / "run"
    out = train(run, [*STOP_AT_3, "--verbose"], n=n, timeout=300)
    for rank in range(n):  # each rank says so itself, after the same epoch
        assert f"[rank {rank}] early stopping after epoch 3: " in out, out
        assert f"[rank {rank}] epoch 3/8 " in out and f"[rank {rank}] epoch 4/8" not in out
    assert [e["epoch"] for e in events(run, "epoch")] == [1, 2, 3]
    assert ckpt.read_file(final_path(run)).trainer.epoch == 3


def test_resume_mid_patience_stops_at_the_same_epoch(tmp_path):
    ref = tmp_path / "ref"
    train(ref, STOP_AT_3)
    part = tmp_path / "part"
    train(part, [*STOP_AT_3, "--max-steps", str(2 * STEPS_PER_EPOCH)])
    mid = ckpt.read_file(final_path(part))
    assert mid.trainer.epoch == 2 and mid.trainer.extras["early_stop_wait"] == 1
    out = train(part, [*STOP_AT_3, "--resume", "auto"])
    assert "early stopping after epoch 3" in out
    assert [e["epoch"] for e in events(part, "epoch")] == [1, 2, 3]
    assert _losses(part) == _losses(ref)
    assert_identical(final_path(part), final_path(ref))
    assert_identical(part / "model.h5", ref / "model.h5")


def test_a_stopped_run_stays_stopped_unless_the_patience_grows(tmp_path):
    run = tmp_path / "run"
    train(run, STOP_AT_3)
    out = train(run, [*STOP_AT_3, "--resume", "auto"])
    assert "nothing to train: early stopping ended this run after epoch 3" in out
    assert len(events(run, "epoch")) == 3 and not epoch_lines(out)
    out = train(run, [*STOP_AT_3, "--resume", "auto", "--early-stop-patience", "4"])
    assert epoch_lines(out)[0].split()[1] == "4/8"  # it trains on from epoch 4
    assert ckpt.read_file(final_path(run)).trainer.epoch >= 5  # at least waits 3 and 4


def test_damaged_counters_are_refused_before_anything_changes(tmp_path):
    run = tmp_path / "run"
    train(run, [*STOP_AT_3, "--max-steps", str(2 * STEPS_PER_EPOCH)])
    path = final_path(run)
    with h5py.File(path, "r+") as f:
        f["trainer"].attrs["early_stop_wait"] = 1.5
    ckpt.seal(path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    proc = run_dptrain(["--run-dir", str(run), *BASE, *STOP_AT_3, "--resume", "auto"],
                       timeout=120)
    one_error(proc, "early_stop_wait is 1.5, not a whole number")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_watching_a_test_figure_needs_a_test_split(tmp_path):
    data = tmp_path / "train_only.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x_train=rng.random((40, 4)), y_train=rng.integers(0, 3, 40))
    for args, part in ((["--early-stop-patience", "2"], "early_stop_patience needs a test"),
                       (["--restore-best"], "restore_best needs a test split"),
                       (["--lr-schedule", "plateau"], "plateau watches test_loss")):
        proc = run_dptrain(["--run-dir", str(tmp_path / "run"), "--dataset", str(data),
                            "--model", "mlp", "--epochs", "1", *args], timeout=120)
        one_error(proc, part)
        assert not (tmp_path / "run").exists()


def test_a_resume_with_another_metric_starts_its_best_afresh(tmp_path):
    run = tmp_path / "run"
    train(run, ["--epochs", "3", "--max-steps", str(2 * STEPS_PER_EPOCH)])
    assert ckpt.read_file(final_path(run)).trainer.extras.get("best_of", 0) == 0  # accuracy
    train(run, ["--epochs", "3", "--resume", "auto", "--early-stop-metric", "test_loss"])
    final = ckpt.read_file(final_path(run))
    # the first epoch judged by the loss is the best by it: epoch 3, and best.h5 is its
    assert final.trainer.extras["best_of"] == 1 and final.trainer.extras["best_epoch"] == 3
    assert final.trainer.best_metric == events(run, "epoch")[-1]["test_loss"]
    assert ckpt.read_file(ckpt.checkpoint_dir(run) / ckpt.BEST_NAME).trainer.epoch == 3
