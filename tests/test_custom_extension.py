"""scripts/custom_extension.py: a user's extension stops every rank at the same epoch."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, run_python

from dptrain import checkpoint as ckpt

SCRIPT = str(ROOT / "scripts" / "custom_extension.py")


def _epochs(run_dir):
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "epoch"], events


@pytest.mark.parametrize("n", [None, 2])
def test_extension_stops_at_the_first_epoch_that_reaches_the_target(tmp_path, n):
    run_dir = tmp_path / "run"
    proc = run_python([SCRIPT, "--target", "0.93", "--epochs", "20", "--run-dir", str(run_dir)],
                      n=n, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    epochs, events = _epochs(run_dir)
    accs = [e["test_acc"] for e in epochs]
    assert accs[-1] >= 0.93 and all(a < 0.93 for a in accs[:-1]), accs
    assert len(epochs) < 20
    assert [e["epoch"] for e in events if e["event"] == "target_reached"] == [len(epochs)]
    assert events[-1]["event"] == "end"
    final = ckpt.read_file(ckpt.list_checkpoints(run_dir)[0])
    assert final.trainer.epoch == len(epochs)
    assert final.trainer.extras["target_reached_at"] == len(epochs)
    assert (run_dir / "model.h5").is_file()
