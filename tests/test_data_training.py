"""Training through the data pipeline, on the command line: both loaders (in memory, one
copy per node; streamed from HDF5) with augmentation and normalisation on.

- world-size invariance at 1 to 4 ranks (float64, <= 1e-10), and the two loaders give
  the same bytes at each world size; a directory of shards trains as the one file does;
- a mid-epoch stop (--max-steps) and --resume auto end bit-exact with an uninterrupted
  run, for both loaders; the statistics a resumed run uses are the checkpoint's;
- a dataset file that changed under a resumed run is named (exit 2, nothing on disk
  changed), or, with --allow-config-change, a warning;
- ``dptrain eval`` normalises as training did (the same figures as the run's last
  evaluation, and not those of unnormalised inputs);
- a slice of the real Fashion-MNIST trains.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from ckpt_runs import assert_identical
from conftest import run_dptrain
from refused import assert_one_error as one_error
from refused import snapshot as tree
from test_mpi_equivalence import read_params, rel_diff

from dptrain import checkpoint as ckpt
from dptrain.data.writer import save_hdf5

pytestmark = pytest.mark.mpi

SHAPE, CLASSES, N_TRAIN, N_TEST = (8, 8, 3), 5, 480, 120
#: a conv net with dropout: masks and augmentation both depend on the sample index
LAYERS = [{"type": "conv2d", "filters": 4, "kernel": 3, "padding": "same"},
          {"type": "relu"}, {"type": "maxpool2d", "pool": 2}, {"type": "flatten"},
          {"type": "dropout", "rate": 0.2}, {"type": "dense", "units": CLASSES}]
AUGMENT = ["--augment-crop", "2", "--augment-flip", "--augment-erase", "0.5"]
#: 480 samples, batch 50: 10 steps an epoch, the last of 30 samples; 50 is divisible by
#: neither 3 nor 4
COMMON = ["--layers", json.dumps(LAYERS), "--dtype", "float64", "--batch-size", "50",
          "--progress", "off", "--seed", "5", "--normalize", "channel", *AUGMENT]


def image_data(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """uint8 NHWC images labelled by a fixed random teacher (learnable)."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_TEST
    x = rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8)
    teacher = rng.standard_normal((int(np.prod(SHAPE)), CLASSES))
    y = np.argmax((x.reshape(n, -1) / 255.0 - 0.5) @ teacher, axis=1)
    return {"train": (x[:N_TRAIN], y[:N_TRAIN]), "test": (x[N_TRAIN:], y[N_TRAIN:])}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file (contiguous, uncompressed), the same split into three shards, and a
    gzip-compressed chunked copy."""
    d = tmp_path_factory.mktemp("images")
    splits = image_data()
    one = save_hdf5(d / "images.h5", splits, {"num_classes": CLASSES}, chunk_rows=None,
                    compress=False)
    shards = d / "shards"
    shards.mkdir()
    x, y = splits["train"]
    for k, (a, b) in enumerate([(0, 101), (101, 333), (333, N_TRAIN)]):  # uneven
        save_hdf5(shards / f"train-{k:05d}.h5", {"train": (x[a:b], y[a:b])},
                  {"num_classes": CLASSES}, chunk_rows=None, compress=False)
    save_hdf5(shards / "test-00000.h5", {"test": splits["test"]}, {"num_classes": CLASSES},
              chunk_rows=None, compress=False)
    packed = save_hdf5(d / "packed.h5", splits, {"num_classes": CLASSES}, chunk_rows=16)
    return {"one": one, "shards": shards, "packed": packed}


class Runs:
    """dptrain runs by (ranks, args), each once, in a shared directory."""

    def __init__(self, root: Path) -> None:
        self.root, self.done = root, {}

    def run(self, n: int, args: list[str]) -> tuple[Path, str]:
        key = (n, tuple(args))
        if key not in self.done:
            run_dir = self.root / f"run{len(self.done)}"
            proc = run_dptrain([*args, "--run-dir", str(run_dir)], n=n if n > 1 else None,
                               timeout=300)
            assert proc.returncode == 0, f"n={n} {args}\n{proc.stdout}\n{proc.stderr}"
            self.done[key] = (run_dir, proc.stdout)
        return self.done[key]

    def params(self, n: int, args: list[str]) -> dict[str, np.ndarray]:
        return read_params(self.run(n, args)[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("data-runs"))


def one_epoch(path: Path, loader: str) -> list[str]:
    return [*COMMON, "--dataset", str(path), "--loader", loader, "--epochs", "1",
            "--checkpoint-every", "off"]


# -- world-size invariance ------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_both_loaders_train_the_same_bytes_at_any_world_size(runs, data, n):
    mem, stream = one_epoch(data["one"], "memory"), one_epoch(data["one"], "stream")
    got_mem, got_stream = runs.params(n, mem), runs.params(n, stream)
    assert all(np.array_equal(got_mem[k], got_stream[k]) for k in got_mem)
    assert rel_diff(got_mem, runs.params(1, mem)) <= 1e-10
    out_mem, out_stream = runs.run(n, mem)[1], runs.run(n, stream)[1]
    held = "one copy per node in shared memory" if n > 1 else "one copy per rank"
    assert f"data: images in memory, {held}" in out_mem
    assert "data: images streamed from" in out_stream
    assert "augment crop 2, flip, erase 0.5, normalize channel" in out_mem


def test_augmentation_was_on(runs, data):
    """Control: the same run without augmentation ends elsewhere."""
    plain = [a for a in one_epoch(data["one"], "memory") if a not in AUGMENT]
    assert rel_diff(runs.params(1, plain), runs.params(1, one_epoch(data["one"], "memory"))) \
        > 1e-3


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_a_directory_of_shards_trains_as_the_one_file(runs, data, loader):
    ref = runs.params(2, one_epoch(data["one"], "memory"))
    got = runs.params(2, one_epoch(data["shards"], loader))
    assert all(np.array_equal(got[k], ref[k]) for k in ref)


def test_compressed_data_is_prepared_in_a_worker_process(runs, data):
    got = runs.params(2, one_epoch(data["packed"], "stream"))
    assert all(np.array_equal(got[k], v)
               for k, v in runs.params(2, one_epoch(data["one"], "memory")).items())
    out = runs.run(2, one_epoch(data["packed"], "stream"))[1]
    assert "data: prefetch process" in out and "gzip-compressed" in out
    assert "in chunks of 16 samples" in out


# -- exact resume ---------------------------------------------------------------------------
RESUMES = {"memory": (1, ["--loader", "memory"]),
           "stream": (2, ["--loader", "stream", "--prefetch", "process"])}


def two_epochs(path: Path, extra: list[str]) -> list[str]:
    return [*COMMON, "--dataset", str(path), "--epochs", "2", "--checkpoint-every", "4",
            *extra]


@pytest.mark.parametrize("loader", list(RESUMES))
def test_mid_epoch_stop_and_resume_is_bit_exact(runs, data, tmp_path, loader):
    n, extra = RESUMES[loader]
    args = two_epochs(data["one"], extra)
    ref, _ = runs.run(n, args)
    run = tmp_path / "run"
    first = run_dptrain([*args, "--run-dir", str(run), "--max-steps", "7"], n=n if n > 1
                        else None, timeout=300)
    assert first.returncode == 0, first.stderr
    t = ckpt.read_file(ckpt.checkpoint_path(run, 7)).trainer
    assert (t.epoch, t.epoch_pos) == (0, 350)  # stopped inside the first epoch
    second = run_dptrain([*args, "--run-dir", str(run), "--resume", "auto"],
                         n=n if n > 1 else None, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "step 7" in second.stdout
    assert_identical(ref / "model.h5", run / "model.h5")
    assert_identical(ckpt.checkpoint_path(ref, 20), ckpt.checkpoint_path(run, 20))
    assert json.loads((run / "data.json").read_text()) == \
        json.loads((ref / "data.json").read_text())


def edit_data_record(path: Path, edit, kind: str = "checkpoint") -> None:
    """Change a file's data attribute in place and re-seal its checksum."""
    with h5py.File(path, "r+") as f:
        rec = json.loads(f.attrs["data"])
        edit(rec)
        f.attrs["data"] = json.dumps(rec, sort_keys=True)
    ckpt.seal(path, kind)


def test_a_resumed_run_normalises_with_the_checkpoints_statistics(data, tmp_path):
    args = two_epochs(data["one"], ["--loader", "memory"])
    run = tmp_path / "run"
    assert run_dptrain([*args, "--run-dir", str(run), "--max-steps", "4"],
                       timeout=300).returncode == 0
    fresh = json.loads((run / "data.json").read_text())["normalize"]
    assert len(fresh["mean"]) == 3 and fresh["count"] == N_TRAIN
    x = image_data()["train"][0].astype(np.float64) / 255
    np.testing.assert_allclose(fresh["mean"], x.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(fresh["std"], x.std(axis=(0, 1, 2)), rtol=1e-12)

    def shift(rec: dict) -> None:
        rec["normalize"]["mean"] = [m + 0.125 for m in rec["normalize"]["mean"]]
    edit_data_record(ckpt.checkpoint_path(run, 4), shift)
    proc = run_dptrain([*args, "--run-dir", str(run), "--resume", "auto", "--max-steps", "5"],
                       timeout=300)
    assert proc.returncode == 0, proc.stderr
    used = json.loads((run / "data.json").read_text())["normalize"]
    assert used["mean"] == [m + 0.125 for m in fresh["mean"]]  # not computed again
    assert ckpt.read_file(ckpt.checkpoint_path(run, 5)).data["normalize"] == used


# -- a dataset that changed -------------------------------------------------------------------
def test_a_changed_dataset_file_is_named_and_nothing_changes(data, tmp_path):
    path = shutil.copy(data["one"], tmp_path / "mine.h5")
    args = [*COMMON, "--dataset", str(path), "--epochs", "1", "--checkpoint-every", "3"]
    run = tmp_path / "run"
    assert run_dptrain([*args, "--run-dir", str(run), "--max-steps", "3"],
                       timeout=300).returncode == 0
    with h5py.File(path, "r+") as f:  # one label rewritten in place: the size stays
        f["train/y"][0] = (int(f["train/y"][0]) + 1) % CLASSES
    before = tree(run)
    for n in (None, 2):
        proc = run_dptrain([*args, "--run-dir", str(run), "--resume", "auto"], n=n,
                           timeout=300)
        line = one_error(proc, f"the dataset at {path} changed since checkpoint")
        assert "mine.h5 has the same size but other contents" in line
        assert "--allow-config-change" in line
        assert tree(run) == before
    proc = run_dptrain([*args, "--run-dir", str(run), "--resume", "auto",
                        "--allow-config-change"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"warning: the dataset at {path} changed since" in proc.stdout
    assert (run / "model.h5").exists()


def test_a_file_that_grew_is_named_with_its_sizes(data, tmp_path):
    path = shutil.copy(data["one"], tmp_path / "grown.h5")
    args = [*COMMON, "--dataset", str(path), "--epochs", "1", "--checkpoint-every", "2",
            "--loader", "stream"]
    run = tmp_path / "run"
    assert run_dptrain([*args, "--run-dir", str(run), "--max-steps", "2"],
                       timeout=300).returncode == 0
    size = Path(path).stat().st_size
    with open(path, "ab") as f:
        f.write(b"\0" * 100)
    before = tree(run)
    proc = run_dptrain([*args, "--run-dir", str(run), "--resume", "auto"], timeout=300)
    one_error(proc, f"grown.h5 is {size + 100:,} bytes but was {size:,}")
    assert tree(run) == before


# -- evaluation ----------------------------------------------------------------------------
def test_eval_normalises_as_training_did(runs, data, tmp_path):
    run, _ = runs.run(2, one_epoch(data["one"], "memory"))
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in last if r["event"] == "epoch"][-1]
    for n in (None, 2):  # the run evaluated at 2 ranks: the same figures at 1 and 2
        proc = run_dptrain(["eval", "--run-dir", str(run), "--batch-size", "256"], n=n,
                           timeout=120)
        assert proc.returncode == 0, proc.stderr
        acc = float(proc.stdout.split("accuracy ")[1].split()[0])
        loss = float(proc.stdout.split("test loss ")[1].split()[0])
        assert acc == round(epoch["test_acc"], 4) and loss == round(epoch["test_loss"], 4)
    # control: the same weights on unnormalised inputs score otherwise
    bare = Path(shutil.copy(run / "model.h5", tmp_path / "bare.h5"))
    edit_data_record(bare, lambda rec: rec.update(normalize=None), "model")
    proc = run_dptrain(["eval", "--checkpoint", str(bare)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.split("test loss ")[1].split()[0]) != round(epoch["test_loss"], 4)


# -- real data -------------------------------------------------------------------------------
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST is not installed (apt-get install "
                           "dataset-fashion-mnist)")
def test_a_slice_of_fashion_mnist_trains(tmp_path):
    args = ["--dataset", "fashion_mnist", "--cache-dir", str(tmp_path / "cache"),
            "--model", "mlp", "--batch-size", "128", "--max-steps", "25", "--epochs", "1",
            "--normalize", "channel", "--loader", "stream", "--progress", "off",
            "--checkpoint-every", "off", "--run-dir", str(tmp_path / "run")]
    proc = run_dptrain(args, n=2, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "60000 training samples" in proc.stdout
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    epoch = [r for r in rec if r["event"] == "epoch"][-1]
    assert epoch["test_acc"] > 0.6  # 25 steps of 128: far above chance (0.1)
    stats = json.loads((tmp_path / "run" / "data.json").read_text())["normalize"]
    assert stats["count"] == 60000 and abs(stats["mean"][0] - 0.2860) < 1e-3
    assert abs(stats["std"][0] - 0.3530) < 1e-3
