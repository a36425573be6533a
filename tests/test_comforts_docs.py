"""docs/comforts.md, run in order in an empty directory (as tests/test_docs.py runs every
page): what its commands print and leave is what the page says."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import h5py
from conftest import ROOT, child_env

DOCS = ROOT / "docs" / "comforts.md"


def _blocks():
    """(language, text) of every fenced block, in order."""
    return re.findall(r"```(\w*)\n(.*?)```", DOCS.read_text(), re.S)


def _run(line, cwd):
    args = shlex.split(line)
    assert args[0] == "python", line
    proc = subprocess.run([sys.executable, *args[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=child_env(), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_every_block_runs_as_written(tmp_path):
    outputs = {}
    for n, (lang, text) in enumerate(_blocks()):
        if lang == "toml":  # a file, named by its first line
            (tmp_path / text.splitlines()[0].lstrip("# ").strip()).write_text(text)
            continue
        if lang == "python":  # a script, run where the commands run
            (tmp_path / f"block{n}.py").write_text(text)
            outputs["script"] = _run(f"python block{n}.py", tmp_path)
            continue
        assert lang == "sh", lang
        for line in text.strip().splitlines():
            outputs[line] = _run(line, tmp_path)
    train = next(v for k, v in outputs.items() if k.endswith("--config comforts.toml"))
    epochs = re.findall(r"^epoch \d+/15 .* top5 [0-9.]+  lr ", train, re.M)
    assert epochs and "saved model to runs/comforts/model.h5 (the weights of epoch" in train
    run = tmp_path / "runs" / "comforts"
    assert len((run / "metrics.csv").read_text().splitlines()) == len(epochs) + 1
    assert (tmp_path / "confusion.png").stat().st_size > 1000
    with h5py.File(tmp_path / "preds.h5") as f:
        assert f["probabilities"].shape == (100, 10) and f["top_classes"].shape == (100, 5)
    assert re.fullmatch(r"accuracy 0\.\d{4}, top-5 [01]\.\d{4}\n", outputs["script"])
    summary = next(v for k, v in outputs.items() if "summary" in k)
    assert "batch 32 per rank on 4 rank(s)" in summary and "memory per rank: " in summary


def test_the_example_lines_are_what_a_run_prints():
    """The epoch lines shown on the page have the fields of real ones, in order."""
    shown = [ln.strip() for ln in DOCS.read_text().splitlines() if ln.startswith("    epoch ")]
    assert len(shown) == 4
    for line in shown:
        assert re.fullmatch(r"epoch \d+/15  train loss [0-9.]+ acc [0-9.]+  test loss [0-9.]+ "
                            r"acc [0-9.]+ top5 [0-9.]+  lr [0-9.e-]+  \d+ samples/s  [0-9.]+s",
                            line), line
