"""A streamed batch source whose reading, decoding and augmenting run in a worker process.

Why: a prefetch thread shares the interpreter lock with the training loop. A streamed
batch is many short reads, and after each the thread must take the lock back; while the
loop runs Python code the thread waits up to a switch interval (5 ms) every time, so it
falls behind exactly when the loop is busiest. A worker process has its own interpreter.

The worker is ``python -m dptrain.data.worker``, started with a JSON description of the
dataset and the transform (plain numbers: the transform's ``describe()``), so it runs the
same ``H5Rows`` and ``BatchTransform`` code and produces the same bytes as the in-process
sources. Batches come back through two slots of shared memory (a file in /dev/shm that
both map, unlinked as soon as the worker has it open, so nothing is left behind by a
crash); requests and replies are a few bytes on its stdin and stdout, and nothing is
pickled. The worker exits when its stdin closes, so it never outlives its parent, and a
worker that dies makes the next ``get`` raise instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import UserError
from .augment import AugmentSpec
from .normalize import ChannelStats
from .transform import BatchTransform

#: request: slot, epoch, training, row count (then the rows as int64)
REQUEST = struct.Struct("<iqiq")
#: reply: status (0 ok, 1 user error, 2 other error), message length (then the message)
REPLY = struct.Struct("<ii")
#: environment variables of MPI launchers, kept from the worker (it is not an MPI rank)
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPI_LOCAL", "MPIR_", "SLURM_STEP")


def _read_exactly(f: IO[bytes], n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = f.read(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _layout(rows: int, sample: tuple[int, ...], xdt: np.dtype, ydt: np.dtype,
            yshape: tuple[int, ...]) -> tuple[int, int, int]:
    """Bytes of one slot's x and y (each start 64-byte aligned) and of the whole slot."""
    xb = -(-rows * int(np.prod(sample, dtype=np.int64)) * xdt.itemsize // 64) * 64
    yb = -(-rows * int(np.prod(yshape, dtype=np.int64)) * ydt.itemsize // 64) * 64
    return xb, yb, xb + yb


def _views(buf: Any, rows: int, sample: tuple[int, ...], xdt: np.dtype, ydt: np.dtype,
           yshape: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    xb, _, slot = _layout(rows, sample, xdt, ydt, yshape)
    out = []
    for k in range(2):
        x = np.ndarray((rows, *sample), xdt, buffer=buf, offset=k * slot)
        y = np.ndarray((rows, *yshape), ydt, buffer=buf, offset=k * slot + xb)
        out.append((x, y))
    return out


class ProcessSource:
    """A ``BatchSource`` streaming an HDF5 split through a worker process."""

    def __init__(self, source: str | Path, transform: BatchTransform, max_rows: int,
                 split: str = "train", training: bool = True, timeout: float = 600.0) -> None:
        from .h5rows import H5Rows  # noqa: PLC0415

        with H5Rows(source, split) as probe:  # shapes, labels; errors named here, not later
            self.n = len(probe)
            self.sample_shape = probe.sample_shape
            self.y = probe.y if probe.y.ndim == 1 else probe.y.astype(transform.dtype)
        self.source, self.split = str(source), split
        self.transform, self.training, self.timeout = transform, training, float(timeout)
        self.max_rows = max(int(max_rows), 1)
        self._proc: subprocess.Popen[bytes] | None = None
        self._map: mmap.mmap | None = None
        self._pending: tuple[int, tuple[bytes, int]] | None = None
        self._current = -1
        #: seconds the last ``get`` blocked waiting for its data
        self.data_wait_seconds = 0.0
        self.total_wait_seconds = 0.0
        #: batches stay on the host
        self.device_rows = None
        self.slots: list[tuple[np.ndarray, np.ndarray]] = []
        # the worker starts at the first request, so that the transform (normalisation
        # statistics of a resumed run) may still be completed after construction

    def __len__(self) -> int:
        return self.n

    # -- the worker --------------------------------------------------------------------------
    def _start(self) -> None:
        ydt, yshape = self.y.dtype, self.y.shape[1:]
        _, _, slot = _layout(self.max_rows, self.sample_shape, self.transform.dtype, ydt,
                             yshape)
        fd, path = tempfile.mkstemp(prefix="dptrain-batches-", dir=_shm_dir())
        try:
            os.ftruncate(fd, 2 * slot)
            self._map = mmap.mmap(fd, 2 * slot)
        finally:
            os.close(fd)
        self.slots = _views(self._map, self.max_rows, self.sample_shape, self.transform.dtype,
                            ydt, yshape)
        spec = {"source": self.source, "split": self.split, "rows": self.max_rows,
                "shm": path, "transform": self.transform.describe(),
                "seed": self.transform.seed}
        env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "dptrain.data.worker", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            self._reply()  # the worker has mapped the slots (or said why not)
        finally:
            Path(path).unlink(missing_ok=True)

    def _reply(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            status, n = REPLY.unpack(_read_exactly(self._proc.stdout, REPLY.size))
            msg = _read_exactly(self._proc.stdout, n).decode("utf-8", "replace") if n else ""
        except EOFError:
            code = self._proc.wait(timeout=self.timeout)
            raise RuntimeError(f"the data worker process exited (code {code}) before "
                               "answering") from None
        if status == 1:
            raise UserError(msg)
        if status:
            raise RuntimeError(f"the data worker failed: {msg}")

    def _send(self, slot: int, rows: np.ndarray, epoch: int) -> None:
        if self._proc is None:
            self._start()
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(REQUEST.pack(slot, int(epoch), int(self.training), len(rows))
                                   + rows.astype(np.int64).tobytes())
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(f"the data worker process exited (code {self._proc.poll()})"
                               ) from None

    def _settle(self) -> None:
        if self._pending is not None:
            self._pending = None
            # the get that wants those rows asks again and gets the error itself
            with contextlib.suppress(UserError):
                self._reply()

    # -- the BatchSource interface -------------------------------------------------------------
    def _check(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"rows must be one-dimensional, got shape {rows.shape}")
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= self.n):
            raise IndexError(f"row out of range 0..{self.n - 1}")
        return rows

    def prefetch(self, rows: np.ndarray, epoch: int) -> None:
        """Ask the worker for ``rows`` of ``epoch`` now; ``get`` collects them."""
        rows = self._check(rows)
        if len(rows) > self.max_rows:
            return
        key = (rows.tobytes(), int(epoch))
        if self._pending is not None:
            if self._pending[1] == key:
                return
            self._settle()
        slot = 1 - self._current if self._current >= 0 else 0
        self._send(slot, rows, epoch)
        self._pending = (slot, key)

    def get(self, rows: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of ``rows`` in ``epoch``, valid until the next ``get``."""
        t0 = time.perf_counter()
        rows = self._check(rows)
        n = len(rows)
        key = (rows.tobytes(), int(epoch))
        if self._pending is not None and self._pending[1] == key:
            slot = self._pending[0]
            self._pending = None
        else:
            self._settle()
            if n > self.max_rows:
                self.close()
                self.max_rows = n
                self._start()
                self._current = -1
            slot = 1 - self._current if self._current >= 0 else 0
            self._send(slot, rows, epoch)
        self._reply()
        self._current = slot
        self.data_wait_seconds = time.perf_counter() - t0
        self.total_wait_seconds += self.data_wait_seconds
        x, y = self.slots[slot]
        return x[:n], y[:n]

    def read_into(self, rows: np.ndarray, epoch: int, x_out: np.ndarray,
                  y_out: np.ndarray) -> None:
        """``get``'s arrays copied into ``x_out[:n]`` and ``y_out[:n]``."""
        x, y = self.get(rows, epoch)
        x_out[:len(x)] = x
        y_out[:len(y)] = y

    def close(self) -> None:
        """Stop the worker (it exits when its stdin closes) and unmap the slots."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._pending = None
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.slots = []
        if self._map is not None:
            self._map.close()
            self._map = None

    def __enter__(self) -> ProcessSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
        else tempfile.gettempdir()


def transform_from(desc: dict[str, Any], seed: int) -> BatchTransform:
    """The transform that ``BatchTransform.describe()`` described."""
    aug = desc.get("augment")
    norm = desc.get("normalize")
    return BatchTransform(desc["dtype"], None if aug is None else AugmentSpec.from_dict(aug),
                          None if norm is None else ChannelStats.from_dict(norm), seed)


def _serve(spec: dict[str, Any]) -> None:
    from .h5rows import H5Rows  # noqa: PLC0415

    out = sys.stdout.buffer
    inp = sys.stdin.buffer

    def reply(status: int, msg: str = "") -> None:
        b = msg.encode("utf-8")
        out.write(REPLY.pack(status, len(b)) + b)
        out.flush()

    try:
        transform = transform_from(spec["transform"], int(spec["seed"]))
        reader = H5Rows(spec["source"], spec["split"])
        y = reader.y if reader.y.ndim == 1 else reader.y.astype(transform.dtype)
        rows_max = int(spec["rows"])
        _, _, slot = _layout(rows_max, reader.sample_shape, transform.dtype, y.dtype,
                             y.shape[1:])
        with open(spec["shm"], "r+b") as f:
            buf = mmap.mmap(f.fileno(), 2 * slot)
        slots = _views(buf, rows_max, reader.sample_shape, transform.dtype, y.dtype,
                       y.shape[1:])
        raw = np.empty((rows_max, *reader.sample_shape), reader.dtype)
    except UserError as e:
        reply(1, str(e))
        return
    reply(0)
    while True:
        try:
            k, epoch, training, n = REQUEST.unpack(_read_exactly(inp, REQUEST.size))
            rows = np.frombuffer(_read_exactly(inp, 8 * n), np.int64) if n else \
                np.zeros(0, np.int64)
        except EOFError:
            return  # the parent closed the pipe (or is gone)
        try:
            x_out, y_out = slots[k]
            got = reader.read(rows, raw)
            transform(got, rows, epoch, bool(training), out=x_out[:n])
            np.take(y, rows, axis=0, out=y_out[:n])
        except UserError as e:
            reply(1, str(e))
            continue
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
            reply(2, f"{type(e).__name__}: {e}")
            continue
        reply(0)


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
