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

from . import __version__, h5checks
from .atomic import write_atomic
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


#: the points where tests attach to the writer: before anything is written (on the
#: writing rank) and when half of the file is on disk
WRITE_POINTS = ("before_write", "mid_write")


def write_file(path: str | Path, ck: Checkpoint, hooks: Hooks | None = None) -> Path:
    """Atomically write ``ck`` (a checkpoint, or with kind 'model' weights only).

    Any OS failure (disk full, no permission) is a one-line UserError; nothing is left
    under ``path`` or a temp name. So are NaN/Inf in the parameters, model state or
    optimizer state: nothing is written.
    """
    path = Path(path)
    bad = nonfinite_counts(ck)
    if bad:
        raise UserError(f"cannot write {path}: it would hold {describe_nonfinite(bad)}; dptrain "
                        "never writes non-finite values (nothing was written)")
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
    half = len(image) // 2

    def mid_write(i: int) -> None:
        if i == 2 and hooks:  # the header and half of the file are on disk
            hooks.fire("mid_write", path=path, step=ck.trainer.global_step)

    try:
        write_atomic(path, (head, image[:half], image[half:]), before_part=mid_write)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return path


# -- reading ---------------------------------------------------------------------------
#: what a reader needs of the root attributes: text, or integers (>= 0)
#: (``data``, optional, is JSON text: the normalisation statistics inference applies, the
#: augmentation and the dataset's fingerprint; read by _data_record)
META_TEXT = ("format", "kind", "dtype", "dptrain_version", "created")
META_INT = ("format_version", "world_size", "num_params")


def read_file(path: str | Path, allow_nonfinite: bool = False) -> Checkpoint:
    """Read and verify a checkpoint or model file; any problem is a one-line UserError.

    Verifies the file's SHA-256 (then parses exactly the verified bytes), that it is a
    plain tree of groups and arrays (no links), the format version, the type of every
    attribute it uses, that every array its architecture implies is present with the
    right shape and dtype before reading it, every dataset's fletcher32 checksum, and
    (unless ``allow_nonfinite``, for ``inspect``) that no array holds NaN/Inf.
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
    if not allow_nonfinite:
        bad = nonfinite_counts(ck)
        if bad:
            raise UserError(f"checkpoint {path} holds {describe_nonfinite(bad)}; dptrain does not "
                            "load non-finite parameters (use an earlier checkpoint)")
    return ck


def _read_meta(f: Any, path: Path, where: str) -> dict[str, Any]:
    """The root attributes, each of its type; the format and its version checked."""
    if "format" not in f.attrs or h5checks.attr_text(f, "format", where) != FORMAT:
        raise UserError(f"checkpoint {path} is not a dptrain file (no format attribute)")
    _check_version(h5checks.attr_int(f, "format_version", where, minimum=None,
                                     maximum=None), path)
    meta: dict[str, Any] = {}
    for key in META_TEXT + META_INT:
        required = key in ("kind", "dtype")
        get = h5checks.attr_text if key in META_TEXT else h5checks.attr_int
        value = get(f, key, where, required)
        if value is not None:
            meta[key] = value
    if meta["kind"] not in KINDS:
        raise UserError(f"checkpoint {path} has an unknown kind {meta['kind']!r}")
    return meta


def _read_open(f: Any, path: Path) -> Checkpoint:
    where = f"checkpoint {path}"
    groups, datasets = h5checks.walk(f, where)
    meta = _read_meta(f, path, where)
    architecture = _json_attr(f, "architecture", where)
    config = _json_attr(f, "config", where)
    model = _model_of(architecture, path)
    if model.dtype.name != meta["dtype"]:
        raise UserError(f"checkpoint {path}: dtype attribute {meta['dtype']} differs from the "
                        f"architecture's {model.dtype.name}")
    if meta.get("num_params", model.num_params) != model.num_params:
        raise UserError(f"checkpoint {path}: num_params attribute {meta['num_params']} differs "
                        f"from its architecture's {model.num_params}")
    n = [0]
    reader = _ArrayReader(groups, datasets, model, where, n)
    ck = Checkpoint(kind=meta["kind"], meta=meta, architecture=architecture, config=config,
                    data=_data_record(f, where),
                    params=reader.read("params", model.param_slots),
                    state=reader.read("state", model.state_slots))
    if ck.kind == "checkpoint":
        _read_training(ck, groups, datasets, reader, model, path)
    ck.datasets = n[0]
    return ck


def _read_training(ck: Checkpoint, groups: Any, datasets: Any, reader: Any, model: Any,
                   path: Path) -> None:
    """A checkpoint's optimizer, trainer and rng groups, into ``ck``."""
    where = f"checkpoint {path}"
    og, tg, rg = (_group(groups, g, path) for g in ("optimizer", "trainer", "rng"))
    ck.optimizer_name = h5checks.attr_text(og, "name", where)
    ck.optimizer_step = h5checks.attr_int(og, "step_count", where)
    slots = sorted(p.rsplit("/", 1)[1] for p in groups if p.count("/") == 2
                   and p.startswith("/optimizer/"))
    stray = [p for p in datasets if p.count("/") == 2 and p.startswith("/optimizer/")]
    if stray:
        raise UserError(f"checkpoint {path}: {stray[0]} should be a group of arrays")
    ck.optimizer_state = {s: reader.read(f"optimizer/{s}", model.param_slots) for s in slots}
    values: dict[str, Any] = {}
    for fld in fields(TrainerState):
        if fld.name == "extras":
            continue
        get = h5checks.attr_float if fld.name == "best_metric" else h5checks.attr_int
        values[fld.name] = get(tg, fld.name, where)
    extras = {k: h5checks.attr_float(tg, k, where) for k in tg.attrs if k not in values}
    ck.trainer = TrainerState(**values, extras=extras)
    ck.seed = h5checks.attr_int(rg, "seed", where)
    ck.rng = {"seed": ck.seed}
    for key in ("epoch", "epoch_pos"):
        ck.rng[key] = h5checks.attr_int(rg, key, where, required=False)
    for key in ("bit_generator", "numpy_version", "scheme"):
        ck.rng[key] = h5checks.attr_text(rg, key, where, required=False)
    ck.rng = {k: v for k, v in ck.rng.items() if v is not None}
    ds = datasets.get("/rng/epoch_order")
    if "/rng/epoch_order" in groups:
        raise UserError(f"checkpoint {path}: /rng/epoch_order should be an array")
    if ds is not None:
        if ds.dtype.kind not in "iu" or ds.ndim != 1:
            raise UserError(f"checkpoint {path}: /rng/epoch_order must be a 1-d integer "
                            f"array, not {ds.dtype} of shape {ds.shape}")
        ck.epoch_order = reader.load(ds)


def _data_record(f: Any, where: str) -> dict[str, Any]:
    """The ``data`` attribute (a JSON object); {} in files written without it."""
    if "data" not in f.attrs:
        return {}
    return _json_attr(f, "data", where)


def _json_attr(f: Any, key: str, where: str) -> dict[str, Any]:
    text = h5checks.attr_text(f, key, where)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: its {key} attribute is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: the {key} attribute must be a JSON object, not "
                        f"{type(value).__name__}")
    return value


def _model_of(architecture: dict[str, Any], path: Path) -> Any:
    """The model an architecture from a file describes (whose layout the arrays follow)."""
    from .nn import Sequential  # noqa: PLC0415  (checkpoint -> nn, never the reverse)

    try:
        return Sequential.from_spec(architecture)
    except UserError as e:
        raise UserError(f"checkpoint {path}: its architecture cannot be built: {e}") from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, MemoryError,
            ZeroDivisionError) as e:  # any spec a file may hold: never a traceback
        raise UserError(f"checkpoint {path}: its architecture cannot be built: "
                        f"{type(e).__name__}: {e}") from None


def _group(groups: dict[str, Any], name: str, path: Path) -> Any:
    g = groups.get(f"/{name}")
    if g is None:
        raise UserError(f"checkpoint {path} has no /{name} group")
    return g


class _ArrayReader:
    """Reads the arrays of one group (params, state, an optimizer slot) in the model's
    layout, checking each one's place, shape, dtype, checksum filter and storage from
    its metadata before a byte of it is read."""

    def __init__(self, groups: dict[str, Any], datasets: dict[str, Any], model: Any,
                 where: str, counter: list[int]) -> None:
        self.groups, self.datasets, self.model = groups, datasets, model
        self.where, self.counter = where, counter

    def read(self, kind: str, slots: Any) -> dict[tuple[str, str], np.ndarray]:
        prefix = f"/{kind}"
        if prefix not in self.groups:
            if prefix in self.datasets:
                raise UserError(f"{self.where}: {prefix} should be a group of arrays")
            raise UserError(f"{self.where} has no {prefix} group")
        want = {f"{prefix}/{s.layer}/{s.name}": s for s in slots}
        for p in self.datasets:
            if p.startswith(prefix + "/") and p not in want:
                if p.count("/") == prefix.count("/") + 1:
                    raise UserError(f"{self.where}: {p} should be a group of arrays")
                raise UserError(f"{self.where} has {p}, which its architecture does not have")
        out = {}
        for p, s in want.items():
            ds = self.datasets.get(p)
            if ds is None:
                if p in self.groups:
                    raise UserError(f"{self.where}: {p} should be an array")
                raise UserError(f"{self.where} lacks {p}")
            if tuple(ds.shape) != s.shape:
                raise UserError(f"{self.where}: {p} has shape {tuple(ds.shape)}, the model "
                                f"expects {s.shape}")
            if ds.dtype != self.model.dtype:
                raise UserError(f"{self.where}: {p} is {ds.dtype}, the model is "
                                f"{self.model.dtype.name}")
            out[(s.layer, s.name)] = self.load(ds)
        return out

    def load(self, ds: Any) -> np.ndarray:
        if ds.size > 0 and ds.ndim > 0 and not ds.fletcher32:
            raise UserError(f"{self.where}: {ds.name} carries no checksum")
        h5checks.check_stored(ds, self.where)
        h5checks.check_complete(ds, self.where)
        a = np.asarray(ds[()])  # HDF5 verifies the fletcher32 checksum here
        self.counter[0] += 1
        return a


def check_consistent(ck: Checkpoint, path: str | Path) -> None:
    """The file against its own architecture: every array present, right shape and dtype."""
    model = _model_of(ck.architecture, Path(path))
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


# -- non-finite values -----------------------------------------------------------------
def _nonfinite(a: np.ndarray) -> int:
    if a.dtype.kind not in "fc" or bool(np.isfinite(a).all()):
        return 0
    return int(a.size - np.count_nonzero(np.isfinite(a)))


def nonfinite_counts(ck: Checkpoint) -> dict[str, int]:
    """{array path: number of NaN/Inf values} over parameters, model and optimizer state,
    for the arrays that hold any (empty for a healthy file)."""
    groups = [("params", ck.params), ("state", ck.state)]
    groups += [(f"optimizer/{s}", arrays) for s, arrays in sorted(ck.optimizer_state.items())]
    out = {}
    for kind, arrays in groups:
        for (layer, name), a in sorted(arrays.items()):
            bad = _nonfinite(a)
            if bad:
                out[f"/{kind}/{layer}/{name}"] = bad
    return out


def describe_nonfinite(counts: dict[str, int]) -> str:
    """'1,234 NaN/Inf values in /params/01_dense/W, /params/01_dense/b and 2 more arrays'."""
    names = list(counts)
    shown = ", ".join(names[:2])
    rest = f" and {len(names) - 2} more array{'s' if len(names) > 3 else ''}" \
        if len(names) > 2 else ""
    return f"{sum(counts.values()):,} NaN/Inf values in {shown}{rest}"


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
