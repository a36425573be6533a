"""A collective-timeout watchdog: aborts the job when communication stalls."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Watchdog:
    """``arm(what)`` before a collective, ``disarm()`` after; a stall past ``timeout`` aborts."""

    def __init__(self, timeout: float, on_timeout: Callable[[str], None], rank: int = 0) -> None:
        self.timeout = timeout
        self.on_timeout = on_timeout
        self.rank = rank
        self._what: str | None = None
        self._since = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if timeout > 0:
            self._thread = threading.Thread(target=self._run, name="dptrain-watchdog",
                                            daemon=True)
            self._thread.start()

    def arm(self, what: str) -> None:
        if self._thread is not None:
            with self._lock:
                self._what, self._since = what, time.monotonic()

    def disarm(self) -> None:
        if self._thread is not None:
            with self._lock:
                self._what = None

    @contextmanager
    def watching(self, what: str) -> Iterator[None]:
        """Armed for ``what`` while the block runs."""
        self.arm(what)
        try:
            yield
        finally:
            self.disarm()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            with self._lock:
                what, since = self._what, self._since
            if what is not None and time.monotonic() - since > self.timeout:
                print(f"[rank {self.rank}] dptrain: error: {what} did not complete within "
                      f"{self.timeout:g} s (--collective-timeout): another rank is stuck or "
                      "gone; aborting the job", file=sys.stderr, flush=True)
                self.on_timeout(what)
                return

    def close(self) -> None:
        self._stop.set()
