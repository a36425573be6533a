"""Reduce on plateau in real runs: the rates of every epoch follow PyTorch's rule from the
figures the run reports, behind a warmup too; the epoch lines and metrics.jsonl show them;
its state is in the checkpoint and a resumed run ends with the bytes of an uninterrupted
one; 2 ranks take the same decisions as one."""

from __future__ import annotations

import pytest
from ckpt_runs import assert_identical
from comfort_runs import STEPS_PER_EPOCH, epoch_lines, events, one_error, train
from conftest import run_dptrain

from dptrain import checkpoint as ckpt
from dptrain.schedules import Plateau

LR = 0.003
PLATEAU = ["--lr-schedule", "plateau", "--plateau-metric", "test_acc", "--plateau-patience",
           "1", "--plateau-factor", "0.5", "--plateau-threshold", "0.1",
           "--plateau-threshold-mode", "abs", "--min-lr", "0.0005", "--epochs", "6"]


def _expected_rates(figures, mode="max", **kw):
    """The rate of each epoch by PyTorch's rule, fed the figures the run reported."""
    p = Plateau(LR, mode=mode, **kw)
    rates = []
    for step, value in enumerate(figures, 1):
        rates.append(p(0))
        p.observe(value, step * STEPS_PER_EPOCH)
    return rates


KW = {"factor": 0.5, "patience": 1, "threshold": 0.1, "threshold_mode": "abs",
      "min_lr": 0.0005}


def test_rates_follow_the_rule_and_are_shown(tmp_path):
    run = tmp_path / "run"
    out = train(run, PLATEAU)
    epochs = events(run, "epoch")
    accs = [e["test_acc"] for e in epochs]
    rates = [e["lr"] for e in epochs]
    assert rates == _expected_rates(accs, **KW)
    assert min(rates) < LR  # the run did reduce (accuracy gains shrink below 0.1)
    lines = epoch_lines(out)
    assert [f"lr {r:.3g}" in ln for r, ln in zip(rates, lines, strict=True)] == [True] * 6
    reduced = events(run, "lr_reduced")
    assert [r["lr"] for r in reduced] == sorted({r for r in rates if r < LR}, reverse=True)
    assert all(f"lr reduced from {r['lr_before']:.4g} to {r['lr']:.4g}" in out for r in reduced)
    state = ckpt.read_file(ckpt.list_checkpoints(run)[0]).trainer.extras
    assert state["plateau_epochs"] == 6 and state["plateau_lr"] == _final_rate(accs)


def _final_rate(figures):
    p = Plateau(LR, mode="max", **KW)
    for step, value in enumerate(figures, 1):
        p.observe(value, step)
    return p.lr


def test_warmup_then_plateau(tmp_path):
    run = tmp_path / "run"
    train(run, [*PLATEAU, "--epochs", "3", "--warmup-steps", "5", "--log-every", "1",
                "--plateau-metric", "train_loss", "--plateau-threshold", "10"])
    steps = events(run, "step")
    # steps 1..5 rise as base * (t + 1) / 6 for t = 0..4; step 6 on uses the base rate
    assert [s["lr"] for s in steps[:6]] == pytest.approx(
        [LR * (t + 1) / 6 for t in range(5)] + [LR], rel=1e-15)
    # train loss never falls by 10: epoch 1 sets the best, 2 is bad, 3 (> patience 1) too
    epochs = events(run, "epoch")
    assert [e["lr"] for e in epochs] == [LR, LR, LR]
    assert [r["epoch"] for r in events(run, "lr_reduced")] == [3]
    assert ckpt.read_file(ckpt.list_checkpoints(run)[0]).trainer.extras["plateau_lr"] == \
        LR * 0.5


def test_resume_goes_on_with_the_same_rates_and_bytes(tmp_path):
    ref = tmp_path / "ref"
    train(ref, PLATEAU)
    part = tmp_path / "part"
    train(part, [*PLATEAU, "--max-steps", str(3 * STEPS_PER_EPOCH)])
    out = train(part, [*PLATEAU, "--resume", "auto"])
    assert "resumed from" in out
    assert [e["lr"] for e in events(part, "epoch")] == [e["lr"] for e in events(ref, "epoch")]
    assert_identical(ckpt.list_checkpoints(part)[0], ckpt.list_checkpoints(ref)[0])
    assert_identical(part / "model.h5", ref / "model.h5")


@pytest.mark.mpi
def test_two_ranks_take_the_same_decisions(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*PLATEAU, "--epochs", "4"]
    train(one, args)
    train(two, args, n=2, timeout=300)
    assert [e["lr"] for e in events(two, "epoch")] == [e["lr"] for e in events(one, "epoch")]
    assert [e["test_acc"] for e in events(two, "epoch")] == \
        [e["test_acc"] for e in events(one, "epoch")]


@pytest.mark.parametrize("args,part", [
    (["--plateau-factor", "1"], "plateau_factor must be in (0, 1), not 1.0"),
    (["--plateau-patience", "-1"], "plateau_patience must be 0 to"),
    (["--plateau-threshold", "nan"], "plateau_threshold must be a finite number"),
    (["--plateau-threshold-mode", "max"], "must be one of rel, abs"),
    (["--plateau-metric", "val_loss"], "must be one of test_loss, test_acc, train_loss"),
    (["--lr-schedule", "plateau", "--min-lr", "0.1"], "min_lr (0.1) must not exceed lr"),
])
def test_bad_plateau_options_are_one_line(tmp_path, args, part):
    proc = run_dptrain(["--run-dir", str(tmp_path / "run"), "--epochs", "1", *args],
                       timeout=60)
    one_error(proc, part)
    assert not (tmp_path / "run").exists()
