"""dptrain against PyTorch 2.13 on the same numbers: label smoothing, cross-entropy of
probabilities near 0, warmup, reduce on plateau, weight decay, top-k and BatchNorm's
refusal of one value per channel.

The expected values are literals in torch_reference_values.py, written by
scripts/torch_reference.py (run by hand where PyTorch is installed), so these tests run
without PyTorch. The tests at the end compare with a live PyTorch on random inputs where
it is importable and are skipped elsewhere.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch_reference_values as ref
from gradcheck import bind

from dptrain.errors import UserError
from dptrain.nn import Context
from dptrain.nn.activations import Softmax
from dptrain.nn.losses import CrossEntropy, CrossEntropyProbs, get_loss
from dptrain.nn.norm import BatchNorm
from dptrain.optim import make_optimizer
from dptrain.schedules import make_schedule

LOGITS = np.array(ref.LOGITS)
N = len(LOGITS)


def _targets(kind: str) -> np.ndarray:
    return np.array(ref.LABELS) if kind == "labels" else np.array(ref.SOFT)


def _through_softmax(loss, logits, y, scale):
    """(loss value, gradient of the logits) of ``loss`` after a Softmax layer."""
    sm = bind(Softmax(), logits.shape[1:], dtype=logits.dtype)
    ctx = Context()
    value = float(loss.forward(sm.forward(logits, ctx), y, scale, np))
    return value, sm.backward(loss.backward(), ctx)


@pytest.mark.parametrize("key", sorted(ref.SMOOTHED_CE))
def test_label_smoothing_equals_torch_cross_entropy(key) -> None:
    """CrossEntropyLoss(label_smoothing=eps) on logits, labels and probability targets:
    the fused loss and the probabilities loss after a Softmax layer both equal it."""
    eps, kind = key
    want_loss, want_grad = ref.SMOOTHED_CE[key]
    loss = get_loss("cross_entropy", label_smoothing=eps)
    assert float(loss.forward(LOGITS, _targets(kind), 1 / N, np)) == pytest.approx(
        want_loss, rel=1e-14)
    np.testing.assert_allclose(loss.backward(), want_grad, rtol=1e-12, atol=1e-16)
    value, grad = _through_softmax(get_loss("cross_entropy_probs", label_smoothing=eps),
                                   LOGITS, _targets(kind), 1 / N)
    assert value == pytest.approx(want_loss, rel=1e-14)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-15)


def test_cross_entropy_of_probabilities_near_zero_equals_torch() -> None:
    """NLLLoss(log(softmax(z))) in float32 where the true class has p = e^-18 and e^-25,
    below float32's epsilon: the loss and both gradients are PyTorch's (the gradient of
    the logits is p - onehot, not 0 as when p was clipped at epsilon)."""
    z = np.array(ref.FAR_LOGITS, np.float32)
    y = np.array(ref.FAR_LABELS)
    want_loss, want_dz, want_dp = ref.FAR_CE
    sm = bind(Softmax(), (4,), dtype=np.float32)
    ctx = Context()
    p = sm.forward(z, ctx)
    assert p[0, 0] < np.finfo(np.float32).eps and p[1, 2] < np.finfo(np.float32).eps
    loss = CrossEntropyProbs()
    value = loss.forward(p, y, 1 / 3, np)
    assert value.dtype == np.float32 and float(value) == pytest.approx(want_loss, rel=1e-6)
    dp = loss.backward()
    np.testing.assert_allclose(dp, want_dp, rtol=1e-5)
    dz = sm.backward(dp, ctx)
    np.testing.assert_allclose(dz, want_dz, rtol=1e-5, atol=1e-7)
    assert dz[0, 0] == pytest.approx(-1 / 3, rel=1e-6)  # the confidently wrong sample counts


def test_cross_entropy_of_probabilities_stays_finite_at_zero() -> None:
    """Where p underflows to 0 the loss is -log(tiny), finite, and the gradient finite."""
    for dt in (np.float32, np.float64):
        p = np.array([[1.0, 0.0, 0.0]], dt)
        loss = CrossEntropyProbs(label_smoothing=0.2)
        value = float(loss.forward(p, np.array([1]), 1.0, np))
        tiny = np.finfo(dt).tiny
        # q = (0.2/3, 0.8 + 0.2/3, 0.2/3); the first class has p = 1, log p = 0
        assert value == pytest.approx(-(0.8 + 2 * 0.2 / 3) * math.log(tiny), rel=1e-6)
        g = loss.backward()
        assert np.isfinite(g).all() and g[0, 1] < 0


@pytest.mark.parametrize("name,args,want", [
    ("cosine", dict(base_lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1),
     ref.WARMUP_COSINE),
    ("step", dict(base_lr=0.3, total_steps=16, warmup_steps=4, step_size=3, gamma=0.5),
     ref.WARMUP_STEP),
    ("constant", dict(base_lr=0.05, total_steps=7, warmup_steps=3), ref.WARMUP_CONSTANT),
])
def test_warmup_equals_linear_lr_then_the_schedule(name, args, want) -> None:
    """SequentialLR([LinearLR(start_factor=1/(W+1), total_iters=W), main], [W]):
    the base rate is first reached at step W, by the main schedule's own first step."""
    schedule = make_schedule(name, **args)
    np.testing.assert_allclose([schedule(t) for t in range(len(want))], want, rtol=1e-13)
    w = args["warmup_steps"]
    assert schedule(w) == args["base_lr"] and schedule(w - 1) < args["base_lr"]


@pytest.mark.parametrize("case", ref.PLATEAU_CASES, ids=[c[0] for c in ref.PLATEAU_CASES])
def test_plateau_equals_reduce_lr_on_plateau(case) -> None:
    """The rate after each epoch's metric, for min/max and rel/abs thresholds, patience,
    cooldown and min_lr (a NaN loss counts as no improvement)."""
    name, seq, kw = case
    kw = dict(kw)
    schedule = make_schedule(
        "plateau", 1.0, 0, min_lr=kw.pop("min_lr"), plateau_mode=kw.pop("mode"),
        plateau_factor=kw.pop("factor"), plateau_patience=kw.pop("patience"),
        plateau_threshold=kw.pop("threshold"), plateau_threshold_mode=kw.pop("threshold_mode"),
        plateau_cooldown=kw.pop("cooldown"))
    assert not kw and schedule.needs_metric
    got = []
    for epoch, metric in enumerate(getattr(ref, seq)):
        schedule.observe(metric, step=10 * (epoch + 1))
        got.append(schedule(10 * (epoch + 1)))
    assert got == ref.PLATEAU_LRS[name]


def _ours(torch_name: str, kw: dict, p: np.ndarray, g: np.ndarray):
    name = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw"}[torch_name]
    extra = ({"momentum": kw["momentum"], "nesterov": kw.get("nesterov", False)}
             if name == "sgd" else {})
    return make_optimizer(name, p, g, weight_decay=kw["weight_decay"], **extra)


@pytest.mark.parametrize("case", ref.OPTIMIZERS, ids=[c[0] for c in ref.OPTIMIZERS])
def test_weight_decay_equals_torch_and_leaves_the_gradient(case) -> None:
    """Three steps of SGD (plain, momentum, Nesterov) and Adam with L2 weight decay and
    of AdamW: PyTorch's parameters, and the gradient buffer still holds the gradient."""
    name, torch_name, kw = case
    p, g = np.array(ref.PARAMS), np.zeros(len(ref.PARAMS))
    opt = _ours(torch_name, kw, p, g)
    for grad in ref.GRADS:
        g[...] = grad
        opt.step(kw["lr"])
        np.testing.assert_array_equal(g, grad)
    np.testing.assert_allclose(p, ref.OPTIMIZER_PARAMS[name], rtol=1e-13, atol=1e-16)


def test_topk_equals_torch_topk() -> None:
    z, y = np.array(ref.TOPK["logits"]), np.array(ref.TOPK["labels"])
    got = get_loss("cross_entropy").topk_correct(z, y, np, ks=(1, 5))
    assert got == [ref.TOPK["hits"][1], ref.TOPK["hits"][5]]


@pytest.mark.parametrize("nchw", sorted(ref.BATCHNORM_REFUSES))
def test_batchnorm_refuses_what_torch_refuses(nchw: str) -> None:
    n, c, h, w = (int(v) for v in nchw.strip("()").split(","))
    layer = bind(BatchNorm(), (h, w, c))
    x = np.random.default_rng(0).standard_normal((n, h, w, c))
    if ref.BATCHNORM_REFUSES[nchw]:
        with pytest.raises(UserError, match="needs at least 2 values per channel"):
            layer.forward(x, Context(training=True))
    else:
        assert np.isfinite(layer.forward(x, Context(training=True))).all()


# -- against a live PyTorch, where it is installed -----------------------------------------

@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="PyTorch is not installed (the literal "
                                               "tests above cover the same conventions)")


def test_live_label_smoothing(torch) -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, c = rng.integers(1, 6), rng.integers(2, 9)
        z = rng.standard_normal((n, c)) * 4
        eps = float(rng.uniform(0, 0.99))
        for y in (rng.integers(0, c, n), rng.dirichlet(np.ones(c), n)):
            tz = torch.tensor(z, requires_grad=True)
            want = torch.nn.functional.cross_entropy(tz, torch.tensor(y), label_smoothing=eps)
            want.backward()
            for loss in (CrossEntropy(eps), CrossEntropyProbs(eps)):
                if isinstance(loss, CrossEntropy):
                    value = float(loss.forward(z, y, 1 / n, np))
                    grad = loss.backward()
                else:
                    value, grad = _through_softmax(loss, z, y, 1 / n)
                assert value == pytest.approx(want.item(), rel=1e-12), trial
                np.testing.assert_allclose(grad, tz.grad.numpy(), rtol=1e-9, atol=1e-14)


def test_live_plateau_and_warmup(torch) -> None:
    from torch.optim import lr_scheduler as sched  # noqa: PLC0415

    rng = np.random.default_rng(1)
    for _ in range(30):
        kw = dict(mode=str(rng.choice(["min", "max"])), factor=float(rng.uniform(0.05, 0.9)),
                  patience=int(rng.integers(0, 4)), threshold=float(rng.choice([0, 1e-3, 0.05])),
                  threshold_mode=str(rng.choice(["rel", "abs"])),
                  cooldown=int(rng.integers(0, 3)), min_lr=float(rng.choice([0.0, 0.01])))
        metrics = np.round(np.cumsum(rng.normal(0, 0.05, 40)) + 1, 2)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        theirs = sched.ReduceLROnPlateau(opt, **kw)
        ours = make_schedule("plateau", 0.5, 0, min_lr=kw["min_lr"], plateau_mode=kw["mode"],
                             plateau_factor=kw["factor"], plateau_patience=kw["patience"],
                             plateau_threshold=kw["threshold"],
                             plateau_threshold_mode=kw["threshold_mode"],
                             plateau_cooldown=kw["cooldown"])
        for m in metrics:
            theirs.step(float(m))
            ours.observe(float(m), 1)
            assert ours(0) == opt.param_groups[0]["lr"], kw
    for w, total in [(1, 5), (7, 30), (20, 21)]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
        seq = sched.SequentialLR(opt, [
            sched.LinearLR(opt, start_factor=1 / (w + 1), total_iters=w),
            sched.CosineAnnealingLR(opt, T_max=total - w, eta_min=0.01)], milestones=[w])
        ours = make_schedule("cosine", 0.2, total, warmup_steps=w, min_lr=0.01)
        for t in range(total + 1):
            assert ours(t) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), (w, t)
            opt.step()
            seq.step()
