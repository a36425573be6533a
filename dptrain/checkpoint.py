"""HDF5 checkpoints and saved models: atomic writes, checksums, verification, retention.

Layout (plain HDF5, readable with h5ls/h5dump/h5py, nothing in it executes)::

    userblock (512 bytes)  text: format, format_version, kind, size, sha256 of the rest
    /                      attrs: format, format_version, kind (checkpoint|model),
                                  dptrain_version, created, world_size, dtype, num_params,
                                  architecture (JSON text), config (JSON text),
                                  data (JSON text, optional: normalisation statistics,
                                  augmentation, dataset fingerprint)
    /params/<layer>/<name>          trainable parameters, real shapes
    /state/<layer>/<name>           model state (BatchNorm running statistics)
    /optimizer                      attrs: name, step_count   (checkpoints only)
    /optimizer/<slot>/<layer>/<name>    e.g. momentum, exp_avg, exp_avg_sq
    /trainer               attrs: epoch, epoch_pos, global_step, samples_seen,
                                  best_metric, skipped_steps
    /rng                   attrs: seed, epoch, epoch_pos, bit_generator, numpy_version,
                                  scheme; dataset epoch_order (this epoch's sample order)

Two layers of checksums. Every dataset is chunked with HDF5's fletcher32 filter, which
HDF5 itself verifies on every read (so plain h5py readers get it too). The userblock holds
the SHA-256 of everything after it, checked before HDF5 parses a byte: a damaged or
truncated file is rejected by name instead of being handed to the HDF5 library, which can
crash or hang on corrupt metadata. Without dptrain: ``tail -c +513 F | sha256sum``.

The HDF5 image is built in memory (HDF5 never meets a failing disk, so a full disk is a
clean OSError, not a damaged library state), then written with its header to a temporary
name in the same directory, fsynced, renamed onto its final name, and the directory is
fsynced: a crash leaves either the old set of checkpoints or the new one, never a half
file under a checkpoint name. Reading verifies the SHA-256 first and parses exactly the
bytes it verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import UserError
from .hooks import Hooks

FORMAT = "dptrain"
FORMAT_VERSION = 1
USERBLOCK = 512
HEADER_MAGIC = "dptrain HDF5 file"
CKPT_RE = re.compile(r"^ckpt-(\d{9})\.h5$")
BEST_NAME = "best.h5"
KINDS = ("checkpoint", "model")
CHUNK_BYTES = 64 << 20  # fletcher32 works per chunk; HDF5 caps a chunk at 4 GiB
RNG_SCHEME = ("no generator state is carried between steps: initial parameters come from "
              "numpy default_rng(seed); epoch e's sample order is "
              "default_rng([seed, e]).permutation(n) (stored as epoch_order); dropout keeps "
              "element p of sample g iff the top 53 bits of splitmix64 of (key(seed, e, "
              "layer), g * elements + p) reach rate * 2**53")


@dataclass
class TrainerState:
    """Where training stands; enough to continue exactly.

    ``best_metric`` and ``skipped_steps`` belong to the evaluation and non-finite
    extensions but are part of format version 1; ``extras`` holds every other
    extension's numbers, each stored as one more ``/trainer`` attribute by its own name.
    """

    epoch: int = 0
    epoch_pos: int = 0          # samples of this epoch already consumed (global)
    global_step: int = 0
    samples_seen: int = 0
    best_metric: float = float("nan")
    skipped_steps: int = 0
    extras: dict[str, float] = field(default_factory=dict)

    def counters(self) -> dict[str, Any]:
        """The format's own attributes (everything but ``extras``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extras"}


@dataclass
class Checkpoint:
    """What a checkpoint or saved model file holds, as host arrays: what ``read_file``
    returns and what ``write_file`` writes. ``meta`` holds the root attributes; the writer
    fills in the format's own (format, version, created, dtype, ...)."""

    kind: str
    meta: dict[str, Any]
    architecture: dict[str, Any]
    config: dict[str, Any]
    params: dict[tuple[str, str], np.ndarray]
    state: dict[tuple[str, str], np.ndarray]
    optimizer_name: str = ""
    optimizer_step: int = 0
    optimizer_state: dict[str, dict[tuple[str, str], np.ndarray]] = field(default_factory=dict)
    trainer: TrainerState = field(default_factory=TrainerState)
    seed: int = 0
    rng: dict[str, Any] = field(default_factory=dict)
    epoch_order: np.ndarray | None = None
    datasets: int = 0           # datasets read, each verified by its fletcher32 checksum
    #: the run's record of its data ({} in files written without one)
    data: dict[str, Any] = field(default_factory=dict)


def _h5py() -> Any:
    import h5py  # noqa: PLC0415  (keeps `--help` fast)

    return h5py


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        _fsync(path)


def _chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Whole array in one chunk unless it is large; then blocks of rows."""
    row = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    rows = max(1, min(shape[0], CHUNK_BYTES // max(1, row)))
    return (rows, *shape[1:])


def _write_array(group: Any, name: str, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    if a.size == 0 or a.ndim == 0:  # nothing to chunk: HDF5 cannot checksum these
        group.create_dataset(name, data=a)
        return
    group.create_dataset(name, data=a, chunks=_chunks(a.shape, a.itemsize), fletcher32=True)


def _split(model: Any, flat: np.ndarray, kind: str) -> dict[tuple[str, str], np.ndarray]:
    slots = model.param_slots if kind == "params" else model.state_slots
    return {(s.layer, s.name): flat[s.offset:s.end].reshape(s.shape) for s in slots}


# -- the userblock header ----------------------------------------------------------------
def _header(kind: str, size: int, digest: str) -> bytes:
    text = (f"{HEADER_MAGIC}\nformat_version {FORMAT_VERSION}\nkind {kind}\n"
            f"size {size}\nsha256 {digest}\n").encode()
    return text.ljust(USERBLOCK, b"\0")


def seal(path: str | Path, kind: str = "checkpoint") -> None:
    """(Re)write a file's header from its contents: for tools that edit a file in place."""
    with open(path, "r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(_header(kind, len(data), hashlib.sha256(data[USERBLOCK:]).hexdigest()))


def verify_bytes(path: str | Path) -> bytes:
    """The file's bytes, after checking its header and SHA-256 (before HDF5 parses any)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"checkpoint {path} cannot be read: {e.strerror or e}") from None
    if not data:
        raise UserError(f"checkpoint {path} is empty")
    lines = data[:USERBLOCK].rstrip(b"\0").decode("ascii", "replace").split("\n")
    if lines[0] != HEADER_MAGIC:
        what = ("an HDF5 file without a dptrain header" if data.startswith(b"\x89HDF")
                else "not a dptrain HDF5 file")
        raise UserError(f"checkpoint {path} is {what} (no '{HEADER_MAGIC}' header)")
    hdr = dict(line.partition(" ")[::2] for line in lines[1:] if line)
    version, size = hdr.get("format_version", ""), hdr.get("size", "")
    if not version.isdigit() or not size.isdigit() or len(hdr.get("sha256", "")) != 64:
        raise UserError(f"checkpoint {path} is corrupt: its header cannot be read")
    _check_version(int(version), path)
    if hdr.get("kind") not in KINDS or data[:USERBLOCK] != _header(hdr["kind"], int(size),
                                                                   hdr["sha256"]):
        raise UserError(f"checkpoint {path} is corrupt: its header is damaged")
    if len(data) != int(size):
        raise UserError(f"checkpoint {path} is not a readable HDF5 file (truncated or "
                        f"corrupt?): {len(data)} bytes on disk, {size} written")
    if hashlib.sha256(memoryview(data)[USERBLOCK:]).hexdigest() != hdr["sha256"]:
        raise UserError(f"checkpoint {path} is corrupt: its SHA-256 differs from the one "
                        "recorded when it was written")
    return data


def _check_version(version: int, path: Path) -> None:
    if version > FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format version {version}, newer than this "
                        f"dptrain ({FORMAT_VERSION}); upgrade dptrain")
    if version < 1:
        raise UserError(f"checkpoint {path} has an invalid format version {version}")


# -- writing ---------------------------------------------------------------------------
def capture(kind: str, model: Any, params: np.ndarray, state: np.ndarray, *,
            config: dict[str, Any], world_size: int = 1, optimizer: Any = None,
            opt_state: dict[str, np.ndarray] | None = None,
            trainer: TrainerState | None = None, seed: int = 0,
            epoch_order: np.ndarray | None = None,
            data: dict[str, Any] | None = None) -> Checkpoint:
    """A Checkpoint of ``model``'s layout from flat host arrays (views, not copies).

    ``epoch_order`` is the current epoch's sample order (the sampler's state, stored so
    that a resume can confirm it draws the same one)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    return Checkpoint(
        kind=kind, meta={"world_size": world_size}, architecture=model.spec(), config=config,
        params=_split(model, params, "params"), state=_split(model, state, "state"),
        optimizer_name=getattr(optimizer, "name", "") if optimizer is not None else "",
        optimizer_step=int(getattr(optimizer, "step_count", 0)) if optimizer is not None else 0,
        optimizer_state={k: _split(model, v, "params") for k, v in (opt_state or {}).items()},
        trainer=trainer or TrainerState(), seed=seed, epoch_order=epoch_order,
        data=dict(data or {}))


def _build_image(ck: Checkpoint, meta: dict[str, Any]) -> bytes:
    """The HDF5 file, built in memory (so HDF5 never meets a failing disk)."""
    h5py = _h5py()
    name = f"dptrain-image-{os.getpid()}-{time.monotonic_ns()}"
    with h5py.File(name, "w", driver="core", backing_store=False, block_size=1 << 24) as f:
        f.attrs.update(meta)
        for gname, arrays in (("params", ck.params), ("state", ck.state)):
            g = f.create_group(gname)
            for (layer, pname), a in arrays.items():
                _write_array(g.require_group(layer), pname, a)
        if ck.kind == "checkpoint":
            og = f.create_group("optimizer")
            og.attrs["name"] = ck.optimizer_name
            og.attrs["step_count"] = int(ck.optimizer_step)
            for sname, arrays in ck.optimizer_state.items():
                sg = og.create_group(sname)
                for (layer, pname), a in arrays.items():
                    _write_array(sg.require_group(layer), pname, a)
            tg = f.create_group("trainer")
            t = ck.trainer
            for k, v in {**t.counters(), **t.extras}.items():
                tg.attrs[k] = v
            rg = f.create_group("rng")
            rg.attrs.update({"seed": ck.seed, "epoch": t.epoch,
                             "epoch_pos": t.epoch_pos, "bit_generator": "PCG64",
                             "numpy_version": np.__version__, "scheme": RNG_SCHEME})
            if ck.epoch_order is not None:
                _write_array(rg, "epoch_order", np.asarray(ck.epoch_order, np.int64))
        f.flush()
        return f.id.get_file_image()


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        data = data[os.write(fd, data):]


#: the points where tests attach to the writer: before anything is written (on the
#: writing rank) and when half of the file is on disk
WRITE_POINTS = ("before_write", "mid_write")


def write_file(path: str | Path, ck: Checkpoint, hooks: Hooks | None = None) -> Path:
    """Atomically write ``ck`` (a checkpoint, or with kind 'model' weights only).

    Any OS failure (disk full, no permission) is a one-line UserError; nothing is left
    under ``path`` or a temp name.
    """
    path = Path(path)
    if hooks:
        hooks.fire("before_write", path=path, step=ck.trainer.global_step)
    arch = ck.architecture
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": ck.kind,
            "dptrain_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "world_size": int(ck.meta.get("world_size", 1)), "dtype": arch["dtype"],
            "num_params": int(sum(a.size for a in ck.params.values())),
            "architecture": json.dumps(arch, sort_keys=True),
            "config": json.dumps(ck.config, sort_keys=True)}
    if ck.data:
        meta["data"] = json.dumps(ck.data, sort_keys=True)
    image = memoryview(_build_image(ck, meta))
    head = _header(ck.kind, USERBLOCK + len(image), hashlib.sha256(image).hexdigest())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, memoryview(head))
            half = len(image) // 2
            _write_all(fd, image[:half])
            if hooks:
                hooks.fire("mid_write", path=path, step=ck.trainer.global_step)
            _write_all(fd, image[half:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# -- reading ---------------------------------------------------------------------------
def _read_group(g: Any, path: Path, counter: list[int]) -> dict[tuple[str, str], np.ndarray]:
    h5py = _h5py()
    out = {}
    for layer, lg in g.items():
        if not isinstance(lg, h5py.Group):
            raise UserError(f"checkpoint {path}: {lg.name} should be a group of arrays")
        for name, ds in lg.items():
            if not isinstance(ds, h5py.Dataset):
                raise UserError(f"checkpoint {path}: {ds.name} should be an array")
            if ds.size > 0 and ds.ndim > 0 and not ds.fletcher32:
                raise UserError(f"checkpoint {path}: {ds.name} carries no checksum")
            out[(layer, name)] = ds[()]  # HDF5 verifies the fletcher32 checksum here
            counter[0] += 1
    return out


def _group(f: Any, name: str, path: Path) -> Any:
    if name not in f:
        raise UserError(f"checkpoint {path} has no /{name} group")
    return f[name]


def read_file(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint or model file; any problem is a one-line UserError.

    Verifies the file's SHA-256 (then parses exactly the verified bytes), every dataset's
    fletcher32 checksum, the format version, and that every array its architecture
    implies is present with the right shape and dtype.
    """
    path = Path(path)
    data = verify_bytes(path)
    h5py = _h5py()
    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            ck = _read_open(f, path)
        if f"\nkind {ck.kind}\n".encode() not in data[:USERBLOCK]:
            raise UserError(f"checkpoint {path} is corrupt: its header and contents disagree "
                            "on what it is")
    except UserError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt: {msg}") from None
    check_consistent(ck, path)
    return ck


def _read_open(f: Any, path: Path) -> Checkpoint:
    a = dict(f.attrs)
    if a.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not a dptrain file (no format attribute)")
    _check_version(int(a.get("format_version", -1)), path)
    for key in ("architecture", "config", "dtype"):
        if key not in a:
            raise UserError(f"checkpoint {path} lacks the {key!r} attribute")
    try:
        architecture, config = json.loads(a["architecture"]), json.loads(a["config"])
    except json.JSONDecodeError as e:
        raise UserError(f"checkpoint {path}: architecture or config is not JSON ({e})") from None
    n = [0]
    ck = Checkpoint(
        kind=str(a.get("kind", "checkpoint")),
        meta={k: (v.item() if hasattr(v, "item") else v) for k, v in a.items()
              if k not in ("architecture", "config", "data")},
        architecture=architecture, config=config, data=_data_record(a, path),
        params=_read_group(_group(f, "params", path), path, n),
        state=_read_group(_group(f, "state", path), path, n))
    if ck.kind not in KINDS:
        raise UserError(f"checkpoint {path} has an unknown kind {ck.kind!r}")
    if ck.kind == "checkpoint":
        og, tg, rg = (_group(f, g, path) for g in ("optimizer", "trainer", "rng"))
        ck.optimizer_name = str(og.attrs["name"])
        ck.optimizer_step = int(og.attrs["step_count"])
        ck.optimizer_state = {s: _read_group(og[s], path, n) for s in og}
        values: dict[str, Any] = {}
        for fld in fields(TrainerState):
            if fld.name == "extras":
                continue
            if fld.name not in tg.attrs:
                raise UserError(f"checkpoint {path} lacks /trainer attribute {fld.name!r}")
            values[fld.name] = type(fld.default)(tg.attrs[fld.name])
        extras = {k: float(v) for k, v in tg.attrs.items() if k not in values}
        ck.trainer = TrainerState(**values, extras=extras)
        ck.rng = {k: (v.item() if hasattr(v, "item") else v) for k, v in rg.attrs.items()}
        ck.seed = int(ck.rng["seed"])
        if "epoch_order" in rg:
            ds = rg["epoch_order"]
            if ds.size and not ds.fletcher32:
                raise UserError(f"checkpoint {path}: {ds.name} carries no checksum")
            ck.epoch_order = ds[()]
            n[0] += 1
    ck.datasets = n[0]
    return ck


def _data_record(attrs: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``data`` attribute (a JSON object); {} in files written without it."""
    if "data" not in attrs:
        return {}
    try:
        data = json.loads(attrs["data"])
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"checkpoint {path}: its data attribute is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"checkpoint {path}: its data attribute is not a JSON object")
    return data


def check_consistent(ck: Checkpoint, path: str | Path) -> None:
    """The file against its own architecture: every array present, right shape and dtype."""
    from .nn import Sequential  # noqa: PLC0415  (checkpoint -> nn, never the reverse)

    try:
        model = Sequential.from_spec(ck.architecture)
    except (UserError, ValueError, TypeError) as e:
        raise UserError(f"checkpoint {path}: its architecture cannot be built: {e}") from None
    if model.dtype.name != ck.meta.get("dtype"):
        raise UserError(f"checkpoint {path}: dtype attribute {ck.meta.get('dtype')} differs "
                        f"from the architecture's {model.dtype.name}")
    groups = [("params", model.param_slots, ck.params), ("state", model.state_slots, ck.state)]
    groups += [(f"optimizer/{s}", model.param_slots, arrays)
               for s, arrays in ck.optimizer_state.items()]
    for kind, slots, arrays in groups:
        _check_arrays(kind, slots, arrays, model.dtype, path)
        extra = set(arrays) - {(s.layer, s.name) for s in slots}
        if extra:
            layer, name = sorted(extra)[0]
            raise UserError(f"checkpoint {path} has /{kind}/{layer}/{name}, which its "
                            "architecture does not have")
    t = ck.trainer
    if min(t.epoch, t.epoch_pos, t.global_step, t.samples_seen, t.skipped_steps) < 0:
        raise UserError(f"checkpoint {path}: negative counters in /trainer")


def _check_arrays(kind: str, slots: Any, arrays: dict[tuple[str, str], np.ndarray],
                  dtype: Any, path: str | Path) -> None:
    for s in slots:
        a = arrays.get((s.layer, s.name))
        if a is None:
            raise UserError(f"checkpoint {path} lacks /{kind}/{s.layer}/{s.name}")
        if tuple(a.shape) != s.shape:
            raise UserError(f"checkpoint {path}: /{kind}/{s.layer}/{s.name} has shape "
                            f"{tuple(a.shape)}, the model expects {s.shape}")
        if a.dtype != dtype:
            raise UserError(f"checkpoint {path}: /{kind}/{s.layer}/{s.name} is {a.dtype}, "
                            f"the model is {np.dtype(dtype).name}")


def check_compatible(ck: Checkpoint, model: Any, path: str | Path) -> None:
    """One-line error naming the first difference between checkpoint and model."""
    want = model.spec()
    got = ck.architecture
    if list(got.get("input_shape", [])) != want["input_shape"]:
        raise UserError(f"checkpoint {path} was saved for input shape {got.get('input_shape')}, "
                        f"the model expects {want['input_shape']}")
    gl, wl = got.get("layers", []), want["layers"]
    for i, (g, w) in enumerate(zip(gl, wl, strict=False)):
        if g != w:
            raise UserError(f"checkpoint {path} does not match the model at layer {i}: "
                            f"checkpoint has {g}, config has {w}")
    if len(gl) != len(wl):
        raise UserError(f"checkpoint {path} has {len(gl)} layers, the model has {len(wl)}")
    if got.get("dtype", want["dtype"]) != want["dtype"]:
        raise UserError(f"checkpoint {path} holds {got.get('dtype')} parameters, the config "
                        f"asks for {want['dtype']}")
    for kind, slots, arrays in (("params", model.param_slots, ck.params),
                                ("state", model.state_slots, ck.state)):
        _check_arrays(kind, slots, arrays, model.dtype, path)


def flatten(model: Any, arrays: dict[tuple[str, str], np.ndarray], kind: str = "params",
            dtype: Any = None) -> np.ndarray:
    """Per-layer arrays back into one host flat buffer in the model's layout."""
    slots = model.param_slots if kind == "params" else model.state_slots
    n = slots[-1].end if slots else 0
    flat = np.empty(n, dtype or model.dtype)
    for s in slots:
        flat[s.offset:s.end] = arrays[(s.layer, s.name)].ravel()
    return flat


def load_into(model: Any, ck: Checkpoint, path: str | Path) -> None:
    """Check that ``ck`` fits ``model`` (one line naming the first difference), then copy
    its parameters and model state into the model's buffers (on the model's device)."""
    check_compatible(ck, model, path)
    model.params[...] = model.xp.asarray(flatten(model, ck.params))
    model.state[...] = model.xp.asarray(flatten(model, ck.state, "state"))


# -- the set of checkpoints in a run directory ---------------------------------------
def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Step checkpoints in ``run_dir``, newest first (best.h5 and temp files excluded)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"ckpt-{step:09d}.h5"


def find_resumable(run_dir: str | Path, warn: Any = print) -> tuple[Path, Checkpoint] | None:
    """The newest checkpoint that verifies; each bad one is named in a warning and skipped."""
    for p in list_checkpoints(run_dir):
        try:
            return p, read_file(p)
        except UserError as e:
            warn(f"warning: skipping {p.name}: {e}")
    return None


def prune(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints (best.h5 is kept), and
    temp files that an earlier, killed process left behind."""
    removed = []
    for p in list_checkpoints(run_dir)[keep_last:]:
        p.unlink(missing_ok=True)
        removed.append(p)
    d = checkpoint_dir(run_dir)
    for stale in d.glob(".*.tmp") if d.is_dir() else []:
        pid = stale.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid():
            stale.unlink(missing_ok=True)
    return removed
