"""A process known by its pid and start time, which another process can find, wait on, signal and
end later: a reused pid has another start time. Nothing here needs the process to be our child."""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

from kata.utils import pidwatch
from kata.utils.procfs import stat_fields


@dataclass(frozen=True)
class ProcessId:
    pid: int
    # Field 22 of /proc/PID/stat (clock ticks since boot): a reused pid has another start time.
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        stat = stat_fields(pid)
        if stat is None:
            return None
        return cls(pid, int(stat[19]))

    def is_alive(self) -> bool:
        stat = stat_fields(self.pid)
        if stat is None or int(stat[19]) != self.start_time:
            return False
        if stat[0] in ("Z", "X"):
            _reap(self.pid)
            return False
        return True


def _reap(pid: int) -> None:
    """Collect the exit status if the process happens to be our child (else init does it)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_exit(proc: ProcessId, timeout: float) -> bool:
    """Wait until the process has ended, every thread of it (kata.utils.pidwatch.wait_ended: a
    cgroup is empty of it then); True if it did within ``timeout``."""
    fd = pidwatch.pidfd(proc.pid, proc.start_time)
    if fd is None:  # gone, or no pidfd to be had: /proc says
        deadline = time.monotonic() + timeout
        while proc.is_alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True
    try:
        ended = pidwatch.wait_ended([fd], timeout)
    finally:
        os.close(fd)
    proc.is_alive()  # reaps it, when it is our child
    return ended


def signal_process(proc: ProcessId, sig: int) -> None:
    """Send ``sig`` through a pidfd (never to a later process with the pid): a zombie leader whose
    other threads still run is signalled too, as wait_exit() waits for them."""
    fd = pidwatch.pidfd(proc.pid, proc.start_time)
    if fd is None:
        return
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise
    finally:
        os.close(fd)


def terminate(proc: ProcessId, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; returns once the process is gone."""
    signal_process(proc, signal.SIGTERM)
    if wait_exit(proc, timeout):
        return
    signal_process(proc, signal.SIGKILL)
    wait_exit(proc, 5.0)


def descendants(pid: int) -> list[int]:
    """The pids of ``pid``'s children, their children and so on, parents first (from each /proc/PID/stat:
    this host's kernel has no /proc/PID/task/TID/children)."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = stat_fields(int(entry))
            if stat is not None:
                parent_of[int(entry)] = int(stat[1])
    found: list[int] = []
    wanted = {pid}
    while wanted:
        children = sorted(p for p, pp in parent_of.items() if pp in wanted and p not in found)
        found += children
        wanted = set(children)
    return found


def null_stdio(fds: tuple[int, ...] = (0, 1, 2)) -> None:
    """Point ``fds`` (this process's standard descriptors) at /dev/null: a daemon forked from a
    command holds none of the command's output, which its caller reads to its end."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
    finally:
        if devnull not in fds:
            os.close(devnull)
