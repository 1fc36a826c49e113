"""Wake-ups on SIGIO from virtio-serial ports, for every port that waits for its host.

A port's reads are EOF, and poll() reports it readable, for as long as no host client is
connected, so the only way to sleep until one arrives is the SIGIO the port raises when its host
side opens. The signal is the process's: one handler writes a byte to the pipe of every port that
asked (each waiter then looks at its own port), so the agent channel and the debug console can both
wait on theirs.
"""

from __future__ import annotations

import fcntl
import os
import signal

from kata.guest.agent import log

# Write ends of the wake-up pipes. Appended to from any thread; the handler only iterates.
_pipes: list[int] = []
_installed = False


def _on_sigio(_sig: int, _frame: object) -> None:
    # Only writes to non-blocking pipes: a handler that took a lock (threading.Event.set) could
    # interrupt the main thread while it holds that same lock, and hang the agent.
    for w in list(_pipes):
        try:
            os.write(w, b"x")
        except BlockingIOError:
            pass  # a wake-up is pending already


def install() -> bool:
    """Install the handler; only the main thread can (later calls do nothing). False if it could not."""
    global _installed
    if not _installed:
        try:
            signal.signal(signal.SIGIO, _on_sigio)
        except (OSError, ValueError) as e:
            log.warn(f"no SIGIO handler: {e}")
            return False
        _installed = True
    return True


def watch(fd: int) -> int | None:
    """The read end of a pipe that gets a byte on each SIGIO (from ``fd`` or any other watched
    port); None when ports cannot signal here, and the caller must poll instead."""
    if not install():
        return None
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
    except OSError as e:
        log.warn(f"no SIGIO from port fd {fd}, polling for the host instead: {e}")
        os.close(r)
        os.close(w)
        return None
    _pipes.append(w)
    return r


def drain(r: int) -> None:
    try:
        while os.read(r, 64):
            pass
    except BlockingIOError:
        pass
