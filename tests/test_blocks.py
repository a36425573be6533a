"""Blocks (residual, add, concat, repeat): gradients against central differences, the flat
buffers' order and the gradient-ready notices, names, specs, checkpoints, the fast paths
inside blocks, and files written before blocks existed."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from gradcheck import numeric_gradient as numeric
from gradcheck import rel_error

from dptrain import checkpoint as ckpt
from dptrain.errors import UserError
from dptrain.nn import (
    Context,
    GlobalAvgPool2D,
    Repeat,
    Residual,
    Sequential,
    get_loss,
    layer_from_spec,
    preset_layers,
)
from dptrain.nn.activations import ReLU
from dptrain.nn.conv import Conv2D
from dptrain.nn.dense import Dense
from dptrain.nn.norm import BatchNorm
from dptrain.nn.pool import MaxPool2D
from dptrain.parallel import LocalComm, Request
from dptrain.parallel.sync import GradSync

DATA = Path(__file__).parent / "data"


def conv(filters: int, kernel: int = 3, **kw) -> dict:
    return {"type": "conv2d", "filters": filters, "kernel": kernel,
            "padding": kw.pop("padding", kernel // 2), **kw}


BN, TANH, RELU = {"type": "batchnorm"}, {"type": "tanh"}, {"type": "relu"}


def conv_bn(filters: int, kernel: int = 3, **kw) -> list[dict]:
    """A convolution without bias (batch norm cancels a bias: its gradient is zero and its
    central difference pure rounding) and a batch norm."""
    return [conv(filters, kernel, bias=False, **kw), BN]


#: the block models whose gradients are checked (smooth activations where a kink is not
#: the point): (id, layer specs, input shape per sample)
GRADCHECK = [
    ("residual-identity", [{"type": "residual", "main": [*conv_bn(3), TANH, *conv_bn(3)]}],
     (5, 5, 3)),
    ("residual-projection", [{"type": "residual",
                              "main": [*conv_bn(4, stride=2, padding=1), TANH, *conv_bn(4)],
                              "shortcut": conv_bn(4, 1, stride=2)}],
     (6, 6, 3)),
    ("concat", [{"type": "concat", "branches": [[conv(2, 1)], [conv(3), TANH], []]}],
     (4, 4, 2)),
    ("add", [{"type": "add", "branches": [[conv(2), TANH], [conv(2, 1)], []]}], (4, 5, 2)),
    ("nested", [{"type": "add", "branches": [
        [{"type": "residual", "main": [conv(2), TANH]},
         {"type": "repeat", "n": 2, "block": {"type": "residual", "main": conv_bn(2)}}],
        [{"type": "concat", "branches": [[conv(1, 1), TANH],
                                          [{"type": "residual", "main": [conv(1)],
                                            "shortcut": [conv(1, 1)]}]]}]]}],
     (4, 4, 2)),
    ("repeat", [{"type": "repeat", "n": 3, "block": [
        {"type": "residual", "main": [*conv_bn(3), TANH]}, TANH]}], (4, 4, 3)),
    ("repeat-pool-dense", [{"type": "repeat", "n": 1, "block": [
        {"type": "residual", "main": conv_bn(3), "shortcut": [conv(3, 1)]},
        {"type": "global_avgpool2d"}, {"type": "dense", "units": 4}]}], (4, 4, 2)),
    ("relu-maxpool-fused", [{"type": "residual", "main": [
        conv(4), RELU, {"type": "maxpool2d", "pool": 2, "stride": 1, "padding": "same"},
        conv(3, 1)], "shortcut": [conv(3, 1)]}], (5, 5, 2)),
]


def built(specs: list[dict], shape: tuple[int, ...], seed: int = 3,
          dtype: str = "float64") -> Sequential:
    m = Sequential([layer_from_spec(dict(s)) for s in specs], shape, dtype)
    m.initialize(seed)
    return m


@pytest.mark.parametrize("specs,shape", [g[1:] for g in GRADCHECK],
                         ids=[g[0] for g in GRADCHECK])
def test_block_gradients_match_central_differences(specs, shape):
    """Every parameter array and the input, every element, float64, training mode (batch
    statistics), relative error <= 1e-6."""
    m = built(specs, shape)
    rng = np.random.default_rng(7)
    m.params[...] += 0.3 * rng.standard_normal(m.num_params)  # no zero biases, unit scales
    (block,) = m.layers
    x = rng.standard_normal((3, *shape))
    weights = rng.standard_normal((3, *m.output_shape))
    ctx = Context(training=True)

    def f() -> float:
        return float((block.forward(x, ctx) * weights).sum())

    block.forward(x, ctx)
    m.grads[...] = np.nan  # a gradient that is never written cannot pass
    dx = block.backward(weights, ctx)
    analytic = m.grads.copy()
    assert rel_error(dx, numeric(f, x)) <= 1e-6
    num = numeric(f, m.params)
    checked = 0
    for s in m.param_slots:
        err = rel_error(analytic[s.offset:s.end], num[s.offset:s.end])
        assert err <= 1e-6, f"{s.layer}/{s.name}: {err:.2e}"
        checked += 1
    assert checked == len(m.param_slots) >= 2


def test_fused_relu_maxpool_inside_a_block_is_fused_and_changes_nothing():
    specs = GRADCHECK[-1][1]
    x = np.round(np.random.default_rng(0).standard_normal((4, 5, 5, 2)) * 2) / 2  # ties
    results = []
    for fuse in (True, False):
        m = built(specs, (5, 5, 2))
        relu, pool = (leaf for leaf in m.leaf_layers()
                      if isinstance(leaf, (ReLU, MaxPool2D)))
        assert relu.deferred and pool.relu_first  # Sequential fuses inside blocks too
        relu.deferred = pool.relu_first = fuse
        ctx = Context()
        out = m.forward(x, ctx)
        loss = get_loss("cross_entropy")
        loss.forward(out.reshape(4, -1), np.arange(4), 0.25, np)
        m.backward(loss.backward().reshape(out.shape), ctx)
        results.append((out, m.grads.copy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_reused_buffers_inside_blocks_change_nothing():
    """Results stay the caller's and equal those of a model that allocates every array."""
    specs = preset_layers("resnet20", 10)
    x = np.random.default_rng(1).standard_normal((6, 8, 8, 3))
    runs = []
    for reuse in (True, False):
        m = built(specs, (8, 8, 3))
        m.reuse_buffers = reuse
        outs = []
        for xx in (x, np.tanh(x), x[:4]):
            ctx = Context()
            out = m.forward(xx, ctx)
            loss = get_loss("cross_entropy")
            loss.forward(out, np.arange(len(xx)) % 10, 1 / len(xx), np)
            m.backward(loss.backward(), ctx)
            outs.append((out, m.grads.copy(), m.state.copy()))
        assert not np.shares_memory(outs[0][0], outs[1][0])
        runs.append(outs)
    for (o1, g1, s1), (o2, g2, s2) in zip(*runs, strict=True):
        np.testing.assert_array_equal(o1, o2)
        np.testing.assert_array_equal(g1, g2)
        np.testing.assert_array_equal(s1, s2)


# -- the flat buffers and backward's notices ------------------------------------------------
MIXED = [conv(4, bias=False), BN, RELU,
         {"type": "residual", "main": [conv(6, stride=2, padding=1), BN, RELU, conv(6), BN],
          "shortcut": [conv(6, 1, stride=2, bias=False), BN]}, RELU,
         {"type": "repeat", "n": 2, "block": [{"type": "residual", "main": [conv(6), BN]},
                                              RELU]},
         {"type": "concat", "branches": [[conv(3, 1)], []]},
         {"type": "global_avgpool2d"}, {"type": "dense", "units": 5}]


def _one_step(m: Sequential, on_ready=None) -> None:
    x = np.random.default_rng(2).standard_normal((4, *m.input_shape))
    ctx = Context(sample_index=np.arange(4))
    loss = get_loss("cross_entropy")
    loss.forward(m.forward(x, ctx), np.arange(4) % 5, 0.25, np)
    m.backward(loss.backward(), ctx, on_ready=on_ready)


def test_gradients_are_final_when_announced_and_offsets_only_grow():
    m = built(MIXED, (8, 8, 3))
    m.grads[...] = np.nan  # what backward has not written yet is NaN
    seen: list[tuple[int, np.ndarray]] = []
    _one_step(m, on_ready=lambda off: seen.append((off, m.grads[:off].copy())))
    offsets = [off for off, _ in seen]
    assert offsets == sorted(offsets) and offsets[-1] == m.num_params
    for off, snapshot in seen:  # each announced gradient already had its end value
        np.testing.assert_array_equal(snapshot, m.grads[:off])
    ends = {}
    for s in m.param_slots:
        ends[s.layer] = s.end
    assert set(ends.values()) <= set(offsets)  # every leaf with parameters announced
    assert len(seen) == len(ends) == 14
    assert np.isfinite(m.grads).all()


def test_buffer_order_is_backward_order_and_names_follow_the_paths():
    m = built(MIXED, (8, 8, 3))
    order = list(dict.fromkeys(s.layer for s in m.param_slots))
    assert order[:4] == ["08_dense", "06_concat.b0.00_conv2d",
                         "05_repeat.02_residual.main.01_batchnorm",
                         "05_repeat.02_residual.main.00_conv2d"]
    # within the projection block: the main path last to first, then the shortcut
    assert order[6:12] == ["03_residual.main.04_batchnorm", "03_residual.main.03_conv2d",
                           "03_residual.main.01_batchnorm", "03_residual.main.00_conv2d",
                           "03_residual.shortcut.01_batchnorm",
                           "03_residual.shortcut.00_conv2d"]
    assert order[-2:] == ["01_batchnorm", "00_conv2d"]
    names = [leaf.name for leaf in m.leaf_layers()]
    assert len(names) == len(set(names)) and not any("/" in n for n in names)
    assert "05_repeat.01_relu" in names and "03_residual.main.02_relu" in names
    w = m.leaf_layers()[3].params["W"]   # views into the one flat buffer
    assert np.shares_memory(w, m.params) and w.shape == (3, 3, 4, 6)


class RecordingComm(LocalComm):
    """Rank 0 of a pretend world of two: records each bucket's bytes when its sum starts."""

    size = 2

    def __init__(self) -> None:
        self.launched: list[np.ndarray] = []

    def iallreduce_sum(self, a):
        self.launched.append(a.copy())
        return Request()


def test_buckets_start_during_backward_in_order_with_final_gradients():
    m = built(MIXED, (8, 8, 3))
    comm = RecordingComm()
    sync = GradSync(comm, m.grads, bucket_bytes=800, overlap=True)
    assert len(sync.buckets) >= 10
    m.grads[...] = np.nan
    sync.start()
    _one_step(m, on_ready=sync.on_ready)
    during = len(comm.launched)
    sync.finish()
    assert during == len(sync.buckets)  # the last leaf's notice covers the whole buffer
    for (s, e), sent in zip(sync.buckets, comm.launched, strict=True):
        np.testing.assert_array_equal(sent, m.grads[s:e])
    # and not all at the end: the first bucket went out while most leaves still waited
    seen: list[int] = []
    _one_step(m, on_ready=seen.append)
    assert seen[0] < sync.buckets[1][1] < seen[-1]


# -- specs, the Python API, checkpoints ------------------------------------------------------
def test_python_api_and_config_build_the_same_model():
    api = Sequential([
        Conv2D(4, 3, padding=1, bias=False), BatchNorm(sync=True), ReLU(),
        Residual(main=[Conv2D(4, 3, padding=1, bias=False), BatchNorm(), ReLU()]),
        Repeat(2, [Residual(main=[Conv2D(4, 3, padding=1)], shortcut=[Conv2D(4, 1)]),
                   ReLU()]),
        GlobalAvgPool2D(), Dense(3)], (6, 6, 2), "float64")
    spec = json.loads(api.spec_json())  # plain JSON
    assert spec["layers"][4] == {"type": "repeat", "n": 2, "block": [
        {"type": "residual", "main": [api.layers[4].spec()["block"][0]["main"][0]],
         "shortcut": [{"type": "conv2d", "filters": 4, "kernel": 1, "stride": 1,
                       "padding": "valid", "init": "he_uniform", "bias": True}]},
        {"type": "relu"}]}
    rebuilt = Sequential.from_spec(spec)
    assert rebuilt.spec() == api.spec()
    assert rebuilt.param_slots == api.param_slots and rebuilt.state_slots == api.state_slots
    api.initialize(5)
    rebuilt.initialize(5)
    np.testing.assert_array_equal(api.params, rebuilt.params)
    copies = [leaf for leaf in api.leaf_layers() if leaf.name.endswith("shortcut.00_conv2d")]
    assert len(copies) == 2 and not np.array_equal(copies[0].params["W"],
                                                    copies[1].params["W"])
    x = np.random.default_rng(0).standard_normal((3, 6, 6, 2))
    ev = Context(training=False)
    np.testing.assert_array_equal(api.forward(x, ev), rebuilt.forward(x, ev))


def test_block_model_checkpoint_round_trip_rebuilds_it_exactly(tmp_path):
    m = built(preset_layers("resnet20", 10), (8, 8, 3))
    m.state[...] = np.random.default_rng(1).random(m.state.shape) + 0.5
    path = ckpt.write_file(tmp_path / "model.h5",
                           ckpt.capture("model", m, m.params, m.state, config={}))
    ck = ckpt.read_file(path)
    again = Sequential.from_spec(ck.architecture)
    ckpt.check_compatible(ck, again, path)
    again.params[...] = ckpt.flatten(again, ck.params)
    again.state[...] = ckpt.flatten(again, ck.state, "state")
    np.testing.assert_array_equal(again.params, m.params)
    np.testing.assert_array_equal(again.state, m.state)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3))
    ev = Context(training=False)
    np.testing.assert_array_equal(again.forward(x, ev), m.forward(x, ev))
    with h5py.File(path.open("rb"), "r") as f:  # one flat group per leaf, as before blocks
        groups = list(f["params"])
        assert "04_residual.shortcut.00_conv2d" in groups and len(groups) == 43
        for g in groups:
            assert all(isinstance(v, h5py.Dataset) for v in f["params"][g].values())
        assert "03_repeat.02_residual.main.01_batchnorm" in f["state"]


def test_changed_block_is_named_on_resume(tmp_path):
    m = built(preset_layers("resnet20", 10), (8, 8, 3))
    path = ckpt.write_file(tmp_path / "m.h5",
                           ckpt.capture("model", m, m.params, m.state, config={}))
    other = built(preset_layers("resnet56", 10), (8, 8, 3))
    with pytest.raises(UserError, match="does not match the model at layer 3"):
        ckpt.check_compatible(ckpt.read_file(path), other, path)


def test_checkpoint_written_before_blocks_still_loads():
    """tests/data/sequential-v1.h5 was written by dptrain before blocks existed (with the
    layer list below): its names, layout and function are unchanged."""
    ck = ckpt.read_file(DATA / "sequential-v1.h5")
    expected = json.loads((DATA / "sequential-v1.json").read_text())
    m = Sequential.from_spec(ck.architecture)
    ckpt.check_compatible(ck, m, "fixture")
    slots = [["params", s.layer, s.name, s.offset, list(s.shape)] for s in m.param_slots]
    slots += [["state", s.layer, s.name, s.offset, list(s.shape)] for s in m.state_slots]
    assert slots == expected["slots"]
    m.params[...] = ckpt.flatten(m, ck.params)
    m.state[...] = ckpt.flatten(m, ck.state, "state")
    x = np.sin(np.arange(4 * 6 * 6 * 2, dtype=np.float64)).reshape(4, 6, 6, 2)
    out = m.forward(x, Context(training=False))
    np.testing.assert_array_equal(out, np.array(expected["eval_output"]))
    assert sorted(ck.optimizer_state) == ["exp_avg", "exp_avg_sq"]


@pytest.mark.parametrize("preset", ["mlp", "cnn"])
def test_models_without_blocks_keep_the_layout_of_before(preset):
    """Names NN_kind and the buffer in reverse layer order, as every earlier file has."""
    m = built(preset_layers(preset, 10), (12, 12, 1))
    offset, old = 0, []
    for i in reversed(range(len(m.layers))):
        layer = m.layers[i]
        for name, shape in layer.param_shapes().items():
            old.append((f"{i:02d}_{layer.kind}", name, offset, tuple(shape)))
            offset += int(np.prod(shape))
    assert [(s.layer, s.name, s.offset, s.shape) for s in m.param_slots] == old
    assert m.leaf_layers() == m.layers


# -- the summary and the nested BatchNorm check ---------------------------------------------
def test_summary_has_a_row_with_totals_for_every_block():
    m = built(MIXED, (8, 8, 3))
    text = m.summary()
    for block in ("03_residual", "05_repeat", "00_residual", "02_residual", "06_concat"):
        assert f"{block}  " in text
    assert "main.00_conv2d" not in text                  # leaves inside blocks: folded
    assert "main.00_conv2d  Conv2D" in m.summary(full=True)
    from dptrain.nn.summary import model_rows

    rows = model_rows(m)
    top = [r for r in rows if r.depth == 0]
    assert sum(r.params for r in top) == m.num_params
    assert sum(r.flops for r in top) == m.flops_per_sample()
    by_name = {r.name: r for r in rows}
    block = m.layers[3]
    assert by_name["03_residual"].params == sum(
        v.size for leaf in block.leaves() for v in leaf.params.values()) == 612
    assert by_name["03_residual"].flops == sum(
        leaf.flops_per_sample() for leaf in block.leaves()) + 4 * 4 * 6  # + the add


def test_unsynchronised_batchnorm_inside_a_block_is_checked(tmp_path):
    from dptrain.config import make_config
    from dptrain.training import build_trainer

    layers = [{"type": "flatten"}, {"type": "dense", "units": 8},
              {"type": "residual", "main": [{"type": "dense", "units": 8},
                                            {"type": "batchnorm", "sync": False}]},
              {"type": "dense", "units": 10}]
    cfg = make_config({"layers": layers, "batch_size": 1, "epochs": 1, "progress": "off",
                       "run_dir": str(tmp_path / "run")})
    with pytest.raises(UserError, match=r"layer 02_residual\.main\.01_batchnorm: "
                                        r"BatchNorm\(sync=false\)"):
        build_trainer(cfg)
