"""A strict stand-in for CuPy, so that the GPU code paths run (and fail loudly) without a GPU.

Arrays live in host memory (each wraps a NumPy array) but cross between "host" and
"device" only the way CuPy's do, and some hazards that CuPy leaves silent are made loud:

- Implicit conversion to NumPy raises ``TypeError`` (``__array__``, ``np.asarray``,
  NumPy ufuncs and functions on them), as with CuPy. A raw ``numpy.ndarray`` mixed with
  device arrays in an operation raises ``TypeError``, also as an index or as an assigned
  value (CuPy would silently upload those two: the strictness is on purpose). NumPy
  scalars and Python numbers are fine.
- ``float()``/``int()``/``bool()``/``.item()``/``.tolist()`` work on size-1 arrays (in CuPy
  a device synchronisation) and are counted in ``stats["scalar"]``.
- ``asnumpy``/``.get()`` and ``asarray``/``.set()`` are the only ways across; each copy is
  counted (``stats["d2h"]``, ``stats["h2d"]``). Reductions return 0-d device arrays.
- Every array belongs to the device current when it was made (``.device.id``); using it
  while another device is current raises ``ValueError``.
- Copies given a ``stream`` run asynchronously: only when that stream is synchronised, an
  event recorded after them is waited on or queried, or a later operation is issued on the
  same stream. Reading the result early gives NaN-poisoned data; an operation on another
  stream that reads an array with a copy still queued raises; a pinned host buffer that
  changes before its queued upload ran raises; an asynchronous copy from pageable (not
  pinned) memory is counted in ``stats["pageable_async"]``.
- ``__cuda_array_interface__`` (what mpi4py reads) raises while the last write to the array
  is not synchronised, and counts ``stats["cai_exports"]``; the exported pointer is host
  memory, so a host-only MPI can move it, which lets the "CUDA-aware" path run in tests.

Use ``configure(devices=N)`` to pretend there are N GPUs (``lazy_events=True`` for a GPU
that is always behind the host) and ``reset_stats()`` between measurements. Only what
dptrain needs is modelled.

Every public name used through the stand-in is recorded in ``used`` as a path from the
module (``matmul``, ``cuda.Stream.synchronize``, ``ndarray.get``; functions forwarded to
NumPy also as ``take(out)`` with their keyword arguments), so that a test can check each
against the real CuPy wherever one is installed.
"""

from __future__ import annotations

import functools
import operator
import sys
from collections import Counter
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

__version__ = "0.0-strict"
stats: Counter[str] = Counter()

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
             "construct a NumPy array explicitly.")


#: the CuPy surface used since the last ``used.clear()`` (see the module docstring)
used: set[str] = set()
#: names of the stand-in itself, not of CuPy (never recorded)
_OWN = frozenset({"configure", "reset_stats", "stats", "used"})


class _Recorded:
    """Records the public attributes read on instances as ``<_path>.<name>``."""

    _path = ""

    def __getattribute__(self, name: str) -> Any:
        if name[0] != "_":
            used.add(f"{object.__getattribute__(self, '_path')}.{name}")
        return object.__getattribute__(self, name)


class _Namespace(_Recorded, SimpleNamespace):
    """A recorded sub-namespace (``cuda``, ``lib.stride_tricks``)."""

    def __init__(self, path: str, **names: Any) -> None:
        super().__init__(**names)
        object.__setattr__(self, "_path", path)


def _keywords(path: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Records ``path(k1,k2)`` for the keyword arguments a call passes."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kw: Any) -> Any:
            if kw:
                used.add(f"{path}({','.join(sorted(kw))})")
            return fn(*args, **kw)
        return call
    return wrap


class _RecordedModule(ModuleType):
    """This module's own class: records the names read on it from outside."""

    def __getattribute__(self, name: str) -> Any:
        if name[0] != "_" and name not in _OWN:
            used.add(name)
        return super().__getattribute__(name)


def reset_stats() -> None:
    """Zero every counter in ``stats``."""
    stats.clear()


# -- devices and streams -----------------------------------------------------------------
class _Runtime(_Recorded):
    """Device count and the current device (what CUDA_VISIBLE_DEVICES would leave visible)."""

    _path = "cuda.runtime"

    def __init__(self) -> None:
        self._n_devices = 1
        self._pci_bus_ids = ["0000:01:00.0"]
        self._current = 0
        self._streams: list[Stream] = []
        self._lazy_events = False  # Event.done stays False until someone waits for it
        self._memory = (16 << 30, 16 << 30)  # (free, total) bytes of every device

    def getDeviceCount(self) -> int:  # noqa: N802  (CuPy's name)
        return self._n_devices

    def memGetInfo(self) -> tuple[int, int]:  # noqa: N802
        """(free, total) bytes of the current device."""
        return self._memory

    def deviceSynchronize(self) -> None:  # noqa: N802
        for s in list(self._streams):
            s.synchronize()


_rt = _Runtime()


def configure(devices: int = 1, pci_bus_ids: list[str] | None = None,
              lazy_events: bool = False, free_bytes: int = 16 << 30) -> None:
    """Pretend ``devices`` GPUs are visible (0 = none); resets the current device to 0.

    ``lazy_events``: a GPU that is always behind, so ``Event.done`` is False until the
    host waits for the event (otherwise work completes as soon as anyone looks).
    ``free_bytes``: what ``cuda.runtime.memGetInfo`` reports free (of 16 GiB or more).
    """
    _rt._memory = (int(free_bytes), max(int(free_bytes), 16 << 30))
    _rt._lazy_events = bool(lazy_events)
    _rt._n_devices = int(devices)
    _rt._pci_bus_ids = list(pci_bus_ids or [f"0000:{i + 1:02x}:00.0" for i in range(devices)])
    _rt._current = 0


class Device(_Recorded):
    """``cupy.cuda.Device``: ``use()`` makes it current; also a context manager."""

    _path = "cuda.Device"

    def __init__(self, device: int | None = None) -> None:
        self.id = _rt._current if device is None else int(device)
        if not 0 <= self.id < _rt._n_devices:
            raise RuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {self.id}")
        self._prev: list[int] = []

    def use(self) -> None:
        _rt._current = self.id

    def synchronize(self) -> None:
        _rt.deviceSynchronize()

    @property
    def pci_bus_id(self) -> str:
        return _rt._pci_bus_ids[self.id]

    def __enter__(self) -> Device:
        self._prev.append(_rt._current)
        _rt._current = self.id
        return self

    def __exit__(self, *exc: Any) -> None:
        _rt._current = self._prev.pop()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return self.id

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"


class Event(_Recorded):
    """``cupy.cuda.Event``: marks a point in one stream's queue."""

    _path = "cuda.Event"

    @_keywords("cuda.Event")
    def __init__(self, block: bool = False, disable_timing: bool = False,
                 interprocess: bool = False) -> None:
        self._stream: Stream | None = None
        self._seq = 0

    def record(self, stream: Stream | None = None) -> None:
        s = stream or get_current_stream()
        self._stream, self._seq = s, s._seq

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream._run_until(self._seq)
            self._stream._synced = max(self._stream._synced, self._seq)

    @property
    def done(self) -> bool:
        """Finished? Queued work completes as soon as anyone looks, or, with lazy events,
        only once someone has waited for it."""
        if self._stream is None:
            return True
        if _rt._lazy_events and self._stream._synced < self._seq:
            return False
        self.synchronize()
        return True


class Stream(_Recorded):
    """``cupy.cuda.Stream``: operations issued on it are ordered; copies queue until a sync."""

    _path = "cuda.Stream"

    null: Stream

    @_keywords("cuda.Stream")
    def __init__(self, null: bool = False, non_blocking: bool = False, ptr: int = 0) -> None:
        self._seq = 0          # sequence number of the last operation issued
        self._synced = 0       # the host has waited for everything up to here
        self._ran = 0          # queued copies up to here have run
        self._queue: list[tuple[int, Callable[[], None]]] = []
        self._prev: list[Stream] = []
        self.ptr = 0 if null else id(self)
        _rt._streams.append(self)

    def _issue(self, work: Callable[[], None] | None = None) -> int:
        self._seq += 1
        if work is None:
            self._run_until(self._seq)  # stream order: queued copies come first
            self._ran = self._seq
        else:
            self._queue.append((self._seq, work))
        return self._seq

    def _run_until(self, seq: int) -> None:
        while self._queue and self._queue[0][0] <= seq:
            _, work = self._queue.pop(0)
            work()
        self._ran = max(self._ran, seq)

    def synchronize(self) -> None:
        self._run_until(self._seq)
        self._synced = self._seq

    def record(self, event: Event | None = None) -> Event:
        ev = event or Event()
        ev.record(self)
        return ev

    def wait_event(self, event: Event) -> None:
        if event._stream is not None:
            event._stream._run_until(event._seq)

    def use(self) -> Stream:
        _current_stream[-1] = self
        return self

    def __enter__(self) -> Stream:
        _current_stream.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _current_stream.pop()


Stream.null = Stream(null=True)
_current_stream: list[Stream] = [Stream.null]


def get_current_stream() -> Stream:
    return _current_stream[-1]


try:
    from numpy.lib.array_utils import byte_bounds as _byte_bounds
except ImportError:  # NumPy < 2
    _byte_bounds = np.byte_bounds


class _Buffer:
    """One allocation: its device, and for each byte range written, by which stream and at
    which sequence number it was last written."""

    __slots__ = ("device", "base", "writes")

    def __init__(self, a: np.ndarray, stream: Stream, seq: int) -> None:
        self.device = _rt._current
        self.base = _byte_bounds(a)[0]
        self.writes: dict[tuple[int, int], tuple[Stream, int]] = {}
        self.mark(a, stream, seq)

    def span(self, a: np.ndarray) -> tuple[int, int]:
        lo, hi = _byte_bounds(a)
        return lo - self.base, hi - self.base

    def mark(self, a: np.ndarray, stream: Stream, seq: int) -> None:
        lo, hi = self.span(a)
        for k in [k for k in self.writes if lo <= k[0] and k[1] <= hi]:
            del self.writes[k]  # superseded
        self.writes[(lo, hi)] = (stream, seq)

    def last_writes(self, a: np.ndarray) -> list[tuple[Stream, int]]:
        """(stream, sequence) of the writes that touched the bytes of view ``a``."""
        lo, hi = self.span(a)
        return [w for (a0, a1), w in self.writes.items() if a0 < hi and lo < a1]


# -- pinned host memory -------------------------------------------------------------------
_pinned: list[np.ndarray] = []


def alloc_pinned_memory(nbytes: int) -> np.ndarray:
    """``cupy.cuda.alloc_pinned_memory``: host bytes that ``np.frombuffer(mem, dtype, count)``
    views (here ordinary memory, remembered as pinned)."""
    mem = np.zeros(max(int(nbytes), 1), np.uint8)
    _pinned.append(mem)
    return mem


def _is_pinned(a: np.ndarray) -> bool:
    return any(np.shares_memory(a, m) for m in _pinned)


# -- arrays -------------------------------------------------------------------------------
def _check_device(x: ndarray) -> None:
    if x._buf.device != _rt._current:
        raise ValueError(f"The device where the array resides ({x._buf.device}) is different "
                         f"from the current device ({_rt._current}).")


def _check_ready(x: ndarray, stream: Stream) -> None:
    if any(s is not stream and s._ran < q for s, q in x._buf.last_writes(x._a)):
        raise RuntimeError("an array is read on one stream while a copy into it is still "
                           "queued on another (wait for an event recorded after the copy)")


def _unwrap(x: Any, inputs: list[ndarray], stream: Stream | None) -> Any:
    """The NumPy array behind ``x``; with a stream, ``x``'s data must be ready on it."""
    if isinstance(x, ndarray):
        _check_device(x)
        if stream is not None:
            _check_ready(x, stream)
        inputs.append(x)
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)!r}: a host numpy.ndarray mixed with "
                        "device arrays (upload it explicitly with asarray)")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, inputs, stream) for v in x)
    return x


def _is_basic(key: Any) -> bool:
    """Basic indexing (ints, slices, ..., None): a view, no data is read."""
    keys = key if isinstance(key, tuple) else (key,)
    return all(k is None or k is Ellipsis or isinstance(k, (int, np.integer, slice))
               for k in keys)


def _wrap(r: Any, inputs: list[ndarray], stream: Stream, seq: int) -> Any:
    if isinstance(r, np.generic):
        r = np.asarray(r)
    if isinstance(r, np.ndarray):
        for x in inputs:
            if np.may_share_memory(r, x._a):  # a view of an input: same allocation
                return ndarray(r, x._buf)
        return ndarray(r, _Buffer(r, stream, seq))
    if isinstance(r, tuple):
        return tuple(_wrap(v, inputs, stream, seq) for v in r)
    return r


def _call(fn: Callable[..., Any], *args: Any, writes: ndarray | None = None,
          view: bool = False, **kw: Any) -> Any:
    """Run ``fn`` on unwrapped arguments as one operation on the current stream
    (``view``: it only makes a view, reading no data)."""
    stream = get_current_stream()
    seq = stream._issue()
    inputs: list[ndarray] = []
    out = kw.get("out")
    if out is not None and not isinstance(out, (ndarray, tuple)):
        raise TypeError(f"out must be a device array, not {type(out)!r}")
    uargs = _unwrap(args, inputs, None if view else stream)
    ukw = {k: _unwrap(v, inputs, None if view else stream) for k, v in kw.items()}
    r = fn(*uargs, **ukw)
    for target in (writes, out if isinstance(out, ndarray) else None):
        if target is not None:
            target._buf.mark(target._a, stream, seq)
    if isinstance(out, ndarray):
        return out
    return _wrap(r, inputs, stream, seq)


class _Flags:
    def __init__(self, a: np.ndarray) -> None:
        self.c_contiguous = a.flags.c_contiguous
        self.f_contiguous = a.flags.f_contiguous
        self.owndata = a.base is None


class ndarray(_Recorded):  # noqa: N801  (CuPy's name)
    """A device array of the stand-in module (wraps a NumPy array)."""

    _path = "ndarray"

    __array_priority__ = 1000
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, a: np.ndarray, buf: _Buffer) -> None:
        self._a = a
        self._buf = buf

    # -- refusing implicit conversion ------------------------------------------------
    def __array__(self, *args: Any, **kw: Any) -> np.ndarray:
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kw: Any) -> Any:
        if any(isinstance(v, np.ndarray) for v in inputs):
            raise TypeError(f"Unsupported type {np.ndarray!r} in numpy.{ufunc.__name__} "
                            "with a device array")
        raise TypeError(f"numpy.{ufunc.__name__} called on a device array: use the "
                        "backend's array module")

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        raise TypeError(f"numpy.{func.__name__} called on a device array: use the backend's "
                        "array module (xp), not numpy")

    def _scalar(self, kind: type) -> Any:
        if self._a.size != 1:
            if kind is bool:
                raise ValueError("The truth value of an array with more than one element is "
                                 "ambiguous. Use a.any() or a.all()")
            raise TypeError("only length-1 arrays can be converted to Python scalars")
        _sync_for_read(self)
        stats["scalar"] += 1
        return kind(self._a.reshape(()))

    def __float__(self) -> float:
        return self._scalar(float)

    def __int__(self) -> int:
        return self._scalar(int)

    def __bool__(self) -> bool:
        return self._scalar(bool)

    def __complex__(self) -> complex:
        return self._scalar(complex)

    def item(self) -> Any:
        _sync_for_read(self)
        stats["scalar"] += 1
        return self._a.item()

    def tolist(self) -> Any:
        _sync_for_read(self)
        stats["d2h"] += 1
        return self._a.tolist()

    # -- crossing explicitly -----------------------------------------------------------
    @_keywords("ndarray.get")
    def get(self, stream: Stream | None = None, order: str = "C", out: np.ndarray | None = None,
            blocking: bool = True) -> np.ndarray:
        """A host copy; with a stream, a pinned ``out`` and ``blocking=False`` it is queued."""
        _check_device(self)
        if out is not None and (not isinstance(out, np.ndarray) or out.shape != self.shape
                                or out.dtype != self.dtype or not out.flags.c_contiguous):
            raise ValueError("out must be a C-contiguous numpy array of the same shape and dtype")
        if stream is None or blocking:
            s = stream or get_current_stream()
            _check_ready(self, s)
            s.synchronize()
            stats["d2h"] += 1
            if out is None:
                return self._a.copy()
            out[...] = self._a
            return out
        if out is None:
            raise ValueError("an asynchronous get needs an out array")
        if not _is_pinned(out):
            stats["pageable_async"] += 1
        _check_ready(self, stream)
        src = self
        out[...] = np.nan if out.dtype.kind == "f" else 0x5A  # poison until the copy runs

        def copy() -> None:
            out[...] = src._a
            stats["d2h"] += 1
        stream._issue(copy)
        return out

    @_keywords("ndarray.set")
    def set(self, arr: np.ndarray, stream: Stream | None = None) -> None:
        """Copy host ``arr`` in; with a stream the copy is queued on it."""
        _check_device(self)
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, not {type(arr)}")
        if arr.dtype != self.dtype:
            raise TypeError(f"Incompatible dtype: {arr.dtype} != {self.dtype}")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch: {arr.shape} != {self.shape}")
        if not self._a.flags.c_contiguous:
            raise RuntimeError("Cannot set to non-contiguous array")
        if stream is None:
            s = get_current_stream()
            s.synchronize()
            self._a[...] = arr
            stats["h2d"] += 1
            self._buf.mark(self._a, s, s._issue())
            s._synced = s._seq  # a synchronous copy
            return
        if not _is_pinned(arr):
            stats["pageable_async"] += 1
        expected = arr.copy()
        dst = self._a

        def copy() -> None:
            if not np.array_equal(arr, expected, equal_nan=arr.dtype.kind in "fc"):
                raise RuntimeError("a pinned host buffer changed before its queued upload "
                                   "ran (wait for the copy's event before refilling it)")
            dst[...] = arr
            stats["h2d"] += 1
        self._buf.mark(self._a, stream, stream._issue(copy))

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        if any(s._synced < q for s, q in self._buf.last_writes(self._a)):
            raise RuntimeError("a device buffer was handed to MPI (or another library) "
                               "before the stream that wrote it was synchronised")
        if not self._a.flags.c_contiguous:
            raise RuntimeError("a non-contiguous device array was exported")
        stats["cai_exports"] += 1
        return {"shape": self._a.shape, "typestr": self._a.dtype.str, "strides": None,
                "data": (self._a.ctypes.data, False), "version": 3, "stream": None}

    @property
    def data(self) -> SimpleNamespace:
        return SimpleNamespace(ptr=self._a.ctypes.data, device_id=self._buf.device)

    @property
    def device(self) -> Device:
        return Device(self._buf.device)

    # -- NumPy-like attributes -------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: _Flags(self._a))
    T = property(lambda self: _call(lambda a: a.T, self, view=True))

    def __len__(self) -> int:
        return len(self._a)

    def __repr__(self) -> str:
        return (f"strict_xp.ndarray(shape={self.shape}, dtype={self.dtype}, "
                f"device={self._buf.device})")

    def __iter__(self) -> Any:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, key: Any) -> Any:
        return _call(operator.getitem, self, key, view=_is_basic(key))

    def __setitem__(self, key: Any, value: Any) -> None:
        _call(operator.setitem, self, key, value, writes=self)

    def fill(self, value: Any) -> None:
        _call(lambda a, v: a.fill(v), self, value, writes=self)

    def copy(self, order: str = "C") -> ndarray:
        return _call(lambda a: a.copy(order), self)


_VIEWS = ("reshape", "ravel", "transpose", "view", "squeeze")


def _method(name: str) -> Callable[..., Any]:
    def m(self: ndarray, *args: Any, **kw: Any) -> Any:
        return _call(lambda a, *aa, **kk: getattr(a, name)(*aa, **kk), self, *args,
                     view=name in _VIEWS, **kw)
    m.__name__ = name
    return m


for _name in ("reshape", "ravel", "astype", "sum", "mean", "max", "min", "argmax", "argmin",
              "any", "all", "transpose", "view", "squeeze", "cumsum", "prod", "dot", "clip"):
    setattr(ndarray, _name, _method(_name))


def _binary(fn: Callable[[Any, Any], Any], reflected: bool = False) -> Callable[..., Any]:
    if reflected:
        return lambda self, other: _call(lambda a, b: fn(b, a), self, other)
    return lambda self, other: _call(fn, self, other)


def _inplace(fn: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    def op(self: ndarray, other: Any) -> ndarray:
        _call(fn, self, other, writes=self)
        return self
    return op


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
            "xor", "lshift", "rshift"):
    _f = getattr(operator, _op if _op not in ("and", "or") else _op + "_")
    setattr(ndarray, f"__{_op}__", _binary(_f))
    setattr(ndarray, f"__r{_op}__", _binary(_f, reflected=True))
    setattr(ndarray, f"__i{_op}__", _inplace(getattr(operator, f"i{_op}" if _op not in
                                                     ("and", "or") else f"i{_op}")))
for _op in ("lt", "le", "eq", "ne", "gt", "ge"):
    setattr(ndarray, f"__{_op}__", _binary(getattr(operator, _op)))
for _op in ("neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{_op}__", (lambda f: lambda self: _call(f, self))(getattr(operator, _op)))


def _sync_for_read(x: ndarray) -> None:
    """What a blocking device-to-host read does: wait for the stream that wrote ``x``."""
    _check_device(x)
    s = get_current_stream()
    _check_ready(x, s)
    s.synchronize()
    for w, q in x._buf.last_writes(x._a):
        w._run_until(q)


# -- module functions ----------------------------------------------------------------------
@_keywords("asarray")
def asarray(a: Any, dtype: Any = None, order: Any = None) -> ndarray:
    """A device array: ``a`` itself (or a cast) when already one, else an upload (counted)."""
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    if isinstance(a, (list, tuple)) and any(isinstance(v, ndarray) for v in a):
        raise TypeError(_IMPLICIT)
    host = np.array(a, dtype=dtype, order="C", copy=True)
    stats["h2d"] += 1
    s = get_current_stream()
    out = ndarray(host, _Buffer(host, s, s._issue()))
    s._synced = s._seq  # a synchronous copy from pageable memory
    return out


@_keywords("array")
def array(a: Any, dtype: Any = None, copy: bool = True) -> ndarray:
    if isinstance(a, ndarray):
        return a.astype(dtype or a.dtype, copy=True)
    return asarray(a, dtype)


@_keywords("asnumpy")
def asnumpy(a: Any, stream: Stream | None = None, order: str = "C",
            out: np.ndarray | None = None, blocking: bool = True) -> np.ndarray:
    """``cupy.asnumpy``: a host copy of a device array (NumPy input is returned as is)."""
    if isinstance(a, ndarray):
        return a.get(stream=stream, out=out, blocking=blocking)
    return np.asarray(a, order=order)


def get_array_module(*args: Any) -> ModuleType:
    for a in args:
        if isinstance(a, ndarray):
            return sys.modules[__name__]
    return np


@_keywords("copyto")
def copyto(dst: ndarray, src: Any, casting: str = "same_kind", where: Any = True) -> None:
    _call(lambda d, s, w: np.copyto(d, s, casting=casting, where=w), dst, src, where,
          writes=dst)


_CREATORS = ("zeros", "empty", "ones", "full", "arange", "eye", "linspace")
_PASSTHROUGH = ("dtype", "finfo", "iinfo", "newaxis", "inf", "nan", "pi", "e", "float16",
                "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
                "uint32", "uint64", "bool_", "intp", "result_type", "promote_types",
                "can_cast", "ndim", "shape", "isscalar", "integer", "floating", "generic")


def __getattr__(name: str) -> Any:
    """Any other NumPy function, applied to unwrapped device arrays as one operation."""
    if name in _PASSTHROUGH:
        return getattr(np, name)
    target = getattr(np, name, None)
    if target is None or isinstance(target, (type, ModuleType)) or not callable(target):
        raise AttributeError(f"module 'strict_xp' has no attribute {name!r}")

    @_keywords(name)
    def fn(*args: Any, **kw: Any) -> Any:
        out = kw.get("out")
        return _call(target, *args, writes=out if isinstance(out, ndarray) else None, **kw)
    fn.__name__ = name
    return fn


def _as_strided(x: ndarray, shape: Any = None, strides: Any = None) -> ndarray:
    """``cupy.lib.stride_tricks.as_strided``: a view, read-only here (writes through
    overlapping windows are a bug on either side)."""
    return _call(lambda a: np.lib.stride_tricks.as_strided(a, shape, strides, writeable=False),
                 x, view=True)


lib = _Namespace("lib", stride_tricks=_Namespace("lib.stride_tricks", as_strided=_as_strided))


# -- the ``cuda`` namespace ---------------------------------------------------------------
cuda = _Namespace(
    "cuda",
    runtime=_rt, Device=Device, Stream=Stream, Event=Event,
    get_current_stream=get_current_stream, alloc_pinned_memory=alloc_pinned_memory)


ndarray.__array_module__ = sys.modules[__name__]  # type: ignore[attr-defined]
sys.modules[__name__].__class__ = _RecordedModule
