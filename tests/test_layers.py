"""Layers: gradients against finite differences, shapes, conventions, edge cases."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from gradcheck import bind, check_layer, rel_error

from dptrain.errors import UserError
from dptrain.nn.activations import Flatten, LeakyReLU, ReLU, Sigmoid, Softmax, Tanh
from dptrain.nn.base import LAYERS, Context, layer_from_spec
from dptrain.nn.conv import Conv2D
from dptrain.nn.dense import Dense
from dptrain.nn.dropout import Dropout
from dptrain.nn.init import INITIALIZERS, get_initializer
from dptrain.nn.norm import BatchNorm
from dptrain.nn.pool import AvgPool2D, MaxPool2D

TOL = 1e-6


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_grads_ok(errors: dict[str, float]) -> None:
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"gradient errors {errors}"


# -- gradient checks --------------------------------------------------------------------

CONV_CASES = [
    dict(filters=4, kernel=3, padding="same"),
    dict(filters=3, kernel=3, stride=2, padding=1),
    dict(filters=2, kernel=5, padding="valid"),
    dict(filters=3, kernel=[2, 3], padding=[1, 2]),
    dict(filters=2, kernel=3, stride=2, padding="same"),  # asymmetric padding
    dict(filters=2, kernel=1),
    dict(filters=2, kernel=1, stride=2, bias=False),
]


@pytest.mark.parametrize("opts", CONV_CASES, ids=str)
def test_conv_gradients(opts):
    layer = bind(Conv2D(**opts), (7, 6, 3), randomize=True)
    assert_grads_ok(check_layer(layer, rng().standard_normal((2, 7, 6, 3))))


@pytest.mark.parametrize("bias", [True, False])
def test_dense_gradients(bias):
    layer = bind(Dense(5, bias=bias), (7,), randomize=True)
    assert_grads_ok(check_layer(layer, rng().standard_normal((4, 7))))


POOL_CASES = [
    dict(pool=2),
    dict(pool=3, stride=2),
    dict(pool=2, stride=1),
    dict(pool=3, stride=2, padding=1),
    dict(pool=[2, 3], stride=[1, 2], padding="same"),
    dict(pool=3, stride=2, padding="same"),
]


@pytest.mark.parametrize("cls", [MaxPool2D, AvgPool2D])
@pytest.mark.parametrize("opts", POOL_CASES, ids=str)
def test_pool_gradients(cls, opts):
    layer = bind(cls(**opts), (7, 6, 2))
    # distinct values: no ties within the finite-difference step
    x = rng(3).permutation(2 * 7 * 6 * 2).reshape(2, 7, 6, 2) * 0.01
    assert_grads_ok(check_layer(layer, x))


def away_from_zero(shape, seed=0):
    x = rng(seed).standard_normal(shape)
    return np.where(np.abs(x) < 1e-2, 0.5, x)


@pytest.mark.parametrize("make", [Flatten, ReLU, lambda: LeakyReLU(0.1), Tanh, Sigmoid,
                                  Softmax], ids=lambda f: getattr(f, "kind", "leaky_relu"))
@pytest.mark.parametrize("shape", [(5,), (3, 4, 2)])
def test_activation_gradients(make, shape):
    layer = bind(make(), shape)
    assert_grads_ok(check_layer(layer, away_from_zero((3, *shape)) * 2))


def test_dropout_gradient_train_mode():
    layer = bind(Dropout(0.4), (4, 3, 2))
    ctx = Context(training=True, seed=5, epoch=2, sample_index=np.array([10, 3, 7]))
    assert_grads_ok(check_layer(layer, rng().standard_normal((3, 4, 3, 2)), ctx))


@pytest.mark.parametrize("shape", [(6,), (3, 4, 5)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradients(shape, training):
    layer = bind(BatchNorm(), shape, randomize=True)
    layer.state["running_mean"][:] = rng(4).standard_normal(shape[-1])
    layer.state["running_var"][:] = rng(5).uniform(0.5, 2, shape[-1])
    ctx = Context(training=training)
    assert_grads_ok(check_layer(layer, rng().standard_normal((4, *shape)) * 3 + 1, ctx))


def test_need_dx_false_returns_none_but_sets_grads():
    for layer, shape in [(Dense(3), (4,)), (Conv2D(2, padding="same"), (5, 5, 2)),
                         (BatchNorm(), (3,))]:
        bind(layer, shape, randomize=True)
        ctx = Context()
        y = layer.forward(rng().standard_normal((2, *shape)), ctx)
        assert layer.backward(np.ones_like(y), ctx, need_dx=False) is None
        assert any(np.abs(g).sum() > 0 for g in layer.grads.values())


@pytest.mark.parametrize("make,shape", [(lambda: Dense(3), (4,)),
                                        (lambda: Conv2D(2, stride=2, padding=1), (5, 5, 2)),
                                        (lambda: BatchNorm(), (3, 3, 2))])
def test_accumulate_mode_sums_gradients(make, shape):
    x1, x2 = rng(1).standard_normal((3, *shape)), rng(2).standard_normal((2, *shape))
    layer = bind(make(), shape, randomize=True)
    per_batch = []
    for x in (x1, x2):
        y = layer.forward(x, Context())
        layer.backward(np.cos(y), Context())
        per_batch.append({k: g.copy() for k, g in layer.grads.items()})
    for g in layer.grads.values():
        g[...] = 0
    ctx = Context(accumulate=True)
    for x in (x1, x2):
        y = layer.forward(x, ctx)
        layer.backward(np.cos(y), ctx)
    for name, g in layer.grads.items():
        np.testing.assert_allclose(g, per_batch[0][name] + per_batch[1][name], rtol=1e-12)


# -- shapes and reference computations --------------------------------------------------

@pytest.mark.parametrize("layer,in_shape,out_shape", [
    (Conv2D(4, 3, padding="same"), (7, 6, 3), (7, 6, 4)),
    (Conv2D(4, 3, stride=2, padding="same"), (7, 6, 3), (4, 3, 4)),
    (Conv2D(4, 3, stride=2, padding="same"), (8, 5, 3), (4, 3, 4)),
    (Conv2D(4, 5), (7, 6, 3), (3, 2, 4)),
    (Conv2D(2, [2, 3], stride=[1, 2], padding=[1, 0]), (5, 7, 1), (6, 3, 2)),
    (MaxPool2D(2), (7, 6, 3), (3, 3, 3)),
    (MaxPool2D(3, stride=2, padding="same"), (7, 6, 3), (4, 3, 3)),
    (AvgPool2D(3, stride=1, padding=1), (7, 6, 3), (7, 6, 3)),
    (Flatten(), (7, 6, 3), (126,)),
    (Dense(10), (126,), (10,)),
])
def test_output_shapes(layer, in_shape, out_shape):
    bind(layer, in_shape)
    assert layer.out_shape == out_shape
    y = layer.forward(np.zeros((2, *in_shape)), Context())
    assert y.shape == (2, *out_shape)


def naive_conv(x, W, b, stride, pads):
    """Direct loop convolution (cross-correlation) with explicit (t, b, l, r) padding."""
    sh, sw = stride
    pt, pb, pl, pr = pads
    xp_ = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw, _, F = W.shape
    Ho = (xp_.shape[1] - kh) // sh + 1
    Wo = (xp_.shape[2] - kw) // sw + 1
    y = np.zeros((x.shape[0], Ho, Wo, F))
    for n in range(x.shape[0]):
        for i in range(Ho):
            for j in range(Wo):
                patch = xp_[n, i * sh:i * sh + kh, j * sw:j * sw + kw, :]
                for f in range(F):
                    y[n, i, j, f] = (patch * W[..., f]).sum() + b[f]
    return y


@pytest.mark.parametrize("opts,pads", [
    (dict(kernel=3, padding="same"), (1, 1, 1, 1)),
    (dict(kernel=3, stride=2, padding="same"), (1, 1, 0, 1)),      # 7x6 -> out 4x3
    (dict(kernel=2, stride=2, padding="same"), (0, 1, 0, 0)),      # TF: extra pad after
    (dict(kernel=4, padding="same"), (1, 2, 1, 2)),
    (dict(kernel=[2, 3], stride=[2, 1], padding=[1, 2]), (1, 1, 2, 2)),
    (dict(kernel=5), (0, 0, 0, 0)),
])
def test_conv_matches_naive_loop(opts, pads):
    layer = bind(Conv2D(3, **opts), (7, 6, 2), randomize=True)
    x = rng().standard_normal((2, 7, 6, 2))
    y = layer.forward(x, Context())
    stride = layer.stride_hw
    ref = naive_conv(x, layer.params["W"], layer.params["b"], stride, pads)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def naive_pool(x, k, s, pads, op):
    pt, pb, pl, pr = pads
    fill = -np.inf if op == "max" else np.nan
    xp_ = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=fill)
    Ho = (xp_.shape[1] - k[0]) // s[0] + 1
    Wo = (xp_.shape[2] - k[1]) // s[1] + 1
    y = np.zeros((x.shape[0], Ho, Wo, x.shape[3]))
    for i in range(Ho):
        for j in range(Wo):
            win = xp_[:, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1], :]
            y[:, i, j] = win.max(axis=(1, 2)) if op == "max" else np.nanmean(win, axis=(1, 2))
    return y


@pytest.mark.parametrize("cls,op", [(MaxPool2D, "max"), (AvgPool2D, "avg")])
@pytest.mark.parametrize("opts,pads", [
    (dict(pool=2), (0, 0, 0, 0)),
    (dict(pool=3, stride=2, padding=1), (1, 1, 1, 1)),
    (dict(pool=2, padding="same"), (0, 1, 0, 0)),   # 7x6: pad one row at the bottom
    (dict(pool=[3, 2], stride=[1, 2], padding=[1, 0]), (1, 1, 0, 0)),
])
def test_pool_matches_naive_loop(cls, op, opts, pads):
    layer = bind(cls(**opts), (7, 6, 2))
    x = rng().standard_normal((2, 7, 6, 2))
    y = layer.forward(x, Context())
    ref = naive_pool(x, layer.kernel_hw, layer.stride_hw, pads, op)
    np.testing.assert_allclose(y, ref, rtol=1e-12)


def test_maxpool_ties_route_to_one_position():
    layer = bind(MaxPool2D(2), (4, 4, 1))
    x = np.ones((1, 4, 4, 1))
    y = layer.forward(x, Context())
    dx = layer.backward(np.ones_like(y), Context())
    assert dx.sum() == y.size  # one unit per window, not one per tied element
    for i in range(2):
        for j in range(2):
            assert dx[0, 2 * i:2 * i + 2, 2 * j:2 * j + 2, 0].sum() == 1


def test_softmax_stable_for_large_logits():
    layer = bind(Softmax(), (3,))
    x = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, 1e4]], np.float32)
    s = layer.forward(x, Context())
    assert np.isfinite(s).all()
    np.testing.assert_allclose(s.sum(axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(s[1], 1 / 3, rtol=1e-6)
    dx = layer.backward(np.ones_like(s), Context())
    assert np.isfinite(dx).all()


def test_sigmoid_stable_for_large_inputs():
    layer = bind(Sigmoid(), (3,))
    with np.errstate(over="raise"):
        y = layer.forward(np.array([[-1e4, 0.0, 1e4]]), Context())
    np.testing.assert_array_equal(y, [[0.0, 0.5, 1.0]])


def test_flops():
    assert bind(Dense(10), (20,)).flops_per_sample() == 2 * 20 * 10
    conv = bind(Conv2D(8, 3, padding="same"), (5, 4, 3))
    assert conv.flops_per_sample() == 2 * 5 * 4 * 3 * 3 * 3 * 8


# -- dropout ----------------------------------------------------------------------------

def dropout_mask(layer, index, epoch=0, seed=7, shape=(6, 5)):
    x = np.ones((len(index), *shape))
    ctx = Context(training=True, seed=seed, epoch=epoch, sample_index=np.array(index))
    return layer.forward(x, ctx)


def test_dropout_mask_depends_on_global_index_only():
    layer = bind(Dropout(0.5), (6, 5))
    layer.name = "03_dropout"
    full = dropout_mask(layer, [11, 42, 7])
    alone = dropout_mask(layer, [7])
    np.testing.assert_array_equal(full[2], alone[0])
    np.testing.assert_array_equal(dropout_mask(layer, [42, 11])[::-1], full[:2])
    assert not np.array_equal(full[0], full[1])
    # another epoch, seed or layer gives another mask
    assert not np.array_equal(full, dropout_mask(layer, [11, 42, 7], epoch=1))
    assert not np.array_equal(full, dropout_mask(layer, [11, 42, 7], seed=8))
    other = bind(Dropout(0.5), (6, 5))
    other.name = "05_dropout"
    assert not np.array_equal(full, dropout_mask(other, [11, 42, 7]))
    # a fresh layer object in another "process" gives the same mask
    again = bind(Dropout(0.5), (6, 5))
    again.name = "03_dropout"
    np.testing.assert_array_equal(full, dropout_mask(again, [11, 42, 7]))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dropout_keep_fraction_and_scale(rate):
    layer = bind(Dropout(rate), (100,))
    y = dropout_mask(layer, list(range(400)), shape=(100,))
    kept = y != 0
    assert abs(kept.mean() - (1 - rate)) < 0.01  # 40000 draws: 4+ standard deviations
    np.testing.assert_allclose(y[kept], 1 / (1 - rate))
    assert abs(y.mean() - 1) < 0.05


def test_dropout_identity_in_eval_and_default_index():
    layer = bind(Dropout(0.5), (4,))
    x = rng().standard_normal((3, 4))
    assert layer.forward(x, Context(training=False)) is x
    assert layer.backward(x, Context(training=False)) is x
    a = layer.forward(np.ones((3, 4)), Context(seed=1))
    b = layer.forward(np.ones((3, 4)), Context(seed=1, sample_index=np.arange(3)))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="sample_index"):
        layer.forward(x, Context(sample_index=np.arange(5)))


# -- batchnorm --------------------------------------------------------------------------

def test_batchnorm_running_stats_and_eval():
    layer = bind(BatchNorm(momentum=0.25), (3,))
    x = rng().standard_normal((8, 3)) * 2 + 5
    y = layer.forward(x, Context(training=True))
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=0), 1 / (1 + 1e-5 / x.var(axis=0)), rtol=1e-10)
    np.testing.assert_allclose(layer.state["running_mean"], 0.25 * x.mean(axis=0))
    np.testing.assert_allclose(layer.state["running_var"], 0.75 + 0.25 * x.var(axis=0, ddof=1))
    rm, rv = layer.state["running_mean"].copy(), layer.state["running_var"].copy()
    x2 = rng(1).standard_normal((4, 3))
    y2 = layer.forward(x2, Context(training=False))
    np.testing.assert_allclose(y2, (x2 - rm) / np.sqrt(rv + 1e-5), rtol=1e-12)
    np.testing.assert_array_equal(layer.state["running_mean"], rm)  # eval leaves state


class SimulatedWorld:
    """``allreduce_sum`` for n threads that act as ranks, summing in rank order."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=10)
        self.slots: list = [None] * n
        self.calls = [0] * n

    def allreduce_for(self, rank: int):
        def allreduce_sum(a):
            self.calls[rank] += 1
            self.slots[rank] = a.copy()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].copy())
            self.barrier.wait()
            a[...] = total
            return a
        return allreduce_sum


def run_batchnorm(x, dy, splits, sync, params):
    """Forward+backward of BatchNorm on ``x`` split over ranks; returns the concatenated
    outputs and input gradients, the summed parameter gradients, the running state of
    rank 0 and the number of reductions per rank."""
    world = SimulatedWorld(len(splits))
    bounds = np.cumsum([0, *splits])
    results: list = [None] * len(splits)
    errors = []

    def rank_main(r):
        try:
            layer = bind(BatchNorm(sync=sync), x.shape[1:])
            for k, v in params.items():
                layer.params[k][...] = v
            ctx = Context(training=True, allreduce_sum=world.allreduce_for(r))
            lo, hi = bounds[r], bounds[r + 1]
            y = layer.forward(x[lo:hi], ctx)
            dx = layer.backward(dy[lo:hi], ctx)
            results[r] = (y, dx, {k: g.copy() for k, g in layer.grads.items()},
                          {k: s.copy() for k, s in layer.state.items()})
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
            world.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(splits))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors, errors
    y = np.concatenate([r[0] for r in results])
    dx = np.concatenate([r[1] for r in results])
    grads = {k: sum(r[2][k] for r in results) for k in results[0][2]}
    return y, dx, grads, results[0][3], world.calls


@pytest.mark.parametrize("splits", [[3, 4], [5, 0, 2], [1, 6]])
def test_sync_batchnorm_matches_one_rank(splits):
    x = rng().standard_normal((7, 2, 3, 4)) * 2 + 1
    dy = rng(1).standard_normal(x.shape)
    params = {"gamma": rng(2).standard_normal(4), "beta": rng(3).standard_normal(4)}
    ref = run_batchnorm(x, dy, [7], True, params)
    got = run_batchnorm(x, dy, splits, True, params)
    for a, b in zip(ref[:2], got[:2], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)
    for k in ref[2]:
        np.testing.assert_allclose(got[2][k], ref[2][k], rtol=1e-10, atol=1e-12)
    for k in ref[3]:
        np.testing.assert_allclose(got[3][k], ref[3][k], rtol=1e-10)
    assert got[4] == [3] * len(splits)  # the same number of reductions on every rank


def test_unsynced_batchnorm_depends_on_split():
    x = rng().standard_normal((8, 4)) * 2 + 1
    dy = rng(1).standard_normal(x.shape)
    params = {"gamma": np.ones(4), "beta": np.zeros(4)}
    one = run_batchnorm(x, dy, [8], False, params)
    two = run_batchnorm(x, dy, [4, 4], False, params)
    assert rel_error(one[0], two[0]) > 1e-3
    assert two[4] == [0, 0]


def test_sync_batchnorm_gradient_with_two_simulated_ranks():
    """The global-batch function seen from rank 0, with rank 1's part held fixed."""
    x = rng().standard_normal((5, 3)) * 2
    other = rng(1).standard_normal((3, 3))
    weights = rng(2).standard_normal((8, 3))
    params = {"gamma": rng(3).standard_normal(3), "beta": rng(4).standard_normal(3)}

    def total(xa):
        y, dx, *_ = run_batchnorm(np.concatenate([xa, other]), weights, [5, 3], True, params)
        return float((y * weights).sum()), dx[:5]

    _, analytic = total(x)
    numeric = np.zeros_like(x)
    eps = 1e-6
    for i in np.ndindex(x.shape):
        xp_, xm = x.copy(), x.copy()
        xp_[i] += eps
        xm[i] -= eps
        numeric[i] = (total(xp_)[0] - total(xm)[0]) / (2 * eps)
    assert rel_error(analytic, numeric) <= TOL


# -- dtypes, empty batches, specs, errors -----------------------------------------------

ALL_LAYERS = [
    (lambda: Dense(3), (4,)),
    (lambda: Conv2D(2, 3, padding="same"), (5, 4, 2)),
    (lambda: Conv2D(2, 3, stride=2, padding=1), (5, 4, 2)),
    (lambda: Conv2D(2, 1), (5, 4, 2)),
    (lambda: MaxPool2D(2, padding="same"), (5, 4, 2)),
    (lambda: AvgPool2D(3, stride=2, padding=1), (5, 4, 2)),
    (Flatten, (5, 4, 2)),
    (ReLU, (4,)),
    (LeakyReLU, (4,)),
    (Tanh, (4,)),
    (Sigmoid, (4,)),
    (Softmax, (4,)),
    (lambda: Dropout(0.3), (5, 4, 2)),
    (BatchNorm, (5, 4, 2)),
    (lambda: BatchNorm(sync=True), (4,)),
]
LAYER_IDS = [f().kind + str(i) for i, (f, _) in enumerate(ALL_LAYERS)]


@pytest.mark.parametrize("make,shape", ALL_LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("training", [True, False])
def test_float32_stays_float32(make, shape, training):
    layer = bind(make(), shape, dtype=np.float32)
    ctx = Context(training=training)
    x = rng().standard_normal((3, *shape)).astype(np.float32)
    y = layer.forward(x, ctx)
    assert y.dtype == np.float32
    dx = layer.backward(np.ones_like(y), ctx)
    assert dx.dtype == np.float32 and dx.shape == x.shape
    assert all(g.dtype == np.float32 for g in layer.grads.values())
    assert all(s.dtype == np.float32 for s in layer.state.values())


@pytest.mark.parametrize("make,shape", ALL_LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(make, shape, training):
    layer = bind(make(), shape, randomize=True)
    for g in layer.grads.values():
        g[...] = 1  # stale values from an earlier step must be overwritten
    state = {k: s.copy() for k, s in layer.state.items()}
    ctx = Context(training=training, sample_index=np.zeros(0, np.int64))
    y = layer.forward(np.zeros((0, *shape)), ctx)
    assert y.shape == (0, *layer.out_shape)
    dx = layer.backward(np.zeros_like(y), ctx)
    assert dx.shape == (0, *shape)
    for g in layer.grads.values():
        np.testing.assert_array_equal(g, 0)
    for k, s in layer.state.items():
        np.testing.assert_array_equal(s, state[k])


def test_every_layer_kind_is_covered():
    covered = {f().kind for f, _ in ALL_LAYERS}
    assert covered == {"dense", "conv2d", "maxpool2d", "avgpool2d", "flatten", "relu",
                       "leaky_relu", "tanh", "sigmoid", "softmax", "dropout", "batchnorm"}
    assert covered <= set(LAYERS)


@pytest.mark.parametrize("spec", [
    {"type": "dense", "units": 10, "init": "glorot_normal", "bias": False},
    {"type": "conv2d", "filters": 8, "kernel": [3, 5], "stride": 2, "padding": "same"},
    {"type": "conv2d", "filters": 8, "kernel": 3, "stride": [1, 2], "padding": [1, 0]},
    {"type": "maxpool2d", "pool": 3, "stride": 2, "padding": 1},
    {"type": "avgpool2d", "pool": [2, 3], "padding": "same"},
    {"type": "flatten"}, {"type": "relu"}, {"type": "leaky_relu", "alpha": 0.2},
    {"type": "tanh"}, {"type": "sigmoid"}, {"type": "softmax"},
    {"type": "dropout", "rate": 0.25},
    {"type": "batchnorm", "momentum": 0.01, "eps": 1e-3, "sync": True},
])
def test_spec_round_trip(spec):
    layer = layer_from_spec(dict(spec))
    full = layer.spec()
    assert {k: full[k] for k in spec} == spec
    assert layer_from_spec(dict(full)).spec() == full


@pytest.mark.parametrize("spec,match", [
    ({"type": "nope"}, "unknown layer type"),
    ({"units": 3}, "type"),
    ({"type": "dense"}, "units"),
    ({"type": "dense", "units": 0}, "units"),
    ({"type": "dense", "units": 3, "init": "bogus"}, "initializer"),
    ({"type": "dense", "units": 3, "colour": "red"}, "colour"),
    ({"type": "conv2d", "filters": 3, "kernel": [3, 3, 3]}, "kernel"),
    ({"type": "conv2d", "filters": 3, "padding": "full"}, "padding"),
    ({"type": "conv2d", "filters": 3, "stride": 0}, "stride"),
    ({"type": "maxpool2d", "pool": 2, "padding": 2}, "padding"),
    ({"type": "avgpool2d", "pool": -1}, "pool"),
    ({"type": "dropout", "rate": 1.0}, "rate"),
    ({"type": "leaky_relu", "alpha": "x"}, "alpha"),
    ({"type": "batchnorm", "momentum": 2}, "momentum"),
    ({"type": "batchnorm", "eps": 0}, "eps"),
])
def test_bad_specs_raise_user_error(spec, match):
    with pytest.raises(UserError, match=match):
        layer_from_spec(spec)


@pytest.mark.parametrize("layer,shape", [
    (Conv2D(2, 5), (4, 6, 1)),
    (Conv2D(2, [1, 7], padding=2), (8, 2, 1)),
    (MaxPool2D(3), (2, 5, 1)),
    (AvgPool2D(2, stride=3), (1, 4, 1)),
])
def test_window_larger_than_input_raises(layer, shape):
    with pytest.raises(UserError, match="larger than its input"):
        layer.build(shape, np.float32)


@pytest.mark.parametrize("layer,shape,match", [
    (Dense(3), (4, 4), "flatten"),
    (Conv2D(3), (8, 8), "channels"),
    (MaxPool2D(), (8,), "channels"),
])
def test_wrong_input_rank_raises(layer, shape, match):
    with pytest.raises(UserError, match=match):
        layer.build(shape, np.float32)


# -- initialisers -----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(INITIALIZERS))
def test_initializers(name):
    state = np.random.get_state()[1].copy()
    init = get_initializer(name)
    a = init(np.random.default_rng(3), (400, 300), 400, 300, np.float32)
    b = init(np.random.default_rng(3), (400, 300), 400, 300, np.float32)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # no global state
    assert a.dtype == np.float32 and a.shape == (400, 300)
    expected_var = {"he_uniform": 2 / 400, "he_normal": 2 / 400, "glorot_uniform": 2 / 700,
                    "glorot_normal": 2 / 700, "zeros": 0.0}[name]
    assert abs(a.var() - expected_var) <= 0.05 * expected_var
    assert abs(a.mean()) <= 5 * (expected_var / a.size) ** 0.5


def test_unknown_initializer():
    with pytest.raises(UserError, match="he_uniform"):
        get_initializer("orthogonal")
