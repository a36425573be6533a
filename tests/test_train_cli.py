"""End to end in one process: train on the digits, metrics, saved model, eval, debug."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
from conftest import run_dptrain, run_python


def _epoch_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("epoch ")]


def test_cnn_learns_the_digits_and_eval_agrees(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = run_dptrain(["--run-dir", str(run), "--epochs", "4", "--progress", "off"])
    assert r.returncode == 0, r.stderr
    lines = _epoch_lines(r.stdout)
    assert len(lines) == 4
    acc = float(re.search(r"test loss [0-9.]+ acc ([0-9.]+)", lines[-1]).group(1))
    assert acc > 0.85                       # chance is 0.10
    assert "samples/s" in lines[-1]
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("epoch") == 4
    last = [e for e in events if e["event"] == "epoch"][-1]
    assert last["test_acc"] == acc or abs(last["test_acc"] - acc) < 1e-4
    assert set(last["timing_ms_per_step"]) == {"data_ms", "forward_ms", "backward_ms",
                                               "sync_wait_ms", "optimizer_ms"}
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"] == "cnn" and cfg["epochs"] == 4
    with h5py.File(run / "model.h5") as f:               # readable without dptrain
        assert f.attrs["kind"] == "model"
        assert f["params/09_dense/W"].shape == (128, 10)
    ev = run_dptrain(["eval", "--run-dir", str(run)])
    assert ev.returncode == 0, ev.stderr
    got = float(re.search(r"accuracy ([0-9.]+)", ev.stdout).group(1))
    assert abs(got - acc) < 1e-4


def test_second_fresh_run_keeps_the_first_runs_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["--run-dir", str(run), "--model", "mlp", "--epochs", "1", "--progress", "off"]
    assert run_dptrain(args).returncode == 0
    r = run_dptrain(args)
    assert r.returncode == 0, r.stderr
    assert "held an earlier run" in r.stdout
    (old,) = (run / "previous").iterdir()
    assert (old / "model.h5").exists() and (old / "checkpoints").is_dir()
    assert (run / "model.h5").exists()


def test_debug_mode_never_imports_mpi_and_checks_gradients(tmp_path: Path) -> None:
    code = ("import sys; from dptrain.cli import main; "
            f"rc = main(['--debug', '--epochs', '1', '--model', 'mlp', '--run-dir', "
            f"{str(tmp_path / 'run')!r}, '--progress', 'off']); "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; sys.exit(rc)")
    r = run_python(["-c", code])
    assert r.returncode == 0, r.stderr
    m = re.search(r"gradient check on \d+ samples: worst relative error ([0-9.e+-]+)", r.stdout)
    assert m and float(m.group(1)) < 1e-4, r.stdout


def test_progress_bar_when_asked(tmp_path: Path) -> None:
    r = run_dptrain(["--run-dir", str(tmp_path / "run"), "--model", "mlp", "--epochs", "1",
                     "--progress", "on"])
    assert r.returncode == 0
    assert "epoch 1" in r.stderr and "step" in r.stderr   # tqdm draws on stderr


def test_help_and_version() -> None:
    r = run_dptrain(["--help"])
    assert r.returncode == 0 and "--batch-per-rank" in r.stdout and "eval" in r.stdout
    r = run_dptrain(["--version"])
    assert r.returncode == 0 and r.stdout.startswith("dptrain ")
