"""Progress display for long builds: a live status line on a terminal, plain timestamped lines otherwise."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

_SPINNER = "|/-\\"
# Without a terminal, print at most one line per interval for chatty steps (the kernel make prints thousands).
_PLAIN_INTERVAL = 10.0
_PLAIN_FIRST = 8  # a step's first messages are shown in full: short steps stay readable


class Progress:
    def __init__(self, stream: TextIO | None = None, live: bool | None = None) -> None:
        self._out = stream or sys.stdout
        self._live = self._out.isatty() if live is None else live
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._step = ""
        self._step_t0 = 0.0
        self._message = ""
        self._count = 0
        self._last_plain = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def _elapsed(self) -> str:
        return f"[{time.monotonic() - self._t0:6.1f}s]"

    def _write_line(self, text: str) -> None:
        if self._live:
            self._out.write("\r\033[K")
        self._out.write(text + "\n")
        self._out.flush()

    def _redraw(self, frame: int) -> None:
        took = time.monotonic() - self._step_t0
        counter = f" ({self._count} lines)" if self._count else ""
        width = 100
        text = f"{_SPINNER[frame % 4]} {self._step} {took:5.1f}s{counter} {self._message}"
        self._out.write("\r\033[K" + text[:width])
        self._out.flush()

    def _tick(self) -> None:
        frame = 0
        while not self._stop.wait(0.2):
            with self._lock:
                self._redraw(frame)
            frame += 1

    def log(self, message: str) -> None:
        """A message from inside the current step (also usable as the kernel build's log callback)."""
        with self._lock:
            self._count += 1
            self._message = message
            now = time.monotonic()
            if not self._live and (self._count <= _PLAIN_FIRST or now - self._last_plain >= _PLAIN_INTERVAL):
                self._last_plain = now
                self._write_line(f"{self._elapsed()}   {self._step}: {message}")

    def note(self, message: str) -> None:
        with self._lock:
            self._write_line(f"{self._elapsed()} {message}")

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        with self._lock:
            self._step, self._step_t0, self._message, self._count = name, time.monotonic(), "", 0
            self._last_plain = time.monotonic()
            if not self._live:
                self._write_line(f"{self._elapsed()} {name} ...")
        if self._live:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        ok = False
        try:
            yield
            ok = True
        finally:
            if self._ticker is not None:
                self._stop.set()
                self._ticker.join()
                self._ticker = None
            with self._lock:
                took = time.monotonic() - self._step_t0
                self._write_line(f"{self._elapsed()} {name}: {'done' if ok else 'FAILED'} in {took:.1f}s")
