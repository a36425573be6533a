"""HDF5 checkpoints and saved models: atomic writes, checksums, verification, retention.

Layout (plain HDF5, readable with h5ls/h5dump/h5py, nothing in it executes)::

    /                     attrs: format, format_version, kind (checkpoint|model),
                                 dptrain_version, created, world_size, dtype,
                                 architecture (JSON text), config (JSON text)
    /params/<layer>/<name>         trainable parameters, real shapes
    /state/<layer>/<name>          model state (BatchNorm running statistics)
    /optimizer                     attrs: name, step_count
    /optimizer/<slot>/<layer>/<name>   e.g. momentum, exp_avg, exp_avg_sq
    /trainer              attrs: epoch, epoch_pos, global_step, samples_seen,
                                 best_metric, skipped_steps
    /rng                  attrs: seed, scheme (all randomness derives from it)

Every dataset is chunked with a fletcher32 checksum that HDF5 verifies on read.
A file is written to a temporary name in the same directory, flushed and fsynced,
renamed onto its final name, and the directory is fsynced: a crash leaves either the old
set of checkpoints or the new one, never a half file under a checkpoint name.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import UserError

FORMAT = "dptrain"
FORMAT_VERSION = 1
CKPT_RE = re.compile(r"^ckpt-(\d{9})\.h5$")
BEST_NAME = "best.h5"
RNG_SCHEME = ("numpy PCG64; shuffle order from default_rng([seed, epoch]); dropout masks "
              "from splitmix64(seed, epoch, sample index, layer)")


@dataclass
class TrainerState:
    """Where training stands; enough to continue exactly."""

    epoch: int = 0
    epoch_pos: int = 0          # samples of this epoch already consumed (global)
    global_step: int = 0
    samples_seen: int = 0
    best_metric: float = float("nan")
    skipped_steps: int = 0


@dataclass
class Checkpoint:
    """What a checkpoint or saved model file holds, as host arrays."""

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


def _h5py() -> Any:
    import h5py  # noqa: PLC0415

    return h5py


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_array(group: Any, name: str, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    if a.size == 0:
        group.create_dataset(name, data=a)
        return
    group.create_dataset(name, data=a, chunks=a.shape if a.ndim else None,
                         fletcher32=a.ndim > 0)


def _split(model: Any, flat: np.ndarray, kind: str) -> dict[tuple[str, str], np.ndarray]:
    slots = model.param_slots if kind == "params" else model.state_slots
    return {(s.layer, s.name): flat[s.offset:s.end].reshape(s.shape) for s in slots}


def _pause_for_tests() -> None:
    """Test hook: DPTRAIN_TEST_PAUSE_IN_WRITE=seconds sleeps mid-write (kill tests)."""
    delay = os.environ.get("DPTRAIN_TEST_PAUSE_IN_WRITE")
    if delay:
        time.sleep(float(delay))


def write_file(path: str | Path, *, kind: str, model: Any, params: np.ndarray,
               state: np.ndarray, config: dict[str, Any], world_size: int = 1,
               optimizer: Any = None, opt_state: dict[str, np.ndarray] | None = None,
               trainer: TrainerState | None = None, seed: int = 0) -> Path:
    """Atomically write a checkpoint (or, with kind='model', weights only) from host arrays."""
    h5py = _h5py()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({
                "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
                "dptrain_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "world_size": world_size, "dtype": model.dtype.name,
                "num_params": model.num_params,
                "architecture": model.spec_json(),
                "config": json.dumps(config, sort_keys=True),
            })
            for gname, flat in (("params", params), ("state", state)):
                g = f.create_group(gname)
                for (layer, name), a in _split(model, flat, gname).items():
                    _write_array(g.require_group(layer), name, a)
            _pause_for_tests()
            if kind == "checkpoint":
                og = f.create_group("optimizer")
                og.attrs["name"] = getattr(optimizer, "name", type(optimizer).__name__.lower())
                og.attrs["step_count"] = int(getattr(optimizer, "step_count", 0))
                for sname, flat in (opt_state or {}).items():
                    sg = og.create_group(sname)
                    for (layer, name), a in _split(model, flat, "params").items():
                        _write_array(sg.require_group(layer), name, a)
                tg = f.create_group("trainer")
                t = trainer or TrainerState()
                for k, v in vars(t).items():
                    tg.attrs[k] = v
                rg = f.create_group("rng")
                rg.attrs["seed"] = seed
                rg.attrs["scheme"] = RNG_SCHEME
            f.flush()
        fd = os.open(tmp, os.O_RDONLY)
        try:
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


def _read_group(g: Any) -> dict[tuple[str, str], np.ndarray]:
    out = {}
    for layer in g:
        for name in g[layer]:
            out[(layer, name)] = g[layer][name][()]
    return out


def read_file(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint or model file; any problem is a one-line UserError."""
    h5py = _h5py()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"checkpoint {path} is not a readable HDF5 file "
                        f"(truncated or corrupt?): {str(e).splitlines()[0]}") from None
    try:
        with f:
            a = dict(f.attrs)
            if a.get("format") != FORMAT:
                raise UserError(f"{path} is not a dptrain checkpoint (no format attribute)")
            version = int(a.get("format_version", -1))
            if version > FORMAT_VERSION:
                raise UserError(f"checkpoint {path} has format version {version}, newer than "
                                f"this dptrain ({FORMAT_VERSION}); upgrade dptrain")
            for g in ("params", "state"):
                if g not in f:
                    raise UserError(f"checkpoint {path} has no /{g} group")
            ck = Checkpoint(
                kind=str(a.get("kind", "checkpoint")),
                meta={k: (v.item() if hasattr(v, "item") else v) for k, v in a.items()
                      if k not in ("architecture", "config")},
                architecture=json.loads(a["architecture"]),
                config=json.loads(a.get("config", "{}")),
                params=_read_group(f["params"]), state=_read_group(f["state"]))
            if ck.kind == "checkpoint":
                for g in ("optimizer", "trainer", "rng"):
                    if g not in f:
                        raise UserError(f"checkpoint {path} has no /{g} group")
                og = f["optimizer"]
                ck.optimizer_name = str(og.attrs["name"])
                ck.optimizer_step = int(og.attrs["step_count"])
                ck.optimizer_state = {s: _read_group(og[s]) for s in og}
                ck.trainer = TrainerState(**{k: v.item() for k, v in f["trainer"].attrs.items()
                                             if k in TrainerState.__dataclass_fields__})
                ck.seed = int(f["rng"].attrs["seed"])
            return ck
    except UserError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt: {msg}") from None


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
    for kind, slots, arrays in (("params", model.param_slots, ck.params),
                                ("state", model.state_slots, ck.state)):
        for s in slots:
            a = arrays.get((s.layer, s.name))
            if a is None:
                raise UserError(f"checkpoint {path} lacks /{kind}/{s.layer}/{s.name}")
            if tuple(a.shape) != s.shape:
                raise UserError(f"checkpoint {path}: /{kind}/{s.layer}/{s.name} has shape "
                                f"{tuple(a.shape)}, the model expects {s.shape}")


def flatten(model: Any, arrays: dict[tuple[str, str], np.ndarray], kind: str = "params",
            dtype: Any = None) -> np.ndarray:
    """Per-layer arrays back into one host flat buffer in the model's layout."""
    slots = model.param_slots if kind == "params" else model.state_slots
    n = slots[-1].end if slots else 0
    flat = np.empty(n, dtype or model.dtype)
    for s in slots:
        flat[s.offset:s.end] = arrays[(s.layer, s.name)].ravel()
    return flat


# -- the set of checkpoints in a run directory ---------------------------------------
def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Step checkpoints in ``run_dir``, newest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"ckpt-{step:09d}.h5"


def find_resumable(run_dir: str | Path, warn: Any = print) -> tuple[Path, Checkpoint] | None:
    """The newest checkpoint that verifies; corrupt ones are named and skipped."""
    for p in list_checkpoints(run_dir):
        try:
            return p, read_file(p)
        except UserError as e:
            warn(f"warning: skipping {p}: {e}")
    return None


def prune(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints (best.h5 is kept)."""
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
