"""Run a helper daemon (QEMU, virtiofsd) detached from its caller, and find, wait on and end it later.

The daemon must outlive a short-lived CLI process, and a different process may later stop it, so
everything here works from a pid plus the process start time (which guards against pid reuse), not
from a ``Popen`` object.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class DaemonError(Exception):
    """The daemon could not be launched; the message is one line."""


@dataclass(frozen=True)
class ProcessId:
    pid: int
    # Field 22 of /proc/PID/stat (clock ticks since boot): a reused pid has another start time.
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        stat = _read_stat(pid)
        if stat is None:
            return None
        return cls(pid, int(stat[19]))

    def is_alive(self) -> bool:
        stat = _read_stat(self.pid)
        if stat is None or int(stat[19]) != self.start_time:
            return False
        if stat[0] in ("Z", "X"):
            _reap(self.pid)
            return False
        return True


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def _reap(pid: int) -> None:
    """Collect the exit status if the process happens to be our child (else init does it)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def launch(argv: Sequence[str], log_path: Path, pass_fds: Sequence[int] = ()) -> ProcessId:
    """Start ``argv`` in a new session with stdin on /dev/null and stdout+stderr appended to ``log_path``.

    The daemon runs with umask 077: its sockets, pid file and logs are born readable by root alone.
    """
    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with open(fd, "ab") as log:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
                pass_fds=tuple(pass_fds),
                umask=0o077,
            )
        except OSError as exc:
            raise DaemonError(f"cannot execute {argv[0]}: {exc.strerror or exc}") from exc
    # Drop Popen's bookkeeping: the pid is waited on through /proc and pidfd from here on.
    proc.returncode = 0
    ident = ProcessId.of(proc.pid)
    if ident is None:  # not reaped yet, so /proc/PID stays readable even if it exited at once
        raise DaemonError(f"{argv[0]} vanished right after launch")
    return ident


def wait_exit(proc: ProcessId, timeout: float) -> bool:
    """Wait until the process has exited; True if it did within ``timeout``."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return True
    except OSError:
        fd = -1
    try:
        while proc.is_alive():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if fd >= 0:
                # A pidfd turns readable when the process exits, child or not.
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                poller.poll(min(left, 0.5) * 1000)
            else:
                time.sleep(min(left, 0.01))
        return True
    finally:
        if fd >= 0:
            os.close(fd)


def signal_process(proc: ProcessId, sig: int) -> None:
    if not proc.is_alive():
        return
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def terminate(proc: ProcessId, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; returns once the process is gone."""
    signal_process(proc, signal.SIGTERM)
    if wait_exit(proc, timeout):
        return
    signal_process(proc, signal.SIGKILL)
    wait_exit(proc, 5.0)


def log_tail(log_path: Path, lines: int = 3, limit: int = 400) -> str:
    """The last non-empty lines of a log joined into one line, for an error message."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    joined = " | ".join(kept)
    return joined if len(joined) <= limit else "…" + joined[-limit:]
