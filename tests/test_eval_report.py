"""``dptrain eval``: loss, top-1, top-5, per-class accuracy and the confusion matrix, the
same at 1, 2 and 3 ranks and the same as counting the model's own predictions; the PNG;
one-line errors for a bad PNG path or a missing matplotlib."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from comfort_runs import events, one_error, train
from conftest import child_env, run_dptrain

import dptrain
from dptrain.data import load_dataset


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    train(run, ["--epochs", "1"])
    return run / "model.h5"


def _eval(model_file, n=None, *extra):
    proc = run_dptrain(["eval", "--checkpoint", str(model_file), "--batch-size", "64",
                        *extra], n=n, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _parse(out):
    head = out.splitlines()[0]
    figures = {k: float(v) for k, v in re.findall(r"(loss|accuracy|top-5) ([0-9.]+)", head)}
    lines = out.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("confusion matrix (rows"))
    columns = [int(v) for v in lines[at + 1].split()]
    rows = [ln.split() for ln in lines[at + 2:at + 2 + len(columns)]]
    assert [int(r[0]) for r in rows] == columns == list(range(len(columns)))
    matrix = np.array([[int(v) for v in r[1:]] for r in rows])
    per_class = {int(c): (v, int(t.strip("()"))) for c, v, t in
                 re.findall(r"(\d+): ([0-9.]+|n/a) \((\d+)\)", out)}
    return figures, matrix, per_class


def test_the_report_counts_what_the_model_predicts(model_file):
    out = _eval(model_file)
    figures, matrix, per_class = _parse(out)
    test = load_dataset("digits").test
    pred = dptrain.load_model(model_file).predict(test.x)
    want = np.zeros((10, 10), np.int64)
    np.add.at(want, (test.y, pred.argmax(axis=1)), 1)
    np.testing.assert_array_equal(matrix, want)
    assert figures["accuracy"] == pytest.approx(np.trace(want) / 360, abs=5e-5)
    top5 = (np.argsort(-pred, axis=1, kind="stable")[:, :5] == test.y[:, None]).any(axis=1)
    assert figures["top-5"] == pytest.approx(top5.mean(), abs=5e-5)
    logp = np.log(pred[np.arange(360), test.y])
    assert figures["loss"] == pytest.approx(-logp.mean(), abs=5e-5)
    for c in range(10):
        acc, total = per_class[c]
        assert total == want[c].sum() and float(acc) == pytest.approx(
            want[c, c] / total, abs=5e-5)
    # the same figures as the training run's last evaluation
    last = events(model_file.parent, "epoch")[-1]
    assert figures["loss"] == pytest.approx(last["test_loss"], abs=5e-5)
    assert figures["top-5"] == pytest.approx(last["test_top5"], abs=5e-5)


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_the_same_report_at_any_rank_count(model_file, n):
    one = _parse(_eval(model_file))
    many = _parse(_eval(model_file, n))
    np.testing.assert_array_equal(many[1], one[1])
    assert many[2] == one[2]
    for k, v in one[0].items():
        assert many[0][k] == pytest.approx(v, abs=1.5e-4), k  # printed to 4 decimals


def test_confusion_png(model_file, tmp_path):
    png = tmp_path / "confusion.png"
    out = _eval(model_file, None, "--confusion-png", str(png))
    assert f"confusion matrix drawn in {png}" in out
    import matplotlib.image as mpimg  # noqa: PLC0415

    image = mpimg.imread(png)
    assert image.ndim == 3 and min(image.shape[:2]) > 200
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


@pytest.mark.parametrize("path,part", [
    ("no/such/dir/c.png", "does not exist"),
    ("c.jpg", "must end in .png"),
    (".", "is a directory"),
])
def test_bad_png_paths_are_one_line_before_evaluating(model_file, tmp_path, path, part):
    target = path if path == "." else str(tmp_path / path)
    if path == ".":
        target = str(tmp_path / "d.png")
        os.mkdir(target)
    proc = run_dptrain(["eval", "--checkpoint", str(model_file), "--confusion-png", target],
                       timeout=120)
    one_error(proc, part)


def test_a_missing_matplotlib_is_one_line(model_file, tmp_path):
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = child_env(PYTHONPATH=f"{tmp_path / 'shadow'}{os.pathsep}{child_env()['PYTHONPATH']}")
    proc = run_dptrain(["eval", "--checkpoint", str(model_file), "--confusion-png",
                        str(tmp_path / "c.png")], env=env, timeout=120)
    one_error(proc, "--confusion-png needs matplotlib: pip install 'dptrain[plot]'")
