"""Waiting for the first of some processes to end, from any process (pidfds, no polling), each known
by its pid and start time so that a reused pid is never mistaken for it.

Only os, select, signal, threading, time and kata.utils.procfs: the per-process monitor loads it.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable, Sequence

from kata.utils.procfs import stat_fields


def _state_and_start(pid: int) -> tuple[str, int] | None:
    """The state and field 22 of /proc/PID/stat (a reused pid has another start time)."""
    fields = stat_fields(pid)
    try:
        return (fields[0], int(fields[19])) if fields is not None else None
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat; None once the process is gone (or a zombie)."""
    found = _state_and_start(pid)
    return None if found is None or found[0] in ("Z", "X") else found[1]


def pidfd(pid: int, start: int) -> int | None:
    """A pidfd of the process that has this pid and start time, or None when it has gone. A zombie
    still counts: its other threads may still be exiting, and the fd turns readable once they have."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    found = _state_and_start(pid)  # checked after the open: the fd cannot name a later process
    if found is None or found[1] != start:
        os.close(fd)
        return None
    return fd


def wait_ended(fds: Sequence[int], timeout: float) -> bool:
    """Wait until each pidfd of ``fds`` is readable: its process has ended, every thread of it (the
    leader of a killed QEMU is a zombie while its other threads still exit, still in its cgroups).
    True if they all did within ``timeout`` seconds."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    left = len(fds)
    deadline = time.monotonic() + timeout
    while left:
        wait = deadline - time.monotonic()
        ready = poller.poll(max(wait, 0.0) * 1000)  # once at least, a zero timeout too
        if not ready and wait <= 0:
            return False
        for fd, _ in ready:
            poller.unregister(fd)
            left -= 1
    return True


def reaped(fd: int) -> bool:
    """Whether the process of pidfd ``fd`` has been reaped by its parent (a zombie has not: its
    parent has yet to learn of its exit)."""
    try:
        signal.pidfd_send_signal(fd, 0)
    except PermissionError:
        return False  # it is there
    except OSError:
        return True  # ESRCH; anything else leaves nothing to wait for
    return False


def wait_reaped(fds: Sequence[int], timeout: float) -> bool:
    """Wait until the process of each pidfd of ``fds`` has been reaped; True if they all were
    within ``timeout`` seconds. Polled (a reap wakes no pidfd), from 5 ms up to 50 ms apart."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    left = [fd for fd in fds if not reaped(fd)]
    while left:
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
        left = [fd for fd in left if not reaped(fd)]
    return True


def watch(procs: Sequence[tuple[int, int]], on_end: Callable[[], None],
          stop: threading.Event | None = None) -> threading.Thread | None:
    """Call ``on_end`` on a thread of its own as soon as any of ``procs`` (pid, start time) has ended,
    at once when one is gone already; ``stop`` set before one ends means no call (a watcher that
    stops what it watched is not told: it sets ``stop``, then ends them, which wakes the watch). The
    watch sleeps until then: an idle pod's host processes wake for nothing. None when there is
    nothing to watch."""
    if not procs:
        return None
    fds = [fd for fd in (pidfd(pid, start) for pid, start in procs) if fd is not None]

    def run() -> None:
        try:
            if len(fds) == len(procs):  # all alive when we looked: wait for the first to end
                poller = select.poll()
                for fd in fds:
                    poller.register(fd, select.POLLIN)
                poller.poll()
        finally:
            for fd in fds:
                os.close(fd)
        if stop is not None and stop.is_set():
            return
        on_end()

    thread = threading.Thread(target=run, name="vm-watch", daemon=True)
    thread.start()
    return thread


def kill_all(procs: Sequence[tuple[int, int]], sig: int, timeout: float = 5.0) -> None:
    """Send ``sig`` to each of ``procs`` that is still the process it was, and wait up to ``timeout``
    seconds for them to end. A killed QEMU takes a moment to release its memory and go; whoever is
    told next that the VM is gone must not still find it running."""
    fds = []
    for pid, start in procs:
        fd = pidfd(pid, start)
        if fd is None:
            continue
        fds.append(fd)
        try:
            signal.pidfd_send_signal(fd, sig)  # through the fd: never a reused pid
        except OSError:
            pass  # ending already: waited for all the same
    try:
        wait_ended(fds, timeout)
    finally:
        for fd in fds:
            os.close(fd)
