"""Label smoothing wired into training: the training loss of the first step is the smoothed
cross-entropy of the initial model on its batch, test losses are reported without
smoothing (as ``dptrain eval`` and the predictions give them), a resume cannot change it
unnoticed, and it applies to the cross-entropies only."""

from __future__ import annotations

import json

import numpy as np
import pytest
from comfort_runs import BASE, events, one_error, train
from conftest import run_dptrain

import dptrain
from dptrain.config import make_config
from dptrain.data import load_dataset
from dptrain.nn import Context
from dptrain.nn.losses import get_loss
from dptrain.training import build_trainer


def _first_step_loss(eps):
    """The smoothed loss of step 1, computed here from the initial model and batch."""
    layers = json.loads(BASE[BASE.index("--layers") + 1])
    cfg = make_config({"layers": layers, "dtype": "float64", "batch_size": 100,
                       "run_dir": "unused", "label_smoothing": eps})
    trainer = build_trainer(cfg)
    try:
        rows = trainer.plan.sampler.batch(0, 0)
        x, y = trainer.step.source.get(rows, 0)  # the batch as training decodes it
        out = trainer.model.forward(x, Context(xp=np, training=True, sample_index=rows))
        return float(get_loss("cross_entropy", label_smoothing=eps).forward(
            out, y, 1.0 / len(rows), np))
    finally:
        trainer.close()


def test_training_uses_the_smoothed_loss_and_tests_without_it(tmp_path):
    run = tmp_path / "run"
    train(run, ["--epochs", "1", "--label-smoothing", "0.2", "--log-every", "1"])
    first = events(run, "step")[0]
    assert first["step"] == 1
    assert first["train_loss"] == pytest.approx(_first_step_loss(0.2), rel=1e-12)
    assert first["train_loss"] != pytest.approx(_first_step_loss(0.0), rel=1e-3)
    # the test loss is the plain cross-entropy of the model's predictions
    test = load_dataset("digits").test
    probs = dptrain.load_model(run / "model.h5").predict(test.x)
    plain = -np.log(probs[np.arange(len(test.y)), test.y]).mean()
    smooth = -(0.8 * np.log(probs[np.arange(len(test.y)), test.y])
               + 0.2 * np.log(probs).mean(axis=1)).mean()
    reported = events(run, "epoch")[-1]["test_loss"]
    assert reported == pytest.approx(plain, rel=1e-9) and abs(smooth - plain) > 0.01
    proc = run_dptrain(["eval", "--checkpoint", str(run / "model.h5")], timeout=120)
    assert float(proc.stdout.split(" loss ")[1].split()[0]) == pytest.approx(plain, abs=5e-5)


def test_a_resume_cannot_change_the_smoothing(tmp_path):
    run = tmp_path / "run"
    train(run, ["--epochs", "2", "--max-steps", "3", "--label-smoothing", "0.1"])
    proc = run_dptrain(["--run-dir", str(run), *BASE, "--epochs", "2", "--label-smoothing",
                        "0.2", "--resume", "auto"], timeout=120)
    one_error(proc, "label_smoothing 0.1 -> 0.2", "--allow-config-change")


@pytest.mark.parametrize("args,part", [
    (["--loss", "mse", "--label-smoothing", "0.1"],
     "label_smoothing applies to the cross-entropy losses, not mse"),
    (["--label-smoothing", "1"], "label_smoothing must be in [0, 1), not 1.0"),
])
def test_bad_smoothing_is_one_line(tmp_path, args, part):
    proc = run_dptrain(["--run-dir", str(tmp_path / "run"), "--epochs", "1", *args],
                       timeout=60)
    one_error(proc, part)
    assert not (tmp_path / "run").exists()
