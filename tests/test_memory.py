"""Memory: a model too large to allocate is refused with the numbers before anything is
allocated; the activation estimate agrees with what a training step really allocates; a
ResNet step allocates no new large arrays after the first."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import strict_xp as sx
from conftest import run_dptrain

from dptrain.config import make_config
from dptrain.errors import UserError
from dptrain.nn import (
    Context,
    Sequential,
    check_batch_fits,
    format_bytes,
    get_loss,
    layer_from_spec,
    preset_layers,
)
from dptrain.nn.memory import available_bytes, check_model_fits
from dptrain.training import Batch, build_trainer

HUGE = [{"type": "flatten"}, {"type": "dense", "units": 10**12}]


def model(specs: list[dict], shape: tuple[int, ...], dtype: str = "float32",
          xp=np) -> Sequential:
    return Sequential([layer_from_spec(dict(s)) for s in specs], shape, dtype, xp)


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 1023, 1024, 1536, 10 * 2**30, 7.45 * 2**40,
                                      520 * 10**12, 2**90)] == \
        ["0 bytes", "1023 bytes", "1 KiB", "1.5 KiB", "10 GiB", "7.45 TiB", "473 TiB",
         "1024 YiB"]


def test_a_model_too_large_is_refused_with_the_numbers():
    # 64 * 10**12 weights + 10**12 biases, float32, twice (parameters and gradients)
    with pytest.raises(UserError) as e:
        model(HUGE, (8, 8, 1))
    msg = str(e.value)
    assert msg.startswith("the model needs 473 TiB for parameters, gradients and state "
                          "(65,000,000,000,000 float32 parameters); this machine has ")
    assert msg.endswith(" available") and "\n" not in msg
    have = available_bytes()
    assert have is not None and format_bytes(have) in msg
    with pytest.raises(UserError) as e:  # beyond int64: Python integers, no overflow
        model([{"type": "flatten"}, {"type": "dense", "units": 10**20}], (8, 8, 1), "float64")
    assert str(e.value).startswith(
        f"the model needs {format_bytes(2 * 65 * 10**20 * 8)} for parameters, gradients and "
        "state (6,500,000,000,000,000,000,000 float64 parameters)")


def test_the_limit_is_what_is_available():
    layers = [layer_from_spec({"type": "dense", "units": 1000}) for _ in range(1)]
    for layer in layers:
        layer.build((1000,), np.float64)
    need = (2 * (1000 * 1000 + 1000)) * 8
    check_model_fits(layers, np.float64, available=need)  # exactly enough
    with pytest.raises(UserError, match=r"needs 15.3 MiB .* has 15.3 MiB available"):
        check_model_fits(layers, np.float64, available=need - 1)


def test_on_a_gpu_the_limit_is_its_free_memory(monkeypatch):
    sx.configure(devices=1, free_bytes=64 << 20)
    try:
        with pytest.raises(UserError, match=r"needs 91.6 MiB .*; this GPU has 64 MiB available"):
            model([{"type": "dense", "units": 4000}], (3000,), "float32", sx)
        m = model([{"type": "dense", "units": 1000}], (3000,), "float32", sx)
        assert m.params.size == 3_001_000
    finally:
        sx.configure(devices=1)


def test_cli_refuses_a_huge_model_in_one_line(tmp_path):
    run = tmp_path / "run"
    proc = run_dptrain(["--layers", json.dumps(HUGE), "--epochs", "1", "--progress", "off",
                        "--run-dir", str(run)], timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dptrain: error: the model needs "), lines
    assert "Traceback" not in proc.stderr and not run.exists()


# -- activations ----------------------------------------------------------------------------
def first_steps_allocate(m: Sequential, batch: int, steps: int = 2) -> tuple[int, int]:
    """(peak, still held) bytes allocated by the first ``steps`` training steps."""
    x = np.random.default_rng(0).standard_normal((batch, *m.input_shape)).astype(m.dtype)
    y = np.arange(batch) % m.output_shape[0]
    loss = get_loss("cross_entropy")
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(steps):
            ctx = Context(sample_index=np.arange(batch))
            loss.forward(m.forward(x, ctx), y, 1 / batch, np)
            m.backward(loss.backward(), ctx)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base, held - base


@pytest.mark.parametrize("preset,shape,batch", [
    ("resnet20", (16, 16, 3), 8), ("resnet20", (16, 16, 3), 24), ("cnn", (28, 28, 1), 16),
    ("vgg11", (16, 16, 3), 2), ("resnet18", (8, 8, 3), 2), ("mlp", (28, 28, 1), 32)])
def test_activation_estimate_matches_what_a_step_allocates(preset, shape, batch):
    """The estimate is what the layers' buffers take, or a little more (a first layer
    computes no input gradient; the estimate counts one)."""
    m = model(preset_layers(preset, 10), shape)
    m.initialize(0)
    peak, held = first_steps_allocate(m, batch)
    estimate = m.activation_bytes(batch)
    assert 0.97 * peak <= estimate <= 1.3 * peak, (estimate, peak)
    assert held >= 0.9 * peak  # the buffers stay for the next step


def test_a_batch_too_large_for_memory_is_refused_with_the_numbers():
    m = model(preset_layers("resnet20", 10), (32, 32, 3))
    need = m.activation_bytes(256)
    check_batch_fits(m, 256, available=need)
    with pytest.raises(UserError) as e:
        check_batch_fits(m, 256, available=need // 2)
    assert str(e.value) == (
        f"a batch of 256 samples per rank needs about {format_bytes(need)} for activations "
        f"(about {format_bytes(need / 256)} per sample for this model); this machine has "
        f"{format_bytes(need // 2)} available: use a smaller batch per rank, or more nodes")
    with pytest.raises(UserError, match="on each of 4 ranks here needs about"):
        check_batch_fits(m, 256, available=3 * need, ranks_here=4)


def traced_steps(tmp_path, batch: int) -> tuple[int, list[int]]:
    """(peak bytes allocated above the start, bytes held after each step) over four
    resnet20 training steps that follow a first one."""
    cfg = make_config({"model": "resnet20", "dataset": "synthetic",
                       "synthetic_shape": [16, 16, 3], "synthetic_samples": 7 * batch + 2,
                       "batch_size": batch, "optimizer": "sgd", "momentum": 0.9,
                       "epochs": 1, "progress": "off", "checkpoint_every": "off",
                       "run_dir": str(tmp_path / f"run{batch}")})
    t = build_trainer(cfg)
    sampler = t.plan.sampler

    def step(i: int) -> None:
        t.step(Batch(0, i, i + 1, sampler.batch(0, i), sampler.batch(0, i + 1), False), 0.01)

    tracemalloc.start()  # before the first step, so that what it replaces later is seen
    try:
        step(0)  # buffers appear once
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        held = []
        for i in (1, 2, 3, 4):
            step(i)
            held.append(tracemalloc.get_traced_memory()[0] - base)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    t.close()
    return peak, held


def test_resnet_training_step_allocates_no_large_array_after_the_first(tmp_path):
    """As the cnn's check in test_bench.py: the step (forward, backward, BatchNorm, the
    blocks' merges, optimizer) reuses its buffers. What it does allocate is small and the
    same at a 3x larger batch (NumPy's ~100 KiB iteration buffer for strided adds), and
    nothing accumulates from step to step."""
    small, held_small = traced_steps(tmp_path, 8)
    large, held_large = traced_steps(tmp_path, 24)
    activation = 24 * 16 * 16 * 16 * 4  # bytes of one stage-1 activation at batch 24
    assert large < activation / 2, (large, activation)
    assert large < small + (16 << 10), (small, large)
    for held in (held_small, held_large):
        assert max(held) < 64 << 10 and abs(held[3] - held[1]) < 2 << 10, held
