"""Files dptrain reads but did not just write: edited checkpoints, damaged datasets, NaN.

Checkpoints edited with h5py in many ways and resealed (so the SHA-256 passes and only
the reader's own checks stand between the edit and a traceback), dataset files with one
metadata byte flipped at many offsets, and parameters that went non-finite: each either
loads correctly or is one `UserError` line, never another exception; non-finite arrays
are never written and never loaded for training or evaluation.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_dptrain
from refused import assert_one_error, assert_unchanged, snapshot

from dptrain import checkpoint as ckpt
from dptrain.data import load_dataset
from dptrain.errors import UserError
from dptrain.nn import Sequential, layer_from_spec
from dptrain.optim import make_optimizer

LAYERS = [{"type": "flatten"}, {"type": "dense", "units": 12}, {"type": "batchnorm"},
          {"type": "relu"}, {"type": "dense", "units": 10}]
W = "params/01_dense/W"           # (64, 12)
M = "optimizer/exp_avg/01_dense/W"
STATE = ckpt.TrainerState(epoch=1, epoch_pos=100, global_step=31, samples_seen=1537,
                          best_metric=0.5, skipped_steps=0)


def model_and_optimizer() -> tuple[Sequential, object]:
    model = Sequential([layer_from_spec(dict(s)) for s in LAYERS], (8, 8, 1), "float64")
    model.initialize(1)
    opt = make_optimizer("adam", model.params, model.grads, np)
    opt.name = "adam"
    model.grads[...] = np.random.default_rng(0).standard_normal(model.grads.shape)
    opt.step(0.01)
    model.state[...] = np.random.default_rng(1).random(model.state.shape)
    return model, opt


def write(path: Path, kind: str = "checkpoint", params: np.ndarray | None = None,
          state: np.ndarray | None = None, opt_state: dict | None = None) -> Path:
    model, opt = model_and_optimizer()
    return ckpt.write_file(path, ckpt.capture(
        kind, model, model.params if params is None else params,
        model.state if state is None else state,
        config={"seed": 1, "optimizer": "adam"}, world_size=2, optimizer=opt,
        opt_state=opt.state if opt_state is None else opt_state, trainer=STATE, seed=1,
        epoch_order=np.random.default_rng([1, 1]).permutation(1437)))


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("originals")
    return {"checkpoint": write(d / "ckpt.h5"), "model": write(d / "model.h5", kind="model")}


# -- edits with h5py, resealed ----------------------------------------------------------
def put(f: h5py.File, name: str, data: object, checksum: bool = True, **kw: object) -> None:
    """Replace (or add) dataset ``name``, chunked with fletcher32 where HDF5 allows it."""
    if name in f:
        del f[name]
    a = np.asarray(data)
    if checksum and a.ndim and a.size and a.dtype.kind in "biuf":
        kw = {"chunks": a.shape, "fletcher32": True, **kw}
    f.create_dataset(name, data=a, **kw)


def arch(f: h5py.File, change: Callable[[dict], object]) -> None:
    spec = json.loads(f.attrs["architecture"])
    out = change(spec)
    f.attrs["architecture"] = json.dumps(spec if out is None else out)


def unfilled(f: h5py.File, rows: int) -> None:
    """W (rows, 12), none of whose chunks was ever written (HDF5 would read fill values),
    and an architecture that expects it: its input has ``rows`` features."""
    del f[W]
    f.create_dataset(W, shape=(rows, 12), dtype="f8", chunks=(64, 12), fletcher32=True)
    arch(f, lambda s: s.update(input_shape=[rows, 1, 1]))
    f.attrs["num_params"] = f.attrs["num_params"] + (rows - 64) * 12


def mutate(name: str, f: h5py.File) -> None:  # noqa: C901  (one branch per edit)
    w = f[W][()]
    if name == "dangling soft link in /params":
        f["params/00_flatten"] = h5py.SoftLink("/nowhere")
    elif name == "array replaced by a soft link":
        del f[W]
        f[W] = h5py.SoftLink("/" + M)
    elif name == "soft link outside the arrays":
        f["notes"] = h5py.SoftLink("/params")
    elif name == "external link in /params":
        del f[W]
        f[W] = h5py.ExternalLink("/etc/hostname", "/x")
    elif name == "external link at the root":
        f["other"] = h5py.ExternalLink("elsewhere.h5", "/params")
    elif name == "array hard-linked from the optimizer":
        del f[W]
        f[W] = f[M]
    elif name == "group linked into itself":
        f["params/01_dense/loop"] = f["params"]
    elif name == "root linked from inside":
        f["trainer/root"] = f["/"]
    elif name == "named datatype in a layer":
        f["params/01_dense/T"] = np.dtype("f8")
    elif name == "named datatype at the root":
        f["T"] = np.dtype("f8")
    elif name == "float32 array":
        put(f, W, w.astype(np.float32))
    elif name == "int64 array":
        put(f, W, w.astype(np.int64))
    elif name == "big-endian array":
        put(f, W, w.astype(">f8"))
    elif name == "string array":
        put(f, W, np.array(["a"] * 12, dtype=h5py.string_dtype()).reshape(1, 12))
    elif name == "compound array":
        put(f, W, np.zeros((64, 12), dtype=[("a", "f8"), ("b", "i4")]))
    elif name == "boolean array":
        put(f, W, w > 0)
    elif name == "scalar array":
        put(f, W, np.float64(1.0))
    elif name == "transposed array":
        put(f, W, w.T.copy())
    elif name == "empty array":
        put(f, W, np.zeros((0, 12)))
    elif name == "array without checksum":
        put(f, W, w, checksum=False)
    elif name == "gzip-compressed array":
        put(f, W, w, compression="gzip")
    elif name == "array of unwritten chunks":
        unfilled(f, 64)
    elif name == "huge array of unwritten chunks":
        unfilled(f, 4_000_000)  # 384 MB if it were read
    elif name == "array replaced by a group":
        del f[W]
        f.create_group(W)
    elif name == "layer group replaced by an array":
        del f["params/01_dense"]
        put(f, "params/01_dense", w)
    elif name == "/params replaced by an array":
        del f["params"]
        put(f, "params", w)
    elif name == "/state missing":
        del f["state"]
    elif name == "/trainer missing":
        del f["trainer"]
    elif name == "optimizer slot replaced by an array":
        del f["optimizer/exp_avg"]
        put(f, "optimizer/exp_avg", w)
    elif name == "optimizer slot missing an array":
        del f[M]
    elif name == "extra optimizer slot":
        f.copy("optimizer/exp_avg", "optimizer/extra")
    elif name == "extra array in a layer":
        put(f, "params/01_dense/V", np.zeros(3))
    elif name == "array nested in a parameter's place":
        del f[W]
        put(f, W + "/inner", w)
    elif name == "extra empty group in /params":
        f.create_group("params/99_dense")
    elif name == "extra group at the root":
        put(f, "notes/comment", np.arange(3.0))
    elif name == "extra root attribute":
        f.attrs["comment"] = "edited by hand"
    elif name == "object reference attribute":
        f.attrs["ref"] = f["params"].ref
    elif name == "epoch_order as floats":
        put(f, "rng/epoch_order", f["rng/epoch_order"][()].astype(np.float64))
    elif name == "epoch_order 2-d":
        put(f, "rng/epoch_order", f["rng/epoch_order"][()].reshape(3, 479))
    elif name == "epoch_order as a group":
        del f["rng/epoch_order"]
        f.create_group("rng/epoch_order")
    elif name == "epoch_order missing":
        del f["rng/epoch_order"]
    elif name.startswith("attr "):  # "attr PATH KEY = VALUE" or "attr PATH KEY deleted"
        _, where, key, *rest = name.split(" ", 3)
        obj = f[where]
        if rest == ["deleted"]:
            del obj.attrs[key]
        else:
            obj.attrs[key] = ATTR_VALUES[rest[0].removeprefix("= ")]
    elif name.startswith("architecture "):
        ARCH_EDITS[name](f)
    else:
        raise AssertionError(f"no edit named {name!r}")


ATTR_VALUES: dict[str, object] = {
    "int": np.int64(3), "negative int": np.int64(-1), "float": np.float64(1.5),
    "text": "three", "bytes": np.bytes_(b"\xff\xfe"), "array": np.arange(3),
    "bool": np.bool_(True), "huge": np.uint64(2**63 + 5), "empty text": "",
}
ARCH_EDITS: dict[str, Callable[[h5py.File], None]] = {
    "architecture not JSON": lambda f: f.attrs.__setitem__("architecture", "{layers: ["),
    "architecture a JSON list": lambda f: arch(f, lambda s: s["layers"]),
    "architecture without layers": lambda f: arch(f, lambda s: s.pop("layers") and None),
    "architecture with no layer": lambda f: arch(f, lambda s: s.update(layers=[])),
    "architecture layer not an object": lambda f: arch(f, lambda s: s["layers"].append(3)),
    "architecture unknown layer": lambda f: arch(f, lambda s: s["layers"][3].update(
        type="gelu")),
    "architecture units as text": lambda f: arch(f, lambda s: s["layers"][1].update(
        units="12")),
    "architecture units negative": lambda f: arch(f, lambda s: s["layers"][1].update(
        units=-12)),
    "architecture units huge": lambda f: arch(f, lambda s: s["layers"][1].update(
        units=10**12)),
    "architecture units a float": lambda f: arch(f, lambda s: s["layers"][1].update(
        units=12.5)),
    "architecture input shape as text": lambda f: arch(f, lambda s: s.update(
        input_shape="8x8")),
    "architecture input shape negative": lambda f: arch(f, lambda s: s.update(
        input_shape=[-8, 8, 1])),
    "architecture dtype int8": lambda f: arch(f, lambda s: s.update(dtype="int8")),
    "architecture dtype unknown": lambda f: arch(f, lambda s: s.update(dtype="quad")),
    "architecture unknown option": lambda f: arch(f, lambda s: s["layers"][1].update(
        colour="red")),
    "architecture another model": lambda f: arch(f, lambda s: s["layers"][1].update(
        units=13)),
}
ATTRS = [("/", "format"), ("/", "format_version"), ("/", "kind"), ("/", "dtype"),
         ("/", "architecture"), ("/", "config"), ("/", "world_size"), ("/", "num_params"),
         ("/", "created"), ("optimizer", "name"), ("optimizer", "step_count"),
         *(("trainer", k) for k in ("epoch", "epoch_pos", "global_step", "samples_seen",
                                    "best_metric", "skipped_steps")),
         ("rng", "seed"), ("rng", "numpy_version"), ("rng", "epoch")]
EDITS = [
    "dangling soft link in /params", "array replaced by a soft link",
    "soft link outside the arrays", "external link in /params", "external link at the root",
    "array hard-linked from the optimizer", "group linked into itself",
    "root linked from inside", "named datatype in a layer", "named datatype at the root",
    "float32 array", "int64 array", "big-endian array", "string array", "compound array",
    "boolean array", "scalar array", "transposed array", "empty array",
    "array without checksum", "gzip-compressed array", "array of unwritten chunks",
    "huge array of unwritten chunks", "array replaced by a group",
    "layer group replaced by an array", "/params replaced by an array", "/state missing",
    "/trainer missing", "optimizer slot replaced by an array",
    "optimizer slot missing an array", "extra optimizer slot", "extra array in a layer",
    "array nested in a parameter's place", "extra empty group in /params",
    "extra group at the root", "extra root attribute", "object reference attribute",
    "epoch_order as floats", "epoch_order 2-d", "epoch_order as a group",
    "epoch_order missing", *ARCH_EDITS,
    *(f"attr {p} {k} deleted" for p, k in ATTRS),
    *(f"attr {p} {k} = {v}" for p, k in ATTRS for v in ATTR_VALUES),
]
#: edits after which the file still reads (anything else must be refused, in one line)
HARMLESS = {"extra optimizer slot", "extra empty group in /params", "extra group at the root",
            "extra root attribute", "object reference attribute", "epoch_order missing"}
OPTIONAL = {("/", "world_size"), ("/", "num_params"), ("/", "created"),
            ("rng", "numpy_version"), ("rng", "epoch")}  # may be absent
FREE_TEXT = {("/", "created"), ("optimizer", "name"), ("rng", "numpy_version")}
NUMBER = {("trainer", "best_metric")}
STRICT = {("/", k) for k in ("format", "format_version", "kind", "dtype", "architecture",
                             "config", "num_params")}  # any other value is refused


def harmless(name: str) -> bool:
    if not name.startswith("attr "):
        return name in HARMLESS
    _, where, key, rest = name.split(" ", 3)
    if rest == "deleted":
        return (where, key) in OPTIONAL
    value = rest.removeprefix("= ")
    if (where, key) in STRICT:
        return False
    if (where, key) in FREE_TEXT:
        return value in ("text", "empty text")
    if (where, key) in NUMBER:
        return value in ("int", "negative int", "float", "huge")
    return value == "int"


def applies(kind: str, name: str) -> bool:
    """A saved model has the root attributes, /params and /state only."""
    if kind == "checkpoint":
        return True
    return not any(w in name for w in ("optimizer", "trainer", "rng", "epoch_order",
                                       "hard-linked"))


CASES = [(k, e) for k in ("checkpoint", "model") for e in EDITS if applies(k, e)]


@pytest.mark.parametrize(("kind", "name"), CASES, ids=[f"{k}: {e}" for k, e in CASES])
def test_edited_and_resealed_file_reads_or_is_one_user_error(
        originals: dict[str, Path], tmp_path: Path, kind: str, name: str) -> None:
    path = tmp_path / "edited.h5"
    shutil.copy(originals[kind], path)
    with h5py.File(path, "r+") as f:
        mutate(name, f)
    ckpt.seal(path, kind)
    if harmless(name):
        ck = ckpt.read_file(path)
        good = ckpt.read_file(originals[kind])
        assert ck.kind == kind and ck.params.keys() == good.params.keys()
        for k, a in good.params.items():
            assert np.array_equal(ck.params[k], a), k
        return
    with pytest.raises(UserError) as e:
        ckpt.read_file(path)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {path}") and "\n" not in msg, msg


def test_the_edits_cover_hundreds_of_files() -> None:
    assert len(CASES) == len(set(CASES)) > 300


# -- the dangling soft link of a user's edit, through every command that reads it -------
TINY = ["--model", "mlp", "--epochs", "1", "--batch-size", "50", "--progress", "off",
        "--dtype", "float64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run: model.h5 and checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("trained") / "run"
    proc = run_dptrain([*TINY, "--run-dir", str(run), "--max-steps", "4",
                        "--checkpoint-every", "2"], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run


def soft_linked(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        f["params/00_flatten"] = h5py.SoftLink("/nowhere")
    ckpt.seal(dst, "model" if src.name == "model.h5" else "checkpoint")
    return dst


LINK = "/params/00_flatten is a soft link (to /nowhere); a dptrain file holds no links"


def test_soft_link_is_one_line_in_inspect_and_eval(trained: Path, tmp_path: Path) -> None:
    for src in (trained / "model.h5", trained / "checkpoints" / "ckpt-000000004.h5"):
        bad = soft_linked(src, tmp_path / src.name)
        for args in (["inspect", str(bad)], ["inspect", "--json", str(bad)],
                     ["eval", "--checkpoint", str(bad)]):
            proc = run_dptrain(args, timeout=120)
            assert_one_error(proc, f"checkpoint {bad}", LINK)
            assert proc.stdout == ""


@pytest.mark.mpi
@pytest.mark.parametrize("n", [None, 2])
def test_soft_link_is_one_line_on_resume_and_changes_nothing(trained: Path, tmp_path: Path,
                                                             n: int | None) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    bad = soft_linked(run / "checkpoints" / "ckpt-000000004.h5",
                      run / "checkpoints" / "ckpt-000000006.h5")
    before = snapshot(run)
    proc = run_dptrain([*TINY, "--run-dir", str(run), "--max-steps", "4", "--checkpoint-every",
                        "2", "--resume", str(bad)], n=n, timeout=120)
    assert_one_error(proc, f"checkpoint {bad}", LINK)
    assert_unchanged(before, run)
    proc = run_dptrain(["eval", "--checkpoint", str(bad)], n=n, timeout=120)
    assert_one_error(proc, f"checkpoint {bad}", LINK)


# -- NaN and Inf never reach a file, and are never loaded ------------------------------
@pytest.mark.parametrize("where", ["params", "state", "optimizer"])
def test_writer_refuses_non_finite_arrays_and_writes_nothing(tmp_path: Path,
                                                             where: str) -> None:
    model, opt = model_and_optimizer()
    params, state = model.params.copy(), model.state.copy()
    opt_state = {k: v.copy() for k, v in opt.state.items()}
    slots = {s.layer + "/" + s.name: s for s in model.param_slots}
    if where == "params":  # 40 NaN and 2 Inf in the first dense layer's weights
        w = slots["01_dense/W"]
        params[w.offset:w.offset + 40] = np.nan
        params[w.end - 2:w.end] = [np.inf, -np.inf]
        expect = "42 NaN/Inf values in /params/01_dense/W;"
    elif where == "state":
        state[:] = np.inf
        expect = f"{state.size} NaN/Inf values in /state/02_batchnorm/running_mean, " \
                 "/state/02_batchnorm/running_var;"
    else:
        b = slots["04_dense/b"]
        opt_state["exp_avg_sq"][b.offset + 3] = np.nan
        expect = "1 NaN/Inf values in /optimizer/exp_avg_sq/04_dense/b;"
    d = tmp_path / "checkpoints"
    d.mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as e:
        write(d / "ckpt-000000031.h5", params=params, state=state, opt_state=opt_state)
    assert str(e.value) == (f"cannot write {d / 'ckpt-000000031.h5'}: it would hold {expect} "
                            "dptrain never writes non-finite values (nothing was written)")
    assert_unchanged(before, tmp_path)  # no file, no temp file


def poisoned(src: Path, dst: Path, count: int = 167) -> Path:
    """A file as an older dptrain wrote it, before the writer refused NaN: ``count`` NaN
    in /params/01_dense/W and one Inf in /params/03_dense/b, resealed."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        for name, first, last, value in (("params/01_dense/W", 0, count, np.nan),
                                         ("params/03_dense/b", 5, 6, np.inf)):
            a = f[name][()]
            a.reshape(-1)[first:last] = value
            put(f, name, a)
    ckpt.seal(dst, "model" if src.name == "model.h5" else "checkpoint")
    return dst


def test_inspect_reports_non_finite_parameters(trained: Path, tmp_path: Path) -> None:
    bad = poisoned(trained / "model.h5", tmp_path / "model.h5")
    proc = run_dptrain(["inspect", str(bad)], timeout=120)
    assert_one_error(proc, f"checkpoint {bad} holds 168 NaN/Inf values in "
                           "/params/01_dense/W, /params/03_dense/b")
    assert "167,178 parameters" in proc.stdout and "01_dense" in proc.stdout
    proc = run_dptrain(["inspect", "--json", str(bad)], timeout=120)
    assert_one_error(proc, "holds 168 NaN/Inf values")
    report = json.loads(proc.stdout)
    assert report["nonfinite"] == {"/params/01_dense/W": 167, "/params/03_dense/b": 1}
    good = run_dptrain(["inspect", "--json", str(trained / "model.h5")], timeout=120)
    assert good.returncode == 0 and json.loads(good.stdout)["nonfinite"] == {}


@pytest.mark.mpi
@pytest.mark.parametrize("n", [None, 2])
def test_non_finite_file_is_refused_for_eval_and_resume(trained: Path, tmp_path: Path,
                                                        n: int | None) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    model = poisoned(trained / "model.h5", run / "model.h5")
    proc = run_dptrain(["eval", "--run-dir", str(run)], n=n, timeout=120)
    assert_one_error(proc, f"checkpoint {model} holds 168 NaN/Inf values",
                     "dptrain does not load non-finite parameters")
    bad = poisoned(trained / "checkpoints" / "ckpt-000000004.h5",
                   run / "checkpoints" / "ckpt-000000004.h5", count=3)
    before = snapshot(run)
    proc = run_dptrain([*TINY, "--run-dir", str(run), "--max-steps", "4", "--checkpoint-every",
                        "2", "--resume", str(bad)], n=n, timeout=120)
    assert_one_error(proc, f"checkpoint {bad} holds 4 NaN/Inf values in /params/01_dense/W")
    assert_unchanged(before, run)


def test_resume_auto_skips_a_non_finite_checkpoint_by_name(trained: Path,
                                                           tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    newest = run / "checkpoints" / "ckpt-000000004.h5"
    poisoned(trained / "checkpoints" / newest.name, newest)
    warnings: list[str] = []
    path, ck = ckpt.find_resumable(run, warn=warnings.append)
    assert path.name == "ckpt-000000002.h5" and ck.trainer.global_step == 2
    assert warnings == [f"warning: skipping {newest.name}: checkpoint {newest} holds 168 "
                        "NaN/Inf values in /params/01_dense/W, /params/03_dense/b; dptrain "
                        "does not load non-finite parameters (use an earlier checkpoint)"]


# -- dataset files with one damaged metadata byte --------------------------------------
def dataset_file(path: Path, chunked: bool) -> tuple[Path, list[tuple[int, int]]]:
    """A small real dataset file, and the byte ranges of its raw data (the rest is HDF5
    metadata). As h5py writes by default (every array contiguous), or with the test split
    chunked and compressed (a chunk index, a filter pipeline)."""
    rng = np.random.default_rng(7)
    with h5py.File(path, "w") as f:
        f["train/x"] = rng.random((20, 4, 4, 1)).astype(np.float32)
        f["train/y"] = rng.integers(0, 3, 20)
        test = {"chunks": (3, 4, 4, 1), "compression": "gzip"} if chunked else {}
        f.create_dataset("test/x", data=rng.random((6, 4, 4, 1)), **test)
        f.create_dataset("test/y", data=rng.integers(0, 3, 6), chunks=(3,) if chunked else None)
        f.attrs["num_classes"] = 3
        raw = []
        for ds in (f[n] for n in ("train/x", "train/y", "test/x", "test/y")):
            if ds.chunks is None:
                raw.append((ds.id.get_offset(), ds.id.get_storage_size()))
            else:
                ds.id.chunk_iter(lambda c: raw.append((c.byte_offset, c.size)))
    return path, raw


def metadata_offsets(size: int, raw: list[tuple[int, int]], every: int) -> list[int]:
    return [i for i in range(0, size, every) if not any(o <= i < o + n for o, n in raw)]


def load_or_error(path: Path) -> object:
    try:
        return load_dataset(str(path), dtype="float64")
    except UserError as e:
        msg = str(e)
        assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
        return e


def test_flipped_metadata_bytes_load_the_same_arrays_or_are_one_user_error(
        tmp_path: Path) -> None:
    """Every 7th byte of a plain file's metadata, inverted: the file loads with exactly the
    original arrays, or is refused in one line naming it; never another exception."""
    good, raw = dataset_file(tmp_path / "good.h5", chunked=False)
    ref = load_dataset(str(good), dtype="float64")
    data = good.read_bytes()
    bad = tmp_path / "bad.h5"
    offsets = metadata_offsets(len(data), raw, 7)
    refused = 0
    for i in offsets:
        b = bytearray(data)
        b[i] ^= 0xFF
        bad.write_bytes(bytes(b))
        got = load_or_error(bad)
        if isinstance(got, UserError):
            refused += 1
            continue
        assert len(got.train) == len(ref.train), i
        for mine, theirs in zip(got.splits(), ref.splits(), strict=False):
            assert np.array_equal(mine.x, theirs.x) and np.array_equal(mine.y, theirs.y), i
    assert len(offsets) > 300 and refused > 50, (len(offsets), refused)


@pytest.mark.parametrize(("chunked", "mask"), [(False, 0x01), (True, 0x01), (True, 0xFF)])
def test_flipped_bits_never_raise_anything_but_a_user_error(tmp_path: Path, chunked: bool,
                                                           mask: int) -> None:
    """Every 7th (chunked file: 17th) metadata byte, one bit or all inverted, also in a
    chunk index and a filter pipeline. HDF5 files carry no metadata checksums (by
    default), so a few such flips cannot be told from an intended file (a renamed group:
    the test split vanishes; a float type turned unsigned; a chunk address moved onto
    other bytes); the loader refuses many and never fails with another exception."""
    good, raw = dataset_file(tmp_path / "good.h5", chunked=chunked)
    data = good.read_bytes()
    bad = tmp_path / "bad.h5"
    refused = 0
    for i in metadata_offsets(len(data), raw, 17 if chunked else 7):
        b = bytearray(data)
        b[i] ^= mask
        bad.write_bytes(bytes(b))
        refused += isinstance(load_or_error(bad), UserError)
    assert refused > 50


def symbol_table_damage(tmp_path: Path) -> Path:
    """The dataset file with one byte of a symbol-table node (SNOD) inverted, such that
    HDF5 fails inside h5py (the case that used to end in a RuntimeError traceback)."""
    good, _ = dataset_file(tmp_path / "good.h5", chunked=False)
    data = good.read_bytes()
    bad = tmp_path / "snod.h5"
    start = data.index(b"SNOD")
    for i in range(start, start + 200):
        b = bytearray(data)
        b[i] ^= 0xFF
        bad.write_bytes(bytes(b))
        got = load_or_error(bad)
        if isinstance(got, UserError) and "damaged or unreadable HDF5 file" in str(got):
            return bad
    raise AssertionError("no byte of the symbol-table node makes HDF5 fail")


@pytest.mark.mpi
@pytest.mark.parametrize("n", [None, 2])
def test_damaged_dataset_is_one_line_at_the_command_line(tmp_path: Path,
                                                         n: int | None) -> None:
    bad = symbol_table_damage(tmp_path)
    run = tmp_path / "run"
    proc = run_dptrain(["--model", "mlp", "--epochs", "1", "--progress", "off", "--dataset",
                        str(bad), "--run-dir", str(run)], n=n, timeout=120)
    assert_one_error(proc, f"{bad}: damaged or unreadable HDF5 file (")
    assert not run.exists()
