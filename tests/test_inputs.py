"""The [data] options in one process: the loader auto choice and its start line, one-line
errors for options that cannot apply, the step's data time, the debug gradient check on
normalised inputs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_dptrain

from dptrain.config import make_config
from dptrain.data.source import RowSource
from dptrain.data.writer import save_hdf5
from dptrain.training import Batch, build_trainer
from dptrain.training import inputs as inputs_mod


def one_line_error(proc, fragment: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dptrain: error: "), proc.stderr
    assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (200, 6, 6, 2), dtype=np.uint8)
    y = rng.integers(0, 4, 200)
    return save_hdf5(tmp_path_factory.mktemp("d") / "small.h5",
                     {"train": (x[:160], y[:160]), "test": (x[160:], y[160:])},
                     {"num_classes": 4}, chunk_rows=None, compress=False)


def cfg(tmp_path: Path, images: Path, **kw):
    return make_config({"dataset": str(images), "model": "mlp", "batch_size": 32,
                        "epochs": 1, "progress": "off", "checkpoint_every": "off",
                        "run_dir": str(tmp_path / "run"), **kw})


@pytest.mark.parametrize("available,mode", [(1 << 40, "memory"), (20_000, "stream")])
def test_auto_holds_the_data_in_memory_when_it_fits_and_says_why(tmp_path, images,
                                                                 monkeypatch, available, mode):
    monkeypatch.setattr(inputs_mod, "mem_available", lambda: (available, "MemAvailable"))
    t = build_trainer(cfg(tmp_path, images))
    line = t.data.describe().splitlines()[0]
    assert f"loader auto -> {mode}" in line and "MemAvailable" in line
    assert ("streamed from" in line) == (mode == "stream")
    # 200 samples of 72 bytes and their int64 labels: 16,000 bytes weighed
    assert "the data needs 16 KiB" in line
    assert isinstance(t.step.source, RowSource)
    reader = t.step.source.reader
    assert type(reader).__name__ == ("H5Rows" if mode == "stream" else "ArrayRows")
    t.close()


BAD = [
    (["--dataset", "synthetic", "--loader", "stream"], "loader stream reads HDF5 files"),
    (["--dataset", "synthetic", "--synthetic-shape", "64", "--augment-flip"],
     "augmentation (augment_crop, augment_flip, augment_erase) needs image samples"),
    (["--augment-erase-area", "0.5,0.2"],
     "augment_erase_area must be two numbers low,high with 0 < low <= high <= 1"),
    (["--augment-erase-ratio", "0,3"], "augment_erase_ratio must be two numbers"),
    (["--augment-erase", "1.5"], "augment_erase must be 0 to 1, not 1.5"),
    (["--augment-crop", "-1"], "augment_crop must be 0 to 4096, not -1"),
    (["--normalize", "mean"], "'normalize' must be one of none, channel, not 'mean'"),
    (["--loader", "disk"], "'loader' must be one of auto, memory, stream, not 'disk'"),
    (["--dataset", "fashion_mnist", "--data-dir", "/nonexistent/fashion"],
     "Fashion-MNIST not found: no directory /nonexistent/fashion"),
]


@pytest.mark.parametrize("extra,fragment", BAD)
def test_options_that_cannot_apply_are_one_line_errors(tmp_path, extra, fragment):
    proc = run_dptrain(["--run-dir", str(tmp_path / "run"), "--model", "mlp", "--epochs", "1",
                        "--progress", "off", *extra], timeout=120)
    one_line_error(proc, fragment)
    assert not (tmp_path / "run").exists()


class SlowRows:
    """A row reader that takes ``delay`` seconds per read (a slow disk)."""

    def __init__(self, x: np.ndarray, delay: float) -> None:
        self.x, self.delay = x, delay
        self.sample_shape, self.dtype = x.shape[1:], x.dtype

    def __len__(self) -> int:
        return len(self.x)

    def read(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)
        out[:len(rows)] = self.x[rows]
        return out[:len(rows)]


def test_the_steps_data_time_is_the_time_it_waited_for_its_batch(tmp_path, images):
    t = build_trainer(cfg(tmp_path, images, prefetch="off"))
    old = t.step.source
    delay = 0.05
    t.step.source = RowSource(SlowRows(old.reader.x, delay), old.y, old.transform, 32,
                              background=False)
    sampler = t.plan.sampler
    for i in range(3):
        rep = t.step(Batch(0, i, i + 1, sampler.batch(0, i), sampler.batch(0, i + 1), False),
                     1e-3)
        # without prefetch, get reads the batch: the wait is at least the slow read
        assert rep.times["data"] >= delay
    t.step.source.close()
    t.close()


def test_prefetch_time_counts_as_data_time_not_backward(tmp_path, images):
    """A synchronous prefetch (no thread) reads during the step: that is data time."""
    t = build_trainer(cfg(tmp_path, images, prefetch="off"))
    old = t.step.source
    delay = 0.05

    class Eager(RowSource):
        def prefetch(self, rows, epoch):  # reads now, in the step's thread
            self.get(rows, epoch)

    t.step.source = Eager(SlowRows(old.reader.x, delay), old.y, old.transform, 32,
                          background=False)
    sampler = t.plan.sampler
    rep = t.step(Batch(0, 0, 1, sampler.batch(0, 0), sampler.batch(0, 1), False), 1e-3)
    assert rep.times["data"] >= 2 * delay       # its own get and the next one's read
    t.step.source.close()
    t.close()


def test_debug_gradient_check_runs_on_normalised_inputs(tmp_path, images):
    proc = run_dptrain(["--dataset", str(images), "--model", "mlp", "--epochs", "1",
                        "--max-steps", "1", "--debug", "--normalize", "channel",
                        "--augment-flip", "--dtype", "float64", "--progress", "off",
                        "--run-dir", str(tmp_path / "run")], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "debug: gradient check on 4 samples" in proc.stdout and "(ok:" in proc.stdout
    rec = json.loads((tmp_path / "run" / "data.json").read_text())
    assert rec["augment"]["flip"] is True and len(rec["normalize"]["mean"]) == 2


def test_normalised_batches_wait_for_the_settled_statistics(tmp_path, images):
    """Before prepare() the statistics are not known: a step refuses instead of training
    on unnormalised inputs; after it, batches are (x / 255 - mean) / std."""
    t = build_trainer(cfg(tmp_path, images, normalize="channel", prefetch="off"))
    sampler = t.plan.sampler
    batch = Batch(0, 0, 1, sampler.batch(0, 0), sampler.batch(0, 1), False)
    with pytest.raises(RuntimeError, match="call trainer.prepare"):
        t.step(batch, 1e-3)
    t.data.settle(t.comm, None)
    with h5py.File(images, "r") as f:
        raw = f["train/x"][()]
    x = raw.astype(np.float64) / 255
    mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
    np.testing.assert_allclose(t.data.stats.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(t.data.stats.std, std, rtol=1e-12)
    rows = sampler.batch(0, 0)
    got, _ = t.step.source.get(rows, 0)
    f32 = np.float32
    want = (raw[rows].astype(f32) / f32(255) - mean.astype(f32)) / std.astype(f32)
    np.testing.assert_array_equal(got, want)
    t.close()
