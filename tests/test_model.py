"""The Sequential model: flat buffers, layout, whole-model gradients, spec round trip."""

from __future__ import annotations

import numpy as np
import pytest

from dptrain.errors import UserError
from dptrain.gradcheck import model_gradient_check
from dptrain.nn import Context, Sequential, get_loss, layer_from_spec, preset_layers


def _model(specs: list[dict], shape: tuple[int, ...], dtype: str = "float64") -> Sequential:
    m = Sequential([layer_from_spec(s) for s in specs], shape, dtype)
    m.initialize(seed=3)
    return m


def test_parameters_are_views_of_one_flat_buffer_in_reverse_layer_order() -> None:
    m = _model(preset_layers("mlp", 10), (28, 28, 1), "float32")
    assert m.num_params == 535_818                       # the figure the benchmarks quote
    first = [s.layer for s in m.param_slots][0]
    assert first == "05_dense"                           # last layer first in the buffer
    offsets = [s.offset for s in m.param_slots]
    assert offsets == sorted(offsets) and m.param_slots[-1].end == m.num_params
    w = m.layers[1].params["W"]
    assert np.shares_memory(w, m.params) and np.shares_memory(m.layers[1].grads["W"], m.grads)
    m.params[:] = 0.5
    assert float(w[0, 0]) == 0.5


def test_cnn_preset_parameter_count() -> None:
    m = _model(preset_layers("cnn", 10), (28, 28, 1), "float32")
    assert m.num_params == 421_642


def test_backward_reports_ready_offsets_in_increasing_order() -> None:
    m = _model(preset_layers("mlp", 10), (8, 8, 1))
    x = np.random.default_rng(0).normal(size=(5, 8, 8, 1))
    y = np.arange(5)
    loss = get_loss("cross_entropy")
    ctx = Context(sample_index=np.arange(5))
    loss.forward(m.forward(x, ctx), y, 1 / 5, np)
    seen: list[int] = []
    m.backward(loss.backward(), ctx, on_ready=seen.append)
    assert seen == sorted(seen) and seen[-1] == m.num_params and len(seen) == 3


def test_whole_model_gradient_check_float64() -> None:
    specs = [{"type": "conv2d", "filters": 3, "kernel": 3, "stride": 2, "padding": 1},
             {"type": "batchnorm"}, {"type": "tanh"}, {"type": "avgpool2d", "pool": 2},
             {"type": "flatten"}, {"type": "dropout", "rate": 0.3},
             {"type": "dense", "units": 4}]
    m = _model(specs, (8, 8, 2))
    x = np.random.default_rng(1).normal(size=(6, 8, 8, 2))
    y = np.array([0, 1, 2, 3, 0, 1])
    worst, where, _ = model_gradient_check(m, get_loss("cross_entropy"), x, y,
                                           coords_per_array=8)
    assert worst < 1e-6, where


def test_spec_round_trip_rebuilds_the_same_function() -> None:
    m = _model(preset_layers("cnn", 10), (8, 8, 1))
    m2 = Sequential.from_spec(m.spec())
    m2.params[:] = m.params
    x = np.random.default_rng(2).normal(size=(3, 8, 8, 1))
    ctx = Context(training=False)
    np.testing.assert_array_equal(m.forward(x, ctx), m2.forward(x, ctx))


def test_same_seed_same_init_and_summary() -> None:
    a = _model(preset_layers("mlp", 10), (8, 8, 1))
    b = _model(preset_layers("mlp", 10), (8, 8, 1))
    np.testing.assert_array_equal(a.params, b.params)
    s = a.summary()
    assert "01_dense" in s and "(512,)" in s and "total parameters" in s


def test_decay_mask_excludes_biases() -> None:
    m = _model(preset_layers("mlp", 10), (8, 8, 1))
    mask = m.decay_mask(exclude_no_decay=True)
    for s in m.param_slots:
        assert np.all(mask[s.offset:s.end] == (0 if s.name == "b" else 1))
    assert m.decay_mask(exclude_no_decay=False) is None


def test_model_errors() -> None:
    with pytest.raises(UserError, match="at least one layer"):
        Sequential([], (4,))
    with pytest.raises(UserError):
        Sequential([layer_from_spec({"type": "conv2d", "filters": 2, "kernel": 5})], (3, 3, 1))
    with pytest.raises(UserError, match="unknown model preset"):
        preset_layers("resnet", 10)
