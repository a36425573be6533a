"""BatchNorm refuses to train on one value per channel (PyTorch refuses too), counting
the global batch when synchronised so that every rank refuses together, and this rank's
shard otherwise, where an empty shard is fine."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import run_dptrain
from gradcheck import bind

from dptrain.errors import UserError
from dptrain.nn import Context
from dptrain.nn.norm import BatchNorm

ONE = ("needs at least 2 values per channel, but {where} gives 1 (1 sample(s) of 1 "
       "position(s)); use a larger batch")


def _layer(shape, sync=False, name="03_batchnorm"):
    layer = bind(BatchNorm(sync=sync, momentum=0.5), shape, randomize=True)
    layer.name = name
    return layer


def test_one_sample_of_one_position_is_refused_and_changes_nothing() -> None:
    layer = _layer((3,))
    state = {k: v.copy() for k, v in layer.state.items()}
    x = np.array([[1.0, 2.0, 3.0]])
    with pytest.raises(UserError) as e:
        layer.forward(x, Context(training=True))
    msg = str(e.value)
    assert msg.startswith("layer 03_batchnorm: BatchNorm in training ")
    assert ONE.format(where="this rank's shard of the batch (sync=false normalises each "
                            "rank's shard on its own)") + " or sync=true" in msg
    assert "\n" not in msg and not getattr(e.value, "agreed", False)
    for k, v in layer.state.items():
        np.testing.assert_array_equal(v, state[k])
    # evaluation of one sample uses the running statistics: fine
    y = layer.forward(x, Context(training=False))
    g, b = layer.params["gamma"], layer.params["beta"]
    rm, rv = layer.state["running_mean"], layer.state["running_var"]
    np.testing.assert_allclose(y, (x - rm) / np.sqrt(rv + 1e-5) * g + b, rtol=1e-12)


def test_one_sample_with_several_positions_trains() -> None:
    """One image of 2x2 positions holds 4 values per channel: statistics over those,
    running variance with the unbiased 4/3 (as PyTorch's BatchNorm2d)."""
    layer = _layer((2, 2, 3))
    rv0 = layer.state["running_var"].copy()
    x = np.random.default_rng(0).standard_normal((1, 2, 2, 3))
    y = layer.forward(x, Context(training=True))
    x2 = x.reshape(-1, 3)
    xhat = (x2 - x2.mean(0)) / np.sqrt(x2.var(0) + 1e-5)
    np.testing.assert_allclose(y.reshape(-1, 3),
                               xhat * layer.params["gamma"] + layer.params["beta"],
                               rtol=1e-12)
    np.testing.assert_allclose(layer.state["running_var"],
                               0.5 * rv0 + 0.5 * x2.var(0, ddof=1), rtol=1e-12)


def test_an_empty_shard_without_sync_contributes_nothing() -> None:
    layer = _layer((3,))
    state = {k: v.copy() for k, v in layer.state.items()}
    ctx = Context(training=True, sample_index=np.zeros(0, np.int64), global_batch=5)
    y = layer.forward(np.zeros((0, 3)), ctx)
    assert y.shape == (0, 3)
    dx = layer.backward(np.zeros((0, 3)), ctx)
    assert dx.shape == (0, 3)
    for k, v in layer.state.items():
        np.testing.assert_array_equal(v, state[k])
    for g in layer.grads.values():
        np.testing.assert_array_equal(g, 0)


def _two_ranks(parts, global_batch):
    """Forward of a synchronised BatchNorm on two threads acting as ranks: each rank's
    exception (or None) and the number of reductions it made."""
    barrier = threading.Barrier(2, timeout=10)
    slots: list = [None, None]
    calls, errors = [0, 0], [None, None]

    def reducer(r):
        def allreduce_sum(a):
            calls[r] += 1
            slots[r] = a.copy()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            a[...] = total
            return a
        return allreduce_sum

    def rank(r):
        layer = _layer((3,), sync=True)
        ctx = Context(training=True, allreduce_sum=reducer(r), global_batch=global_batch)
        try:
            layer.forward(parts[r], ctx)
        except UserError as e:
            errors[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a rank was left waiting"
    return errors, calls


@pytest.mark.parametrize("global_batch,reductions", [(1, 0), (None, 1)],
                         ids=["global-batch-known", "counted-by-reduction"])
def test_sync_counts_the_global_batch_and_every_rank_refuses(global_batch, reductions) -> None:
    """One sample on rank 0, none on rank 1: both ranks refuse with the same agreed
    error, at the same point (before any reduction when the global batch is known)."""
    errors, calls = _two_ranks([np.ones((1, 3)), np.zeros((0, 3))], global_batch)
    assert all(isinstance(e, UserError) for e in errors), errors
    assert str(errors[0]) == str(errors[1])
    assert ONE.format(where="the global batch") in str(errors[0])
    assert all(getattr(e, "agreed", False) for e in errors)
    assert calls == [reductions, reductions]


def test_sync_one_sample_per_rank_is_two_values_and_trains() -> None:
    errors, calls = _two_ranks([np.ones((1, 3)), np.zeros((1, 3))], 2)
    assert errors == [None, None] and calls == [2, 2]


DENSE_BN = [{"type": "flatten"}, {"type": "dense", "units": 8},
            {"type": "batchnorm", "sync": True}, {"type": "relu"}, {"type": "dense", "units": 10}]


def _args(tmp_path: Path) -> list[str]:
    return ["--layers", json.dumps(DENSE_BN), "--batch-size", "1", "--max-steps", "2",
            "--progress", "off", "--run-dir", str(tmp_path / "run")]


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_cli_refuses_a_global_batch_of_one(tmp_path: Path) -> None:
    line = _one_error_line(run_dptrain(_args(tmp_path)))
    assert line == ("dptrain: error: layer 02_batchnorm: BatchNorm in training "
                    + ONE.format(where="the global batch"))


@pytest.mark.mpi
def test_cli_two_ranks_refuse_together_in_one_line(tmp_path: Path) -> None:
    """Global batch 1 on 2 ranks with sync=true: the ranks agree, rank 0 prints once,
    every rank exits with 2 (no abort)."""
    line = _one_error_line(run_dptrain(_args(tmp_path), n=2, timeout=120))
    assert line == ("dptrain: error: layer 02_batchnorm: BatchNorm in training "
                    + ONE.format(where="the global batch"))
