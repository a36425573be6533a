"""GPU code paths without a GPU: everything runs on tests/strict_xp.py, a strict CuPy stand-in.

The stand-in refuses every implicit host<->device crossing, models asynchronous copies
and streams, and counts transfers, so these tests fail wherever dptrain would silently mix
host and device arrays, read a copy too early, hand MPI an unsynchronised buffer, or move
more than the input batch and one scalar per step. Results are compared with the NumPy
run of the same code: on the stand-in they must be bit-identical.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import inspect
import json
import math
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import strict_xp as sx
from conftest import HANG_GUARD, ROOT, child_env, mpi4py_missing, mpi_cmd, run_dptrain

from dptrain import backend as backend_mod
from dptrain import checkpoint as ckpt
from dptrain import cli
from dptrain.backend import (
    Backend,
    node_local_rank,
    plan_device,
    select_backend,
    sharing_groups,
    slurm_tasks_on_node,
)
from dptrain.config import make_config
from dptrain.data import (
    AugmentSpec,
    BatchTransform,
    GlobalSampler,
    load_dataset,
    memory_source,
    shard,
)
from dptrain.data.upload import DeviceBatches
from dptrain.errors import UserError
from dptrain.nn import Context, Sequential, get_loss, layer_from_spec
from dptrain.optim import clip_grad_norm, make_optimizer
from dptrain.parallel import LocalComm, Request, device_comm
from dptrain.parallel import device as device_mod
from dptrain.parallel.device import DeviceComm, mpi_takes_device_buffers
from dptrain.parallel.nccl import decode_unique_id, encode_unique_id
from dptrain.parallel.sync import GradSync
from dptrain.training import Batch, EpochMeter, build_trainer

GPU = Backend(sx, "gpu", 0)


@pytest.fixture
def sxp(monkeypatch):
    """The stand-in as this process's CuPy, one visible device, counters at zero."""
    sx.configure(devices=1)
    sx.reset_stats()
    monkeypatch.setattr(backend_mod, "_import_cupy", lambda: sx)
    yield sx
    sx.configure(devices=1)


def host(a):
    return a if isinstance(a, np.ndarray) else sx.asnumpy(a)


# -- the stand-in itself is strict (otherwise the tests below could not fail) -----------------
def test_stand_in_refuses_implicit_crossings(sxp):
    a = sx.asarray(np.arange(6.0))
    for bad in (lambda: np.asarray(a), lambda: a + np.ones(6), lambda: np.ones(6) * a,
                lambda: np.sum(a), lambda: a[np.array([0, 1])],
                lambda: a.__setitem__(Ellipsis, np.zeros(6)), lambda: sx.asarray([a, a])):
        with pytest.raises(TypeError):
            bad()
    total = a.sum()
    assert isinstance(total, sx.ndarray) and total.ndim == 0   # reductions stay on the device
    assert float(total) == 15.0 and sx.stats["scalar"] == 1    # allowed, counted as a sync
    np.testing.assert_array_equal(sx.asnumpy(a * np.float64(2) + 1), np.arange(6.0) * 2 + 1)
    sx.configure(devices=2)
    with sx.cuda.Device(1):
        b = sx.zeros(3)
    assert b.device.id == 1 and a.device.id == 0
    with pytest.raises(ValueError, match="different from the current device"):
        b + 1


def test_stand_in_copies_are_asynchronous(sxp):
    s = sx.cuda.Stream(non_blocking=True)
    d = sx.arange(4.0)
    out = np.zeros(4)
    d.get(stream=s, out=out, blocking=False)
    assert np.isnan(out).all()                   # read too early: poisoned
    s.synchronize()
    np.testing.assert_array_equal(out, np.arange(4.0))
    assert sx.stats["pageable_async"] == 1       # out was not pinned
    pinned = np.frombuffer(sx.cuda.alloc_pinned_memory(32), np.float64, 4)
    pinned[:] = 7
    d.set(pinned, stream=s)
    with pytest.raises(RuntimeError, match="still"):
        d + 1                                    # no wait for the upload's event
    pinned[:] = 8
    with pytest.raises(RuntimeError, match="changed before"):
        s.synchronize()                          # host buffer reused too early
    e = sx.arange(3.0) * 2
    with pytest.raises(RuntimeError, match="synchronised"):
        _read_like_mpi(e)
    sx.cuda.get_current_stream().synchronize()
    assert e.__cuda_array_interface__["shape"] == (3,)


# -- layers, losses, optimizers ------------------------------------------------------------------
KITCHEN_SINK = [
    {"type": "conv2d", "filters": 8, "kernel": 3, "padding": "same"},
    {"type": "batchnorm", "sync": True}, {"type": "relu"}, {"type": "maxpool2d", "pool": 2},
    {"type": "conv2d", "filters": 4, "kernel": [2, 3], "stride": 2, "padding": 1},
    {"type": "batchnorm"}, {"type": "leaky_relu", "alpha": 0.1},
    {"type": "avgpool2d", "pool": 2, "padding": 1}, {"type": "conv2d", "filters": 4,
                                                     "kernel": 1},
    {"type": "flatten"}, {"type": "dense", "units": 12}, {"type": "dropout", "rate": 0.3},
    {"type": "tanh"}, {"type": "dense", "units": 8}, {"type": "sigmoid"},
    {"type": "dense", "units": 5}]


#: blocks: a projection residual, ReLU fused into max pooling inside a path, a
#: concatenation with an identity branch, a repeat, global average pooling
BLOCKS = [
    {"type": "conv2d", "filters": 4, "kernel": 3, "padding": 1, "bias": False},
    {"type": "batchnorm", "sync": True}, {"type": "relu"},
    {"type": "residual", "main": [
        {"type": "conv2d", "filters": 6, "kernel": 3, "stride": 2, "padding": 1},
        {"type": "relu"}, {"type": "maxpool2d", "pool": 3, "stride": 1, "padding": "same"},
        {"type": "conv2d", "filters": 6, "kernel": 3, "padding": 1, "bias": False},
        {"type": "batchnorm", "sync": True}],
     "shortcut": [{"type": "conv2d", "filters": 6, "kernel": 1, "stride": 2, "bias": False},
                  {"type": "batchnorm"}]},
    {"type": "repeat", "n": 2, "block": [
        {"type": "concat", "branches": [[{"type": "conv2d", "filters": 2, "kernel": 1}],
                                        [{"type": "identity"}]]},
        {"type": "residual", "main": [{"type": "conv2d", "filters": 8, "kernel": 3,
                                       "padding": 1}, {"type": "tanh"}]},
        {"type": "conv2d", "filters": 6, "kernel": 1}]},
    {"type": "global_avgpool2d"}, {"type": "dense", "units": 5}]


def _pass(xp, layers, loss_name, x, y, accumulate_twice=False):
    """Forward, loss, backward (twice with accumulation) on ``xp``; host results."""
    model = Sequential([layer_from_spec(dict(s)) for s in layers], x.shape[1:], "float64", xp)
    model.initialize(7)
    loss = get_loss(loss_name)
    results = []
    for j in range(2 if accumulate_twice else 1):
        idx = np.arange(len(x)) + 100 * j
        ctx = Context(xp=xp, training=True, seed=3, epoch=1, sample_index=idx,
                      global_batch=len(x), allreduce_sum=lambda a: a, accumulate=j > 0,
                      device_index=None if xp is np else xp.asarray(idx))
        out = model.forward(xp.asarray(x), ctx)
        value = loss.forward(out, xp.asarray(y), 1 / len(x), xp)
        hits = loss.count_correct(out, xp.asarray(y), xp)
        model.backward(loss.backward(), ctx)
        results += [host(out), float(value), int(hits)]
    ev = Context(xp=xp, training=False)
    results += [host(model.forward(xp.asarray(x), ev)), host(model.grads).copy(),
                host(model.state).copy()]
    return results


@pytest.mark.parametrize("loss_name,softmax", [("cross_entropy", False),
                                               ("cross_entropy_probs", True), ("mse", False)])
def test_every_layer_and_loss_on_the_stand_in_matches_numpy(sxp, loss_name, softmax):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 9, 7, 2))
    y = rng.integers(0, 5, size=6)
    layers = KITCHEN_SINK + ([{"type": "softmax"}] if softmax else [])
    ref = _pass(np, layers, loss_name, x, y, accumulate_twice=True)
    got = _pass(sx, layers, loss_name, x, y, accumulate_twice=True)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_array_equal(a, b)
    assert sx.stats["pageable_async"] == 0


def test_block_model_on_the_stand_in_matches_numpy(sxp):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 8, 8, 2))
    y = rng.integers(0, 5, size=5)
    ref = _pass(np, BLOCKS, "cross_entropy", x, y, accumulate_twice=True)
    got = _pass(sx, BLOCKS, "cross_entropy", x, y, accumulate_twice=True)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.abs(ref[-2]).max() > 0 and sx.stats["pageable_async"] == 0


@pytest.mark.parametrize("name,kw", [
    ("sgd", {"momentum": 0.0}), ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("sgd", {"momentum": 0.9, "weight_decay": 0.01}), ("adam", {}),
    ("adamw", {"weight_decay": 0.1})])
def test_optimizers_and_clipping_on_the_stand_in_match_numpy(sxp, name, kw):
    rng = np.random.default_rng(1)
    p0, grads = rng.normal(size=50), rng.normal(size=(4, 50))
    mask = (np.arange(50) % 3 != 0).astype(np.float64)
    finals = []
    for xp in (np, sx):
        params, g = xp.asarray(p0.copy()), xp.zeros(50)
        opt = make_optimizer(name, params, g, xp, decay_mask=mask, **kw)
        for step in grads:
            g[...] = xp.asarray(step)
            clip_grad_norm(g, 2.0, xp)
            opt.step(0.1)
        finals.append([host(params)] + [host(v) for v in opt.state.values()])
    for a, b in zip(*finals, strict=True):
        np.testing.assert_array_equal(a, b)


# -- batch assembly -----------------------------------------------------------------------------
def _uploader(backend, x, y, max_rows, **kw):
    """Batches of the in-memory arrays on ``backend``, as a GPU run's step gets them."""
    host = memory_source(x, y, BatchTransform(x.dtype), max_rows, background=False)
    return DeviceBatches(backend, host, max_rows, **kw)


def test_device_batches_overlap_and_never_mix_up_batches(sxp):
    data = load_dataset("digits", dtype="float32")
    x, y = data.train.x, data.train.y
    sampler = GlobalSampler(len(x), 40, seed=5)
    up = _uploader(GPU, x, y, max_rows=20)
    compute = sx.cuda.get_current_stream()
    batches = [shard(sampler.batch(0, i), 1, 2) for i in range(36)]  # rank 1 of 2
    for i, rows in enumerate(batches):
        bx, by = up.get(rows, 0)
        total = float((bx * 2).sum())                  # some "compute" reading the slot
        np.testing.assert_array_equal(host(bx), x[rows])
        np.testing.assert_array_equal(host(by), y[rows])
        np.testing.assert_array_equal(host(up.device_rows), rows)
        assert total == pytest.approx(2 * float(x[rows].sum(dtype=np.float64)), rel=1e-5)
        if i % 5 != 4 and i + 1 < len(batches):        # sometimes no (or a wrong) prefetch
            up.prefetch(batches[i + 1], 0)
        elif i % 10 == 9:
            up.prefetch(batches[0], 0)
        elif i % 10 == 4 and i + 1 < len(batches):     # the right rows of another epoch
            up.prefetch(batches[i + 1], 1)
    assert up.get(np.array([], np.int64), 0)[0].shape == (0, *x.shape[1:])
    big = np.arange(50)                                # more rows than announced: grows
    np.testing.assert_array_equal(host(up.get(big, 0)[0]), x[big])
    assert sx.stats["pageable_async"] == 0             # every async upload is from pinned
    assert compute is sx.cuda.get_current_stream()


def test_device_batches_carry_the_epochs_augmentation(sxp):
    """The device gets what the host source makes for (rows, epoch): augmented per epoch."""
    data = load_dataset("digits", dtype="float32")
    x, y = data.train.x, data.train.y
    t = BatchTransform("float32", AugmentSpec(crop_padding=2, flip=True), None, seed=3)
    up = DeviceBatches(GPU, memory_source(x, y, t, 16, background=False), 16)
    rows = np.arange(10, 26)
    for epoch in (0, 1, 0):
        up.prefetch(rows, epoch)
        bx, _ = up.get(rows, epoch)
        np.testing.assert_array_equal(host(bx), t(x[rows], rows, epoch))
    assert not np.array_equal(t(x[rows], rows, 0), t(x[rows], rows, 1))


def test_device_batches_without_their_event_wait_are_caught(sxp, monkeypatch):
    """Negative control: drop the compute stream's wait for the upload; the stand-in sees it."""
    data = load_dataset("digits", dtype="float32")
    up = _uploader(GPU, data.train.x, data.train.y, max_rows=8)
    monkeypatch.setattr(sx.Stream, "wait_event", lambda self, ev: None)
    bx, _ = up.get(np.arange(8), 0)
    with pytest.raises(RuntimeError, match="still queued"):
        bx * 2


def test_cpu_batches_are_a_take_into_two_alternating_buffers():
    data = load_dataset("digits", dtype="float64")
    src = memory_source(data.train.x, data.train.y, BatchTransform("float64"), 30)
    a, _ = src.get(np.arange(30), 0)
    first = a.copy()
    b, yb = src.get(np.arange(30, 60), 0)
    c, _ = src.get(np.arange(60, 90), 0)
    assert np.shares_memory(a, c) and not np.shares_memory(a, b)  # no allocation per step
    np.testing.assert_array_equal(b, data.train.x[30:60])
    np.testing.assert_array_equal(yb, data.train.y[30:60])
    np.testing.assert_array_equal(first, data.train.x[:30])
    assert src.device_rows is None
    src.close()


# -- gradient sync of device buffers -----------------------------------------------------------
class _Later(Request):
    def __init__(self, fn):
        self.fn = fn

    def wait(self):
        self.fn()


def _read_like_mpi(a):
    """What mpi4py does with an object it is given: a buffer, or a CUDA array interface."""
    if isinstance(a, np.ndarray):
        return a
    cai = a.__cuda_array_interface__  # the stand-in raises unless the stream was synced
    dt = np.dtype(cai["typestr"])
    n = math.prod(cai["shape"]) * dt.itemsize
    raw = (ctypes.c_char * n).from_address(cai["data"][0])
    return np.frombuffer(raw, dt).reshape(cai["shape"])


class PartnerComm(LocalComm):
    """Rank 0 of a pretend world of two: the partner adds 0.5 * x + 1 to every sum.

    A reduction reads its input when it starts and writes the result when waited on, as
    MPI may; it records whether it was handed host or device memory, and the order of the
    operations (every rank must start them in the same order).
    """

    size, name = 2, "partner"

    def __init__(self):
        self.handed: list[str] = []
        self.order: list[tuple[str, int]] = []

    def _buf(self, a, op):
        self.handed.append("host" if isinstance(a, np.ndarray) else "device")
        self.order.append((op, a.size))
        return _read_like_mpi(a)

    def allreduce_sum(self, a):
        b = self._buf(a, "allreduce")
        b[...] = 1.5 * b + 1
        return a

    def iallreduce_sum(self, a):
        b = self._buf(a, "iallreduce")
        snap = b.copy()
        return _Later(lambda: b.__setitem__(Ellipsis, 1.5 * snap + 1))

    def bcast(self, a, root=0):
        self._buf(a, "bcast")
        return a


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("overlap,lazy", [(True, False), (True, True), (False, False)])
def test_grad_sync_of_device_buckets_staged_or_direct(sxp, direct, overlap, lazy):
    """lazy: the GPU is behind, so buckets reach MPI only when something waits for them."""
    sx.configure(devices=1, lazy_events=lazy)
    rng = np.random.default_rng(2)
    want = rng.normal(size=101)
    partner = PartnerComm()
    comm = DeviceComm(partner, GPU, direct)
    grads = sx.zeros(101)
    sync = GradSync(comm, grads, bucket_bytes=8 * 13, overlap=overlap)
    side = sx.asarray(np.arange(4.0))
    for _ in range(3):                                # steps reuse the staging buffer
        sync.start()
        for lo, hi in ((0, 10), (10, 40), (40, 41), (41, 101)):  # "backward", in order
            grads[lo:hi] = sx.asarray(want[lo:hi]) * 1.0
            sync.on_ready(hi)
            if lo == 10:                             # a SyncBN-style reduction in between
                comm.allreduce_sum(side)
        sync.finish()
        np.testing.assert_array_equal(host(grads), 1.5 * want + 1)
    # the buckets complete before the side reduction start before it, whenever the GPU
    # gets to them, so every rank calls MPI in the same order
    step = ([("iallreduce", 13)] * 3 + [("allreduce", 4)] + [("iallreduce", 13)] * 4
            + [("iallreduce", 10)]) if overlap else [("allreduce", 4), ("allreduce", 101)]
    assert partner.order == step * 3
    np.testing.assert_array_equal(host(side), 1.5 * (1.5 * (1.5 * np.arange(4.0) + 1) + 1) + 1)
    assert set(partner.handed) == {"device" if direct else "host"}
    assert sx.stats["cai_exports"] == (len(partner.handed) if direct else 0)
    assert sync.calls == (len(sync.buckets) if overlap else 1)
    if not direct:
        assert sx.stats["pageable_async"] == 0
        assert comm.arena.buf is not None and comm.arena.buf.nbytes < 2 * 101 * 8 + 1024


def test_grad_sync_in_one_process_and_device_comm_choice(sxp):
    grads = sx.asarray(np.arange(10.0))
    assert device_comm(LocalComm(), GPU).__class__ is LocalComm  # nothing to move
    sync = GradSync(LocalComm(), grads, bucket_bytes=16)
    sync.start()
    sync.on_ready(10)
    sync.finish()
    assert sync.calls == 0
    np.testing.assert_array_equal(host(grads), np.arange(10.0))
    assert device_comm(PartnerComm(), backend_mod.CPU).__class__ is PartnerComm
    with pytest.raises(UserError, match="needs --device gpu"):
        device_comm(LocalComm(), backend_mod.CPU, nccl=True)


def test_this_mpi_answers_the_cuda_query():
    if mpi4py_missing():
        pytest.skip(mpi4py_missing())
    # the MPI of this environment (PyPI MPICH) answers the query, and is not CUDA-aware
    from mpi4py import MPI
    if "MPICH Version" in MPI.Get_library_version():
        assert device_mod.query_mpi_cuda_support() is False


def test_gpu_aware_mpi_decision(monkeypatch):
    monkeypatch.delenv("MPICH_GPU_SUPPORT_ENABLED", raising=False)
    monkeypatch.delenv("MV2_USE_CUDA", raising=False)

    def decide(setting, reported):
        monkeypatch.setattr(device_mod, "query_mpi_cuda_support", lambda: reported)
        return mpi_takes_device_buffers(setting)[0]

    assert decide("off", True) is False
    assert decide("auto", True) is True
    assert decide("auto", False) is False
    assert decide("auto", None) is False        # the library cannot say: never risk it
    assert decide("on", None) is True           # ... unless the user says so
    with pytest.raises(UserError, match="reports no CUDA support"):
        decide("on", False)                     # a crash avoided, in one line
    monkeypatch.setenv("MPICH_GPU_SUPPORT_ENABLED", "1")
    assert decide("auto", None) is True


def test_nccl_unique_id_survives_the_byte_broadcast():
    uid = tuple(range(-128, 0)) + tuple(range(0, 128))
    data = encode_unique_id(uid)
    assert isinstance(data, bytes) and len(data) == 256
    assert decode_unique_id(data) == uid


# -- the trainer ----------------------------------------------------------------------------------
def _trainer(tmp_path, device, tag, **kw):
    cfg = make_config({"model": "mlp", "dtype": "float64", "batch_size": 40, "epochs": 1,
                       "progress": "off", "run_dir": str(tmp_path / tag), "device": device,
                       "checkpoint_every": "off", **kw})
    t = build_trainer(cfg)
    t.prepare()
    return t


def _steps(t, first, n, meter):
    sampler = t.plan.sampler
    for i in range(first, first + n):
        batch = Batch(0, i, i + 1, sampler.batch(0, i), sampler.batch(0, i + 1), False)
        meter.add(t.step(batch, t.schedule(i)))


def _reduced(t, meter):
    r = meter.reduce(t.comm, t.backend.to_host)
    return r.loss_sum, r.correct, r.samples


@pytest.mark.parametrize("kw", [{}, {"layers": [
    {"type": "conv2d", "filters": 4, "kernel": 3}, {"type": "batchnorm", "sync": True},
    {"type": "relu"}, {"type": "maxpool2d", "pool": 2}, {"type": "flatten"},
    {"type": "dropout", "rate": 0.25}, {"type": "dense", "units": 10}],
    "accum_steps": 2, "optimizer": "sgd", "clip_norm": 0.5},
    {"layers": [*BLOCKS[:-1], {"type": "dense", "units": 10}], "optimizer": "sgd"}],
    ids=["mlp", "conv", "blocks"])
def test_trainer_steps_move_only_the_batch_and_one_scalar(sxp, tmp_path, kw):
    cpu, gpu = _trainer(tmp_path, "cpu", "c", **kw), _trainer(tmp_path, "gpu", "g", **kw)
    assert gpu.backend.is_gpu and gpu.model.params.device.id == 0
    s_cpu, s_gpu = EpochMeter(), EpochMeter()
    _steps(cpu, 0, 1, s_cpu)
    _steps(gpu, 0, 1, s_gpu)                           # warm-up: buffers are made
    sx.reset_stats()
    _steps(cpu, 1, 4, s_cpu)
    _steps(gpu, 1, 4, s_gpu)
    micro = 4 * gpu.cfg.schedule.accum_steps
    # per micro-batch: x, y and the sample indices, from pinned memory; per step one
    # scalar (the non-finite guard); nothing comes back otherwise
    assert sx.stats["h2d"] == 3 * micro
    assert sx.stats["scalar"] == 4
    assert sx.stats["d2h"] == 0 and sx.stats["pageable_async"] == 0
    ref, got = _reduced(cpu, s_cpu), _reduced(gpu, s_gpu)  # metrics read back here, once
    assert ref[:3] == got[:3] and got[2] == 5 * 40 * gpu.cfg.schedule.accum_steps
    assert sx.stats["d2h"] == 1
    np.testing.assert_array_equal(host(gpu.model.params), cpu.model.params)
    for t in (cpu, gpu):
        t.close()


def test_trainer_on_the_stand_in_trains_checkpoints_and_resumes_exactly(sxp, tmp_path, capsys):
    kw = {"max_steps": 6, "checkpoint_every": "3", "optimizer": "adam"}
    cpu = _trainer(tmp_path, "cpu", "cpu", **kw)
    assert cpu.train() == 0
    cpu.close()
    gpu = _trainer(tmp_path, "gpu", "gpu", **kw)
    assert gpu.train() == 0
    gpu.close()
    final = host(gpu.model.params)
    np.testing.assert_array_equal(final, cpu.model.params)
    ck = ckpt.read_file(tmp_path / "gpu" / "checkpoints" / "ckpt-000000006.h5")
    np.testing.assert_array_equal(ckpt.flatten(gpu.model, ck.params), final)
    np.testing.assert_array_equal(ckpt.flatten(gpu.model, ck.optimizer_state["exp_avg"]),
                                  host(gpu.optimizer.state["exp_avg"]))
    metrics = [json.loads(line) for line in (tmp_path / "gpu" / "metrics.jsonl").open()]
    epochs = [m for m in metrics if m.get("event") == "epoch"]
    ref = [json.loads(line) for line in (tmp_path / "cpu" / "metrics.jsonl").open()]
    assert [m["train_loss"] for m in epochs] == [m["train_loss"] for m in ref
                                                 if m.get("event") == "epoch"]
    resumed = _trainer(tmp_path, "gpu", "gpu", **kw,
                       resume=str(tmp_path / "gpu" / "checkpoints" / "ckpt-000000003.h5"))
    assert resumed.state.global_step == 3
    assert resumed.train() == 0
    resumed.close()
    np.testing.assert_array_equal(host(resumed.model.params), final)
    capsys.readouterr()
    said = []
    for dev in ("cpu", "gpu"):                       # `dptrain eval` on the saved model
        assert cli.main(["eval", "--run-dir", str(tmp_path / "gpu"), "--device", dev]) == 0
        said.append(capsys.readouterr().out.split(": ", 1)[1])
    assert said[0] == said[1] and "accuracy" in said[0]


# -- one GPU per rank ---------------------------------------------------------------------------
def test_gpu_assignment_plans():
    one_host = np.zeros(4)
    # plain mpiexec, 4 ranks seeing the same 2 GPUs: 0,1,0,1 and two pairs share
    same = np.zeros(4)
    assert [plan_device(one_host, same, r, 2) for r in range(4)] == [0, 1, 0, 1]
    # per-task binding: every rank sees its own GPU (even when each calls it device 0)
    own = np.arange(4.0)
    assert [plan_device(one_host, own, r, 1) for r in range(4)] == [0, 0, 0, 0]
    # two hosts, two ranks and two GPUs each
    hosts = np.array([1.0, 1.0, 2.0, 2.0])
    sets = np.array([5.0, 5.0, 6.0, 6.0])
    assert [plan_device(hosts, sets, r, 2) for r in range(4)] == [0, 1, 0, 1]
    assert sharing_groups(np.array([3.0, 4.0, 3.0, 5.0])) == [[0, 2]]
    assert sharing_groups(np.array([3.0, 4.0])) == []


def test_node_local_rank_from_the_launcher_only_where_mpi_sees_less():
    assert node_local_rank(1, 4, {"SLURM_LOCALID": "3"}) == (1, 4)    # MPI knows better
    env = {"SLURM_LOCALID": "2", "SLURM_STEP_TASKS_PER_NODE": "4(x2),3", "SLURM_NODEID": "2"}
    assert node_local_rank(0, 1, env) == (2, 3)
    assert node_local_rank(0, 1, {"OMPI_COMM_WORLD_LOCAL_RANK": "1",
                                  "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == (1, 2)
    assert node_local_rank(0, 1, {}) == (0, 1)
    assert slurm_tasks_on_node("2(x3),1", 3) == 1 and slurm_tasks_on_node("x", 0) is None


def test_select_backend_binds_the_local_rank_to_its_gpu(sxp, monkeypatch, tmp_path):
    sx.configure(devices=2)
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2")
    monkeypatch.delenv("SLURM_STEP_TASKS_PER_NODE", raising=False)
    monkeypatch.delenv("SLURM_NODEID", raising=False)
    # a whole run on device 1: any array made before the device was chosen would fail
    t = _trainer(tmp_path, "gpu", "d1", max_steps=2)
    assert t.backend.device_id == 1 and t.model.params.device.id == 1
    assert t.train() == 0
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "3")   # 3 ranks, 2 GPUs
    with pytest.raises(UserError, match="3 ranks on this node but 2 visible"):
        select_backend("gpu")
    assert select_backend("gpu", allow_sharing=True).device_id == 1
    sx.configure(devices=0)
    with pytest.raises(UserError, match="found no GPU"):
        select_backend("gpu")
    assert select_backend("auto") is backend_mod.CPU


def test_device_gpu_without_cupy_is_a_one_line_error(tmp_path, tiny_args):
    if backend_mod._import_cupy() is not None:
        pytest.skip("CuPy is installed here")
    assert select_backend("auto") is backend_mod.CPU
    r = run_dptrain([*tiny_args, "--device", "gpu"])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dptrain: error: --device gpu: CuPy")
    assert "pip install" in lines[0]
    bad = run_dptrain([*tiny_args, "--gpu-aware-mpi", "maybe"])
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.mpi
def test_two_ranks_on_the_stand_in_match_cpu_staged_and_direct(tmp_path):
    script = ROOT / "tests" / "mpi_scripts" / "device_check.py"
    r = subprocess.run(mpi_cmd(2, [str(script), str(tmp_path)]), capture_output=True,
                       text=True, timeout=HANG_GUARD, env=child_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report.{k}.json").read_text()) for k in range(2)]
    for rank, rep in enumerate(reports):
        assert rep["rank_device"] == [rank, rank]          # one GPU per rank
        assert rep["staged_equal"] and rep["direct_equal"] and rep["resumed_equal"]
        assert rep["staged_stats"].get("cai_exports", 0) == 0   # MPI never saw device memory
        assert rep["staged_stats"].get("pageable_async", 0) == 0
        assert rep["direct_stats"]["cai_exports"] > 0       # ... and here it did
        assert "staged" in rep["transport_staged"] and "CUDA-aware" in rep["transport_direct"]
        assert rep["sharing_error"].startswith("more ranks than GPUs: ranks 0,1")
        assert rep["shared_device"] == 0


# -- scripts/gpu_check.py -------------------------------------------------------------------------
def test_gpu_check_fails_cleanly_without_a_gpu():
    if backend_mod._import_cupy() is not None:
        pytest.skip("CuPy is installed here")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")],
                       capture_output=True, text=True, timeout=HANG_GUARD, env=child_env(),
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error:"), r.stderr


def test_gpu_check_logic_on_the_stand_in(sxp, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    code = gpu_check.main(["--bench-steps", "1", "--epoch-steps", "2", "--bench-batch", "8",
                           "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 steps on gpu and cpu: max relative difference 0.0e+00 (limit 1e-09) PASS" in out
    assert re.search(r"batch 8 per rank, 1 rank\(s\): gpu \d+ samples/s, cpu \d+ samples/s", out)


# -- the stand-in against the real CuPy ------------------------------------------------------------
#: what dist/nccl.py takes from ``cupy.cuda.nccl`` (the stand-in has no NCCL)
NCCL_NAMES = ("get_unique_id", "NcclCommunicator", "NcclCommunicator.allReduce",
              "NcclCommunicator.bcast", "NCCL_FLOAT32", "NCCL_FLOAT64", "NCCL_INT64",
              "NCCL_SUM")


def _resolve(root, path):
    """``root.a.b.c`` for ``a.b.c``, or None where any step is missing."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _keywords_refused(fn, keywords):
    """The keywords ``fn`` would refuse, where its signature can be read (else none)."""
    if type(fn).__name__ == "ufunc":            # CuPy's elementwise functions
        return [k for k in keywords if k not in ("out", "dtype", "casting")]
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):             # compiled: Cython's embedded signature
        m = re.match(r"[\w.]+\((.*)\)", (getattr(fn, "__doc__", None) or "").split("\n")[0])
        if m is None:
            return []
        names = [a.split("=")[0].strip(" *") for a in m.group(1).split(",")]
        return [k for k in keywords if k not in names]
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []
    return [k for k in keywords if k not in params]


def test_every_cupy_name_dptrain_uses_exists_in_the_real_cupy(sxp, tmp_path, capsys):
    """Runs layers, losses, optimizers, device sync, training, checkpoint, resume and eval
    on the stand-in, recording every CuPy name they touch, and looks each up in the real
    CuPy (with the keyword arguments passed, where CuPy's signature says). Needs CuPy
    installed (no GPU: the lookups never touch a device)."""
    real = _real_cupy()
    sx.used.clear()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 9, 7, 2)), rng.integers(0, 5, size=4)
    for loss_name, softmax in (("cross_entropy", False), ("cross_entropy_probs", True),
                               ("mse", False)):
        _pass(sx, KITCHEN_SINK + ([{"type": "softmax"}] if softmax else []), loss_name, x, y,
              accumulate_twice=True)
    _pass(sx, BLOCKS, "cross_entropy", rng.normal(size=(4, 8, 8, 2)), y, accumulate_twice=True)
    for name, kw in (("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
                     ("adamw", {"weight_decay": 0.1})):
        params, g = sx.asarray(rng.normal(size=20)), sx.asarray(rng.normal(size=20))
        opt = make_optimizer(name, params, g, sx, decay_mask=np.ones(20), **kw)
        clip_grad_norm(g, 0.5, sx)
        opt.step(0.1)
    for direct in (False, True):
        grads = sx.asarray(rng.normal(size=30))
        sync = GradSync(DeviceComm(PartnerComm(), GPU, direct), grads, bucket_bytes=80)
        sync.start()
        sync.on_ready(30)
        sync.finish()
    kw = {"max_steps": 4, "checkpoint_every": "2", "optimizer": "adam", "layers": [
        {"type": "conv2d", "filters": 2, "kernel": 3}, {"type": "batchnorm"},
        {"type": "relu"}, {"type": "maxpool2d", "pool": 2}, {"type": "flatten"},
        {"type": "dropout", "rate": 0.25}, {"type": "dense", "units": 10}]}
    for resume in ("", str(tmp_path / "gpu" / "checkpoints" / "ckpt-000000002.h5")):
        t = _trainer(tmp_path, "gpu", "gpu", **kw, **({"resume": resume} if resume else {}))
        assert t.train() == 0
        t.close()
    assert cli.main(["eval", "--run-dir", str(tmp_path / "gpu"), "--device", "gpu"]) == 0
    capsys.readouterr()

    used = sorted(sx.used)
    # the record is real: the names the GPU path is built on were all seen
    for name in ("matmul", "asnumpy", "cuda.Stream", "cuda.Stream.synchronize",
                 "cuda.Event.record", "cuda.alloc_pinned_memory", "ndarray.get",
                 "ndarray.set"):
        assert name in used, name
    assert len(used) > 60, used
    missing = [n for n in used if "(" not in n and _resolve(real, n) is None]
    refused = [f"{n}: {bad}" for n in used if "(" in n
               for fn in [_resolve(real, n.split("(")[0])] if fn is not None
               for bad in [_keywords_refused(fn, n[n.index("(") + 1:-1].split(","))] if bad]
    assert not missing and not refused, (missing, refused)
    nccl = _real_nccl()
    if nccl is not None and getattr(nccl, "available", False):  # libnccl found
        assert [n for n in NCCL_NAMES if _resolve(nccl, n) is None] == []


def _real_cupy():
    """The installed CuPy (the test is skipped without one)."""
    spec = importlib.util.find_spec("cupy")
    if spec is None:
        pytest.skip("CuPy is not installed: pip install 'dptrain[cuda12]' to check the "
                    "stand-in against it")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("cupy")


def _real_nccl():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module("cupy.cuda.nccl")
        except ImportError:
            return None
