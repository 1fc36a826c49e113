"""Waits, for a signal sent right after `crun start`, until a container's process is ready for it.

crun start returns once the container's init has been released to exec, not once the workload
runs. Under TCG the exec and the workload's own start take tens of milliseconds, and a SIGTERM in
that window reaches a PID 1 without a handler yet: the kernel drops it, and a stop waits out its
whole grace period. So a signal to a container's init sent within SETTLE_LIMIT of its start waits
until the new program runs and has either decided what SIGTERM (the stop signal of Kubernetes and
Docker) does to it (a handler, or ignored), or gone to sleep (waiting for work, for a child, for
input), or has exited; a program that does none of these (busy from its first instruction) is waited
for until SETTLE_LIMIT after its start. StartContainer itself does not wait: only a stop that
follows at once pays. A handler for
another signal does not count: a shell installs its SIGCHLD handler before it runs the script that
traps SIGTERM.
"""

from __future__ import annotations

import os
import signal
import time

SETTLE_LIMIT = 0.5  # seconds after the start; also the most a signal can be held back because of this
_POLL = 0.002
_SETTLED_STATES = frozenset("SZXTtI")  # sleeping, exited, stopped, traced, idle
_SIGTERM_BIT = 1 << (signal.SIGTERM - 1)  # in /proc/PID/status's signal masks


def _status(pid: int) -> dict[str, str] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except (OSError, ValueError):
        return None


def exe_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def settled(pid: int, launcher_exe: str) -> bool:
    """The process is gone, or runs its own program and has decided on SIGTERM or sleeps. ``launcher_exe``:
    what /proc/PID/exe showed before the start (crun's init, which may run from a memfd copy)."""
    status = _status(pid)
    if status is None:
        return True
    state = status.get("State", "R")[:1]
    if state in "ZX":
        return True
    if exe_of(pid) in (launcher_exe, None):
        return False  # still crun's init, between the start fifo and execve
    decided = int(status.get("SigCgt", "0") or "0", 16) | int(status.get("SigIgn", "0") or "0", 16)
    return state in _SETTLED_STATES or bool(decided & _SIGTERM_BIT)


def wait_settled(pid: int, launcher_exe: str, limit: float = SETTLE_LIMIT) -> float:
    """Seconds waited (at most ``limit``)."""
    began = time.monotonic()
    while not settled(pid, launcher_exe):
        if time.monotonic() - began >= limit:
            break
        time.sleep(_POLL)
    return time.monotonic() - began
