"""Run a helper daemon (QEMU, virtiofsd) detached from its caller.

The daemon must outlive a short-lived CLI process, and a different process may later stop it, so it
is known by a kata.utils.process.ProcessId (pid and start time), not by a ``Popen`` object.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from kata.utils.process import ProcessId


class DaemonError(Exception):
    """The daemon could not be launched; the message is one line."""


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
