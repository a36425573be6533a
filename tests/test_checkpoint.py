"""The checkpoint file itself: round trip, plain-HDF5 layout, checksums, damaged files,
retention and failed writes (in process, on real models and optimizer state)."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from ckpt_runs import LAYERS
from conftest import run_dptrain

from dptrain import checkpoint as ckpt
from dptrain import cli
from dptrain.config import parse_checkpoint_every
from dptrain.errors import UserError
from dptrain.hooks import Hooks
from dptrain.nn import Sequential, layer_from_spec
from dptrain.optim import make_optimizer

ORDER = np.random.default_rng([3, 1]).permutation(1437)


def trained(optimizer: str = "adam", layers: list | None = None) -> tuple[Sequential, object]:
    """A model whose parameters, BatchNorm statistics and optimizer state are all non-trivial."""
    model = Sequential([layer_from_spec(dict(s)) for s in layers or LAYERS], (8, 8, 1),
                       "float64")
    model.initialize(3)
    opt = make_optimizer(optimizer, model.params, model.grads, np, momentum=0.9,
                         nesterov=True)
    opt.name = optimizer
    rng = np.random.default_rng(0)
    for _ in range(3):
        model.grads[...] = rng.standard_normal(model.grads.shape)
        opt.step(0.01)
    model.state[...] = rng.random(model.state.shape)
    return model, opt


STATE = ckpt.TrainerState(epoch=1, epoch_pos=150, global_step=32, samples_seen=1587,
                          best_metric=0.875, skipped_steps=2)


def write(path: Path, model: Sequential, opt: object, kind: str = "checkpoint",
          trainer: ckpt.TrainerState = STATE, hooks: Hooks | None = None) -> Path:
    return ckpt.write_file(path, ckpt.capture(
        kind, model, model.params, model.state, config={"seed": 3, "lr": 0.01}, world_size=4,
        optimizer=opt, opt_state=opt.state, trainer=trainer, seed=3, epoch_order=ORDER),
        hooks)


@pytest.fixture
def good(tmp_path: Path) -> Path:
    model, opt = trained()
    return write(tmp_path / "ckpt-000000032.h5", model, opt)


# -- round trip ---------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_round_trip_is_bit_exact(tmp_path: Path, optimizer: str) -> None:
    model, opt = trained(optimizer)
    ck = ckpt.read_file(write(tmp_path / "c.h5", model, opt))
    assert np.array_equal(ckpt.flatten(model, ck.params), model.params)
    assert np.array_equal(ckpt.flatten(model, ck.state, "state"), model.state)
    assert model.state.any() and model.params.any()
    assert sorted(ck.optimizer_state) == sorted(opt.state) != []
    for name, buf in opt.state.items():
        assert buf.any()
        assert np.array_equal(ckpt.flatten(model, ck.optimizer_state[name]), buf)
    assert (ck.optimizer_name, ck.optimizer_step) == (optimizer, 3)
    assert ck.trainer == STATE
    assert ck.seed == 3 and np.array_equal(ck.epoch_order, ORDER)
    assert ck.rng["epoch"] == 1 and ck.rng["epoch_pos"] == 150
    assert ck.architecture == model.spec() and ck.config == {"seed": 3, "lr": 0.01}
    m = ck.meta
    assert (m["format_version"], m["world_size"], m["dtype"], m["kind"]) == \
        (ckpt.FORMAT_VERSION, 4, "float64", "checkpoint")
    assert m["num_params"] == model.num_params and m["created"][:2] == "20"
    in_optimizer = sum(len(g) for g in ck.optimizer_state.values())
    assert ck.datasets == len(ck.params) + len(ck.state) + in_optimizer + 1  # + epoch_order


def test_large_arrays_are_split_into_checksummed_chunks(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt, "CHUNK_BYTES", 2000)  # as if W were many GiB
    model, opt = trained()
    path = write(tmp_path / "c.h5", model, opt)
    with h5py.File(path, "r") as f:
        w = f["params/01_dense/W"]
        assert w.chunks == (10, 24) and w.fletcher32 and w.id.get_num_chunks() == 7
        fifth = w.id.get_chunk_info(4).byte_offset
    assert np.array_equal(ckpt.flatten(model, ckpt.read_file(path).params), model.params)
    flip(path, fifth + 3)
    ckpt.seal(path)
    with pytest.raises(UserError, match="is corrupt"):
        ckpt.read_file(path)


def test_nan_best_metric_and_model_files_round_trip(tmp_path: Path) -> None:
    model, opt = trained()
    ck = ckpt.read_file(write(tmp_path / "c.h5", model, opt, trainer=ckpt.TrainerState()))
    assert math.isnan(ck.trainer.best_metric) and ck.trainer.global_step == 0
    m = ckpt.read_file(write(tmp_path / "model.h5", model, opt, kind="model"))
    assert m.kind == "model" and m.optimizer_state == {} and m.epoch_order is None
    assert np.array_equal(ckpt.flatten(model, m.params), model.params)
    with h5py.File(tmp_path / "model.h5") as f:
        assert sorted(f) == ["params", "state"]


def test_plain_h5py_reads_the_layout(good: Path) -> None:
    """Real names and shapes, text architecture/config, checksummed datasets, header."""
    with h5py.File(good, "r") as f:
        assert sorted(f) == ["optimizer", "params", "rng", "state", "trainer"]
        assert f["params/01_dense/W"].shape == (64, 24)
        assert f["params/05_dense/b"].shape == (10,)
        assert sorted(f["params/02_batchnorm"]) == ["beta", "gamma"]
        assert sorted(f["state/02_batchnorm"]) == ["running_mean", "running_var"]
        assert sorted(f["optimizer"]) == ["exp_avg", "exp_avg_sq"]
        assert f["optimizer/exp_avg/01_dense/W"].shape == (64, 24)
        assert f["optimizer"].attrs["step_count"] == 3
        assert f["trainer"].attrs["epoch_pos"] == 150
        assert f["trainer"].attrs["best_metric"] == 0.875
        assert f["rng"].attrs["seed"] == 3 and "splitmix64" in f["rng"].attrs["scheme"]
        assert np.array_equal(f["rng/epoch_order"][()], ORDER)
        assert json.loads(f.attrs["architecture"])["layers"][2]["type"] == "batchnorm"
        assert f.attrs["format"] == "dptrain" and f.attrs["world_size"] == 4
        seen = []
        f.visititems(lambda name, obj: seen.append(obj) if isinstance(obj, h5py.Dataset)
                     else None)
        assert len(seen) == 6 + 2 + 2 * 6 + 1 and all(d.fletcher32 for d in seen)
        assert f.userblock_size == ckpt.USERBLOCK
    data = good.read_bytes()
    head = data[:ckpt.USERBLOCK].rstrip(b"\0").decode().splitlines()
    assert head[0] == ckpt.HEADER_MAGIC and f"size {len(data)}" in head
    assert f"sha256 {hashlib.sha256(data[ckpt.USERBLOCK:]).hexdigest()}" in head


# -- damaged files ------------------------------------------------------------------------
def data_offset(path: Path, name: str = "params/01_dense/W") -> int:
    with h5py.File(path, "r") as f:
        return f[name].id.get_chunk_info(0).byte_offset


def flip(path: Path, offset: int, dst: Path | None = None) -> Path:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    dst = dst or path
    dst.write_bytes(bytes(data))
    return dst


def test_flipped_byte_in_a_dataset_is_caught_by_both_checksums(good: Path,
                                                               tmp_path: Path) -> None:
    bad = flip(good, data_offset(good) + 100, tmp_path / "bad.h5")
    with pytest.raises(UserError, match=r"bad\.h5 is corrupt: its SHA-256 differs"):
        ckpt.read_file(bad)
    # HDF5's own fletcher32 catches it too, for readers without dptrain ...
    with h5py.File(bad, "r") as f, pytest.raises(OSError):
        f["params/01_dense/W"][()]
    with h5py.File(good, "r") as f:
        f["params/01_dense/W"][()]
    # ... and for dptrain when the header was rewritten after the damage
    ckpt.seal(bad)
    with pytest.raises(UserError, match=r"bad\.h5 is corrupt: .*"):
        ckpt.read_file(bad)


def test_every_single_byte_change_is_rejected(good: Path, tmp_path: Path) -> None:
    """No damaged byte anywhere (header, HDF5 metadata, data) reads back silently."""
    data = good.read_bytes()
    bad = tmp_path / "b.h5"
    step = max(1, len(data) // 600)
    for i in [*range(700), *range(700, len(data), step)]:  # all of header and superblock
        b = bytearray(data)
        b[i] ^= 0x01
        bad.write_bytes(bytes(b))
        with pytest.raises(UserError):
            ckpt.read_file(bad)


def edit(path: Path, how: str) -> None:
    """Change a sealed file with h5py, then reseal it (as a tool rewriting it would)."""
    with h5py.File(path, "r+") as f:
        if how == "missing group":
            del f["optimizer"]
        elif how == "wrong shape":
            del f["params/01_dense/W"]
            f["params/01_dense"].create_dataset("W", data=np.zeros((64, 25)), chunks=(64, 25),
                                                fletcher32=True)
        elif how == "extra array":
            f["params/01_dense"].create_dataset("V", data=np.zeros(3), chunks=(3,),
                                                fletcher32=True)
        elif how == "newer version":
            f.attrs["format_version"] = ckpt.FORMAT_VERSION + 1
        elif how == "no checksum":
            w = f["params/01_dense/W"][()]
            del f["params/01_dense/W"]
            f["params/01_dense"].create_dataset("W", data=w)
    ckpt.seal(path)


def damage(good: Path, how: str) -> Path:
    data = good.read_bytes()
    if how == "truncated":
        good.write_bytes(data[:len(data) // 2])
    elif how == "empty":
        good.write_bytes(b"")
    elif how == "not HDF5":
        good.write_text("epoch,loss\n1,0.5\n" * 100)
    elif how == "flipped data byte":
        flip(good, data_offset(good, "optimizer/exp_avg/05_dense/W") + 7)
    elif how == "plain HDF5":
        good.write_bytes(data[ckpt.USERBLOCK:])
    elif how == "newer header":
        good.write_bytes(data.replace(b"format_version 1\n", b"format_version 7\n", 1))
    else:
        edit(good, how)
    return good


BAD = [
    ("truncated", "is not a readable HDF5 file (truncated or corrupt?)"),
    ("empty", "is empty"),
    ("not HDF5", "is not a dptrain HDF5 file"),
    ("plain HDF5", "is an HDF5 file without a dptrain header"),
    ("flipped data byte", "is corrupt: its SHA-256 differs"),
    ("missing group", "has no /optimizer group"),
    ("wrong shape", "/params/01_dense/W has shape (64, 25), the model expects (64, 24)"),
    ("extra array", "has /params/01_dense/V, which its architecture does not have"),
    ("no checksum", "/params/01_dense/W carries no checksum"),
    ("newer version", f"has format version {ckpt.FORMAT_VERSION + 1}, newer than this"),
    ("newer header", "has format version 7, newer than this dptrain (1); upgrade dptrain"),
]


@pytest.mark.parametrize(("how", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_damaged_file_is_one_line_error_in_inspect(good: Path, how: str, fragment: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = damage(good, how)
    assert cli.main(["inspect", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"dptrain: error: checkpoint {bad}"), err
    assert fragment in err, err


def test_inspect_a_good_file(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = trained()
    assert cli.main(["inspect", str(good)]) == 0
    out = capsys.readouterr().out
    assert "dptrain checkpoint, format version 1" in out
    assert "world size at save: 4, dtype float64" in out
    assert f"{model.num_params:,} parameters" in out
    assert "epoch 1 (+150 samples), step 32, 1,587 samples seen, best metric 0.8750" in out
    assert "optimizer: adam, step 3, state exp_avg, exp_avg_sq" in out
    assert re.search(r"01_dense +\{.*\"units\": 24.*\} +1,560 +3,072\n", out), out  # FLOPs
    assert "checksums: file SHA-256 ok, 21 datasets with fletcher32 verified" in out
    assert cli.main(["inspect", "--json", str(good)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["trainer"]["global_step"] == 32 and doc["params"] == model.num_params


def test_inspect_process_exit_codes(good: Path, tmp_path: Path) -> None:
    proc = run_dptrain(["inspect", str(good)])
    assert proc.returncode == 0 and "checksums: file SHA-256 ok" in proc.stdout
    bad = damage(good, "truncated")
    proc = run_dptrain(["inspect", str(bad)])
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "truncated" in proc.stderr


def test_other_architecture_or_dtype_names_the_first_mismatch(good: Path) -> None:
    ck = ckpt.read_file(good)
    other = [dict(s) for s in LAYERS]
    other[1]["units"] = 32
    model, _ = trained(layers=other)
    with pytest.raises(UserError, match=r"does not match the model at layer 1: checkpoint has "
                                        r"\{.*'units': 24.*\}, config has \{.*'units': 32"):
        ckpt.check_compatible(ck, model, good)
    short, _ = trained(layers=LAYERS[:2] + LAYERS[-1:])
    with pytest.raises(UserError, match="at layer 2"):
        ckpt.check_compatible(ck, short, good)
    f32 = Sequential([layer_from_spec(dict(s)) for s in LAYERS], (8, 8, 1), "float32")
    with pytest.raises(UserError, match="holds float64 parameters, the config asks for "
                                        "float32"):
        ckpt.check_compatible(ck, f32, good)
    ckpt.check_compatible(ck, trained()[0], good)  # the same architecture passes


# -- the set of checkpoints in a run directory ----------------------------------------------
def test_resume_auto_skips_bad_newest_files_by_name(tmp_path: Path) -> None:
    model, opt = trained()
    d = ckpt.checkpoint_dir(tmp_path)
    d.mkdir()
    paths = {s: write(ckpt.checkpoint_path(tmp_path, s), model, opt) for s in (10, 20, 30, 40)}
    damage(paths[40], "truncated")
    damage(paths[30], "flipped data byte")
    (d / ".ckpt-000000050.h5.999999.tmp").write_bytes(b"half")  # a write that was killed
    warnings: list[str] = []
    path, ck = ckpt.find_resumable(tmp_path, warn=warnings.append)
    assert path == paths[20] and ck.trainer == STATE
    assert len(warnings) == 2
    assert warnings[0].startswith("warning: skipping ckpt-000000040.h5: ") and \
        "truncated" in warnings[0]
    assert warnings[1].startswith("warning: skipping ckpt-000000030.h5: ") and \
        "SHA-256" in warnings[1]
    damage(paths[20], "empty")
    damage(paths[10], "not HDF5")
    assert ckpt.find_resumable(tmp_path, warn=warnings.append) is None


def test_prune_keeps_the_last_k_plus_best_and_drops_stale_temp_files(tmp_path: Path) -> None:
    d = ckpt.checkpoint_dir(tmp_path)
    d.mkdir()
    for s in (5, 10, 15, 20, 25):
        ckpt.checkpoint_path(tmp_path, s).write_bytes(b"x")
    (d / ckpt.BEST_NAME).write_bytes(b"x")
    stale = d / ".ckpt-000000030.h5.999999.tmp"
    mine = d / f".ckpt-000000030.h5.{os.getpid()}.tmp"
    stale.write_bytes(b"x")
    mine.write_bytes(b"x")
    removed = ckpt.prune(tmp_path, 2)
    assert [p.name for p in removed] == ["ckpt-000000015.h5", "ckpt-000000010.h5",
                                         "ckpt-000000005.h5"]
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [mine.name, "best.h5", "ckpt-000000020.h5", "ckpt-000000025.h5"])


# -- failed and interrupted writes -------------------------------------------------------------
def test_disk_full_mid_write_keeps_the_previous_file(good: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    before = good.read_bytes()
    real_write, written = os.write, [0]

    def filling_disk(fd: int, data: memoryview) -> int:
        if written[0] > 20000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written[0] += len(data[:8192])
        return real_write(fd, data[:8192])

    monkeypatch.setattr(ckpt.os, "write", filling_disk)
    model, opt = trained()
    with pytest.raises(UserError, match=f"cannot write {good}: No space left on device"):
        write(good, model, opt)
    assert written[0] > 20000 and good.read_bytes() == before
    assert sorted(p.name for p in good.parent.iterdir()) == [good.name]


def test_interrupt_mid_write_leaves_no_temp_file(good: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    before = good.read_bytes()

    def interrupted(path: Path, step: int) -> None:
        assert len(list(good.parent.glob(".*.tmp"))) == 1  # half-written under a temp name
        raise KeyboardInterrupt

    hooks = Hooks(*ckpt.WRITE_POINTS)
    hooks.add("mid_write", interrupted)
    model, opt = trained()
    with pytest.raises(KeyboardInterrupt):
        write(good, model, opt, hooks=hooks)
    assert good.read_bytes() == before
    assert sorted(p.name for p in good.parent.iterdir()) == [good.name]


def test_write_into_a_missing_directory_is_a_user_error(tmp_path: Path) -> None:
    model, opt = trained()
    with pytest.raises(UserError, match="cannot write .*: No such file or directory"):
        write(tmp_path / "nowhere" / "c.h5", model, opt)


@pytest.mark.parametrize(("text", "expected"), [
    ("10m", ("seconds", 600.0)), ("30s", ("seconds", 30.0)), ("1.5h", ("seconds", 5400.0)),
    ("7", ("steps", 7)), ("epoch", ("epoch", 0)), ("off", ("off", 0))])
def test_checkpoint_schedule_syntax(text: str, expected: tuple[str, float]) -> None:
    assert parse_checkpoint_every(text) == expected


@pytest.mark.parametrize("text", ["10x", "0", "-5", "1.5", "m"])
def test_bad_checkpoint_schedule_is_a_user_error(text: str) -> None:
    with pytest.raises(UserError, match="checkpoint_every"):
        parse_checkpoint_every(text)
