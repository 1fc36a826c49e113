"""Running a container process in the foreground (`run`, and `exec` without --detach): the caller's
terminal is put in raw mode and handed to the monitor, signals sent to us go to the monitor (which
forwards them into the guest), and we end with the monitor's status."""

from __future__ import annotations

import os
import signal
import subprocess
import termios
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kata.runc.monitor import NOT_FORWARDED


@contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    """The caller's terminal in raw mode while a tty process runs: the guest's pty does the
    line discipline, so ours must pass every byte through."""
    saved = None
    if enabled and os.isatty(0):
        saved = termios.tcgetattr(0)
        tty.setraw(0)
    try:
        yield
    finally:
        if saved is not None:
            # The monitor held the terminal's foreground: take it back first (ignoring SIGTTOU,
            # which a background process gets for both calls).
            old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            try:
                os.tcsetpgrp(0, os.getpgrp())
                termios.tcsetattr(0, termios.TCSADRAIN, saved)
            except OSError:
                pass
            finally:
                signal.signal(signal.SIGTTOU, old)


@contextmanager
def forwarding_signals(proc: subprocess.Popen[bytes], enabled: bool = True) -> Iterator[None]:
    """Our signals go to the monitor while the block runs. Entered before the process starts: once
    it runs, a caller may signal us (it has seen the process's output), and the default action
    would end us and leave the container behind."""
    def forward(signum: int, _frame: Any) -> None:
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {}
    if enabled:
        for s in signal.Signals:
            if s not in NOT_FORWARDED or s == signal.SIGWINCH:
                try:
                    previous[s] = signal.signal(s, forward)
                except (OSError, ValueError):
                    pass
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def wait(proc: subprocess.Popen[bytes]) -> int:
    """The monitor's exit status, as a shell would give it (run inside forwarding_signals)."""
    while True:
        try:
            code = proc.wait()
            break
        except InterruptedError:
            continue
    return code if code >= 0 else 128 - code
