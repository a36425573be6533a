"""Inference: ``dptrain.load_model(path).predict`` (probabilities from logits or from a
softmax model, values of a regression, stored uint8 inputs decoded as in training, the
stored normalisation applied, model.h5 and checkpoints alike) and ``dptrain predict``
(HDF5 and npz inputs streamed in batches, the same numbers as the Python API, atomic
output, one-line errors for every bad input)."""

from __future__ import annotations

import json
import os
import zipfile

import h5py
import numpy as np
import pytest
from comfort_runs import events, one_error, train
from conftest import run_dptrain

import dptrain
from dptrain import checkpoint as ckpt
from dptrain.data import load_dataset
from dptrain.data.array_file import open_array
from dptrain.errors import UserError
from dptrain.nn import Context, Sequential


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("inference") / "run"
    train(run, ["--epochs", "2"])
    return run


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _logits(path, x):
    """The stored model's outputs, rebuilt here from the file by hand."""
    ck = ckpt.read_file(path)
    model = Sequential.from_spec(ck.architecture)
    ckpt.load_into(model, ck, path)
    return model.forward(np.asarray(x, model.dtype), Context(xp=np, training=False))


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_probabilities_are_the_softmax_of_the_logits(trained, digits):
    model = dptrain.load_model(trained / "model.h5")
    x = digits.test.x
    probs = model.predict(x, batch_size=7)  # 360 = 51 * 7 + 3: a short last batch
    assert model.kind == "probabilities" and probs.shape == (360, 10)
    np.testing.assert_allclose(probs, _softmax(_logits(trained / "model.h5", x)), rtol=1e-12)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    # the accuracy of the predictions is the one the run reported for its last epoch
    last = events(trained, "epoch")[-1]
    assert (probs.argmax(axis=1) == digits.test.y).mean() == last["test_acc"]
    top = model.top_classes(probs, 3)
    assert top.shape == (360, 3) and (top[:, 0] == probs.argmax(axis=1)).all()
    assert (np.take_along_axis(probs, top, 1)[:, :-1] >=
            np.take_along_axis(probs, top, 1)[:, 1:]).all()


def test_a_checkpoint_predicts_like_model_h5(trained, digits):
    final = ckpt.list_checkpoints(trained)[0]
    a = dptrain.load_model(final).predict(digits.test.x[:50])
    b = dptrain.load_model(trained / "model.h5").predict(digits.test.x[:50])
    np.testing.assert_array_equal(a, b)


def test_uint8_inputs_are_scaled_as_in_training(trained, digits):
    model = dptrain.load_model(trained / "model.h5")
    raw = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    np.testing.assert_array_equal(model.predict(raw), model.predict(raw / 255.0))


def test_a_model_ending_in_softmax_is_not_softmaxed_twice(tmp_path, digits):
    run = tmp_path / "run"
    layers = [{"type": "flatten"}, {"type": "dense", "units": 10}, {"type": "softmax"}]
    train(run, ["--epochs", "1", "--layers", json.dumps(layers), "--loss",
                "cross_entropy_probs"])
    probs = dptrain.load_model(run / "model.h5").predict(digits.test.x[:30])
    np.testing.assert_array_equal(probs, _logits(run / "model.h5", digits.test.x[:30]))


def test_a_regression_model_gives_its_values(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((120, 4))
    y = (x @ np.array([0.5, -1.0, 2.0, 0.1]))[:, None]  # (N, 1) float targets
    data = tmp_path / "reg.npz"
    np.savez(data, x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=y[100:])
    run = tmp_path / "run"
    train(run, ["--epochs", "2", "--dataset", str(data), "--loss", "mse", "--layers",
                json.dumps([{"type": "dense", "units": 1}])])
    model = dptrain.load_model(run / "model.h5")
    values = model.predict(x[100:])
    assert model.kind == "values" and values.shape == (20, 1)
    np.testing.assert_array_equal(values, _logits(run / "model.h5", x[100:]))


def _with_normalization(src, dst, mean, std):
    """A copy of a model file that records per-channel normalisation (as training with
    normalisation writes it), resealed."""
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as f:
        f.attrs["data"] = json.dumps({"normalize": {"mean": mean, "std": std, "count": 1437}})
    ckpt.seal(dst, "model")


def test_the_stored_normalisation_is_applied(trained, digits, tmp_path):
    norm = tmp_path / "norm.h5"
    _with_normalization(trained / "model.h5", norm, [0.3], [0.4])
    x = digits.test.x[:40].astype(np.float64)  # the model's dtype: no float32 rounding
    got = dptrain.load_model(norm).predict(x)
    want = dptrain.load_model(trained / "model.h5").predict((x - 0.3) / 0.4)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    bad = tmp_path / "bad.h5"
    _with_normalization(trained / "model.h5", bad, [0.3], [0.0])
    with pytest.raises(UserError, match="std > 0"):
        dptrain.load_model(bad)


def test_bad_inputs_to_predict_are_user_errors(trained):
    model = dptrain.load_model(trained / "model.h5")
    with pytest.raises(UserError, match=r"inputs of shape \(3, 8, 8\) do not match"):
        model.predict(np.zeros((3, 8, 8)))
    x = np.zeros((5, 8, 8, 1))
    x[3, 2, 2, 0] = np.nan
    with pytest.raises(UserError, match="input sample 3 holds NaN or Inf"):
        model.predict(x, batch_size=2)
    with pytest.raises(UserError, match="batch_size must be a positive whole number"):
        model.predict(x[:2], batch_size=0)
    with pytest.raises(UserError, match="checkpoint not found"):
        dptrain.load_model(trained / "nothing.h5")


# -- reading inputs in slices -----------------------------------------------------------
@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_arrays_stream_in_slices(tmp_path, save):
    a = np.arange(7 * 3 * 2, dtype=np.float32).reshape(7, 3, 2)
    path = tmp_path / "a.npz"
    save(path, x=a, other=np.zeros(2))
    with open_array(path, "x") as arr:
        assert arr.shape == (7, 3, 2) and len(arr) == 7
        parts = [arr.read(s, min(s + 3, 7)) for s in range(0, 7, 3)]
        np.testing.assert_array_equal(np.concatenate(parts), a)
        np.testing.assert_array_equal(arr.read(1, 2), a[1:2])   # back again
        np.testing.assert_array_equal(arr.read(5, 7), a[5:7])   # and skipping ahead


# -- the command --------------------------------------------------------------------------
def _inputs(tmp_path, x):
    h5, npz = tmp_path / "in.h5", tmp_path / "in.npz"
    with h5py.File(h5, "w") as f:
        f.create_dataset("test/x", data=x, chunks=(min(16, len(x)), *x.shape[1:]))
    np.savez_compressed(npz, samples=x)
    return h5, npz


def test_predict_command_writes_every_sample(trained, digits, tmp_path):
    x = digits.test.x
    h5, npz = _inputs(tmp_path, x)
    want = dptrain.load_model(trained / "model.h5").predict(x)
    for src, key in ((h5, "test/x"), (npz, "samples")):
        out = tmp_path / f"preds-{src.suffix[1:]}.h5"
        proc = run_dptrain(["predict", "--model", str(trained / "model.h5"), "--input",
                            str(src), "--key", key, "--output", str(out), "--batch-size",
                            "50", "--top-k", "3"], timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f"probabilities of 360 samples from {src}:{key}" in proc.stdout
        with h5py.File(out, "r") as f:
            np.testing.assert_array_equal(f["probabilities"][()], want)
            np.testing.assert_array_equal(f["top_classes"][()],
                                          np.argsort(-want, axis=1, kind="stable")[:, :3])
            assert f.attrs["kind"] == "probabilities" and f.attrs["samples"] == 360
        assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _object_npz(path):
    """An npz whose member is an object array (pickled): it must be refused unread."""
    with zipfile.ZipFile(path, "w") as z, z.open("x.npy", "w") as f:
        np.lib.format.write_array(f, np.array([{"a": 1}, None], dtype=object),
                                  allow_pickle=True)
    return path


def _npz(path, key="x", **arrays):
    np.savez(path, **arrays)
    return {"src": path, "key": key}


#: each bad case: what it changes of (model, src, key, out), given tmp_path, the inputs x
#: and their HDF5 file
CASES = {
    "missing": (lambda t, x, h5: {"src": t / "none.h5"}, "input file not found"),
    "suffix": (lambda t, x, h5: {"src": _text(t / "x.csv")}, "unsupported file type '.csv'"),
    "key": (lambda t, x, h5: {"key": "x"}, "'x' is not in it; its arrays: test/x"),
    "shape": (lambda t, x, h5: _npz(t / "s.npz", x=np.zeros((4, 8, 8))),
              "do not match the model's input shape (8, 8, 1)"),
    "nan": (lambda t, x, h5: _npz(t / "n.npz", x=_with_inf(x, 17)),
            "input sample 17 holds NaN or Inf"),
    "object": (lambda t, x, h5: {"src": _object_npz(t / "o.npz"), "key": "x"},
               "holds Python objects; only numeric arrays are read"),
    "strings": (lambda t, x, h5: _npz(t / "t.npz", x=np.array(["a", "b"])),
                "holds <U1, not numbers"),
    "empty": (lambda t, x, h5: _npz(t / "e.npz", x=np.zeros((0, 8, 8, 1))),
              "holds no samples"),
    "outdir": (lambda t, x, h5: {"out": t / "no" / "preds.h5"}, "does not exist"),
    "same": (lambda t, x, h5: {"out": h5}, "is the file read from"),
    "outsuffix": (lambda t, x, h5: {"out": t / "preds.csv"}, "name it .h5"),
    "model": (lambda t, x, h5: {"model": h5}, "an HDF5 file without a dptrain header"),
}


def _text(path):
    path.write_text("1,2\n")
    return path


def _with_inf(x, row):
    x = x.copy()
    x[row, 0, 0, 0] = np.inf
    return x


@pytest.mark.parametrize("case", sorted(CASES))
def test_predict_command_refuses_bad_input_in_one_line(trained, digits, tmp_path, case):
    x = digits.test.x[:40]
    h5, _ = _inputs(tmp_path, x)
    make, part = CASES[case]
    a = {"model": trained / "model.h5", "src": h5, "key": "test/x",
         "out": tmp_path / "preds.h5", **make(tmp_path, x, h5)}
    proc = run_dptrain(["predict", "--model", str(a["model"]), "--input", str(a["src"]),
                        "--key", a["key"], "--output", str(a["out"]), "--batch-size", "16"],
                       timeout=120)
    one_error(proc, part)
    if case != "same":
        assert not a["out"].exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.mpi
def test_predict_under_mpiexec_is_one_line_from_one_rank(trained, digits, tmp_path):
    h5, _ = _inputs(tmp_path, digits.test.x[:10])
    proc = run_dptrain(["predict", "--model", str(trained / "model.h5"), "--input", str(h5),
                        "--key", "test/x", "--output", str(tmp_path / "p.h5")], n=2,
                       timeout=120)
    one_error(proc, "predict runs in one process")


class _Recorder:
    """An input that records every slice read from it."""

    def __init__(self, x):
        self.x, self.reads = x, []

    def __len__(self):
        return len(self.x)

    def read(self, start, stop):
        self.reads.append((start, stop))
        return self.x[start:stop]


def test_predict_streams_the_input_a_batch_at_a_time(trained, digits, tmp_path):
    """Never more than one batch of the input is read at once, in order, each row once."""
    import argparse  # noqa: PLC0415

    from dptrain.commands.predict import write_predictions  # noqa: PLC0415

    src = _Recorder(digits.test.x)
    args = argparse.Namespace(batch_size=64, top_k=5, model="m", input="i", key="x")
    predictor = dptrain.load_model(trained / "model.h5")
    assert write_predictions(tmp_path / "p.h5", predictor, src, args) == 360
    assert src.reads == [(s, min(s + 64, 360)) for s in range(0, 360, 64)]
    with h5py.File(tmp_path / "p.h5") as f:
        np.testing.assert_array_equal(f["probabilities"][()], predictor.predict(digits.test.x))


def test_a_run_trained_with_normalisation_predicts_from_raw_inputs(digits, tmp_path):
    """Training with per-channel statistics stores them in model.h5; predict applies them,
    and its accuracy is the one the run's own (normalised) evaluation reported."""
    run = tmp_path / "run"
    train(run, ["--epochs", "1", "--normalize", "channel"])
    stats = json.loads((run / "data.json").read_text())["normalize"]
    assert ckpt.read_file(run / "model.h5").data["normalize"] == stats
    x = digits.test.x.astype(np.float64)
    probs = dptrain.load_model(run / "model.h5").predict(x)
    normalised = (x - np.asarray(stats["mean"])) / np.asarray(stats["std"])
    np.testing.assert_allclose(probs, _softmax(_logits(run / "model.h5", normalised)),
                               rtol=1e-9)
    accuracy = float((probs.argmax(axis=1) == digits.test.y).mean())
    assert accuracy == pytest.approx(events(run, "epoch")[-1]["test_acc"], abs=1e-12)
