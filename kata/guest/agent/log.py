"""One-line event log of the agent, written to the console (fd 2, ttyS0 → the host's log file).

Not the `logging` module: it costs import time in the guest and PID 1 needs nothing it offers.
"""

from __future__ import annotations

import os
import time

_debug = False


def set_debug(on: bool) -> None:
    global _debug
    _debug = on


def debug_enabled() -> bool:
    return _debug


def _emit(level: str, msg: str) -> None:
    # CLOCK_MONOTONIC counts from the guest kernel's boot: the stamp lines up with the kernel's log.
    line = f"kata-agent[{time.monotonic():9.3f}] {level} {msg}\n"
    try:
        os.write(2, line.encode(errors="replace"))
    except OSError:
        pass  # no console: logging must never take the agent down


def info(msg: str) -> None:
    _emit("info", msg)


def warn(msg: str) -> None:
    _emit("warn", msg)


def debug(msg: str) -> None:
    if _debug:
        _emit("debug", msg)
