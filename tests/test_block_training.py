"""Block models trained through the command line: resnet20 with synchronised batch norm
gives the same parameters on 1 to 4 ranks and resumes bit for bit; the documented
example config and Python code run as written."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ckpt_runs import assert_close, assert_identical, steps_on_disk, train
from conftest import ROOT, child_env, run_dptrain
from test_mpi_equivalence import read_params, rel_diff

from dptrain import checkpoint as ckpt

#: 120 synthetic samples leave 96 for training: global batches of 22 (divisible by neither
#: 3 nor 4) and a last partial batch of 8 per epoch
RESNET = ["--model", "resnet20", "--dataset", "synthetic", "--synthetic-shape", "8,8,3",
          "--synthetic-samples", "120", "--dtype", "float64", "--batch-size", "22",
          "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--progress", "off",
          "--seed", "3"]
DOCS = ROOT / "docs" / "models.md"


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("resnet") / "one"
    out = ok(run_dptrain([*RESNET, "--epochs", "1", "--checkpoint-every", "off",
                          "--run-dir", str(run)], timeout=180))
    assert "total parameters: 272,474 (float64)" in out and "03_repeat  Repeat(n=3" in out
    return run


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3, 4])
def test_resnet20_sync_batchnorm_matches_one_rank(one_rank: Path, tmp_path: Path, n: int):
    run = tmp_path / "run"
    ok(run_dptrain([*RESNET, "--epochs", "1", "--checkpoint-every", "off",
                    "--run-dir", str(run)], n=n, timeout=240))
    got, ref = read_params(run), read_params(one_rank)
    # every leaf, blocks' too, with BatchNorm's running statistics
    assert "params/04_residual.shortcut.00_conv2d/W" in got
    assert "state/09_repeat.02_residual.main.04_batchnorm/running_var" in got
    assert len([k for k in got if k.startswith("state/")]) == 2 * 21
    assert rel_diff(got, ref) <= 1e-10


@pytest.mark.mpi
def test_resnet20_resumes_bit_for_bit_and_on_another_world_size(tmp_path: Path):
    """Two ranks (sync batch norm all-reduces in every layer): stopped at step 4 of 10 by
    --max-steps, resumed, it ends with the bytes of an uninterrupted run; resumed on one
    rank instead, within float rounding."""
    args = [*RESNET, "--epochs", "2", "--checkpoint-every", "3"]
    ref = tmp_path / "ref"
    ok(train(ref, args, n=2, timeout=240))
    stopped = tmp_path / "stopped"
    ok(train(stopped, [*args, "--max-steps", "4"], n=2, timeout=240))
    assert steps_on_disk(stopped) == [3, 4]
    other = tmp_path / "other"
    shutil.copytree(stopped, other)
    out = ok(train(stopped, [*args, "--resume", "auto"], n=2, timeout=240))
    assert "resumed from" in out and "step 4, saved by 2 rank(s)" in out
    assert_identical(ckpt.checkpoint_path(ref, 10), ckpt.checkpoint_path(stopped, 10))
    assert_identical(ref / "model.h5", stopped / "model.h5")
    ok(train(other, [*args, "--resume", "auto"], timeout=240))
    assert_close(ref / "model.h5", other / "model.h5", 1e-10)


def _block(marker: str) -> str:
    """The fenced code block of docs/models.md whose first line holds ``marker``."""
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", DOCS.read_text(), re.S | re.M):
        if marker in block.splitlines()[0]:
            return block
    raise AssertionError(f"no code block starting with {marker!r} in {DOCS}")


def test_documented_example_config_trains_and_inspects(tmp_path: Path):
    config = tmp_path / "small_resnet.toml"
    config.write_text(_block("# small_resnet.toml"))
    run = tmp_path / "run"
    out = ok(run_dptrain(["--config", str(config), "--dataset", "synthetic",
                          "--synthetic-shape", "28,28,1", "--synthetic-samples", "48",
                          "--batch-size", "16", "--max-steps", "2", "--run-dir", str(run),
                          "--progress", "off"], timeout=180))
    table = re.search(r"^layer .*?^total parameters: [\d,]+ \(float32\)", out, re.S | re.M)
    assert table and table.group(0) in DOCS.read_text()  # the summary shown is the real one
    shown = ok(run_dptrain(["inspect", str(run / "model.h5")], timeout=60))
    for name in ("03_repeat", "  00_residual", "main.04_batchnorm", "shortcut.00_conv2d"):
        assert name in shown, shown
    rows = [ln.split() for ln in shown.splitlines() if re.match(r"  \d\d_", ln)]
    assert sum(int(r[-2].replace(",", "")) for r in rows) == 24_378  # top-level rows: all


def test_documented_python_example_runs(tmp_path: Path):
    script = tmp_path / "example.py"
    script.write_text(_block("from dptrain.nn import"))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env=child_env())
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^ {2}04_residual .*\n {4}main\.00_conv2d  Conv2D", proc.stdout, re.M)
    assert "total parameters: 14,650 (float32)" in proc.stdout  # 464 + 3 * 4,672 + 170
