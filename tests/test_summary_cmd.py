"""``dptrain summary``: the model a config builds, with the model's own parameter, FLOP and
activation figures per layer or block and the memory per rank, without training."""

from __future__ import annotations

import re

import numpy as np
import pytest
from comfort_runs import one_error
from conftest import run_dptrain

from dptrain.config import make_config
from dptrain.data import load_dataset
from dptrain.nn import format_bytes
from dptrain.training.assembly import build_model


def _summary(tmp_path, *args):
    proc = run_dptrain(["summary", "--run-dir", str(tmp_path / "run"), *args], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was trained or written
    return proc.stdout


def _model(**options):
    data = load_dataset("digits")
    return build_model(make_config(options), data.train.sample_shape, 10, np)


def test_rows_and_totals_are_the_models_own_figures(tmp_path):
    out = _summary(tmp_path, "--model", "cnn", "--batch-size", "64", "--ranks", "2")
    model = _model(model="cnn")
    assert "batch 32 per rank on 2 rank(s); optimizer adam" in out
    rows = [ln for ln in out.splitlines() if re.match(r"\d\d_", ln)]
    assert len(rows) == len(model.layers)
    for ln, layer in zip(rows, model.layers, strict=True):
        assert ln.startswith(layer.name) and ln.endswith(format_bytes(
            layer.activation_bytes(32)))
        assert f"{layer.flops_per_sample():,}" in ln
    assert f"total parameters: {model.num_params:,} (float32)" in out
    flops = model.flops_per_sample()
    assert f"forward FLOPs/sample: {flops:,} ({32 * flops:,} per batch of 32)" in out
    weights = 2 * model.num_params * 4  # parameters and gradients (no state: no BatchNorm)
    total = weights + 2 * model.num_params * 4 + model.activation_bytes(32)  # Adam: 2 slots
    assert f"+ {format_bytes(model.activation_bytes(32))} activations = " \
           f"{format_bytes(total)}" in out


def test_blocks_get_rows_and_full_shows_their_layers(tmp_path):
    out = _summary(tmp_path, "--model", "resnet20", "--batch-per-rank", "8", "--optimizer",
                   "sgd", "--full")
    assert "batch 8 per rank on 1 rank(s); optimizer sgd" in out
    assert re.search(r"^  00_residual +Residual", out, re.M)  # a block inside the repeat
    assert re.search(r"^    main\.00_conv2d +Conv2D", out, re.M)  # and its layers
    assert "optimizer state (1 slot(s))" in out  # SGD with momentum
    model = _model(model="resnet20")
    assert f"total parameters: {model.num_params:,}" in out


@pytest.mark.parametrize("args,part", [
    (["--ranks", "0"], "--ranks must be positive"),
    (["--model", "nosuch"], "nosuch"),
    (["--lr", "nan"], "lr must be a finite number"),
])
def test_mistakes_are_one_line(tmp_path, args, part):
    one_error(run_dptrain(["summary", *args], timeout=60), part)
