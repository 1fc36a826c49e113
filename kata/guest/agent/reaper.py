"""PID 1's child reaper: one thread collects every exit and hands it to whoever registered the pid.

Everything the agent starts goes through `Reaper.spawn`, which registers the pid while holding the
lock the reaper needs to deliver a status, so no exit is lost between fork and registration. Exits
of pids nobody registered yet (a container init that died before we read its --pid-file, or an
orphan) are kept, bounded, for a later `register`.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

_MAX_UNCLAIMED = 4096


def exit_code(wait_status: int) -> int:
    """A shell-style exit code: the exit status, or 128 + the signal number."""
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code


class Exit:
    """The future exit code of one pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._done = threading.Event()
        self._code = -1

    def set(self, code: int) -> None:
        self._code = code
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None on timeout."""
        if not self._done.wait(timeout):
            return None
        return self._code


class Reaper:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiters: dict[int, Exit] = {}
        self._unclaimed: OrderedDict[int, int] = OrderedDict()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        self._thread.start()

    def register(self, pid: int) -> Exit:
        """The Exit of `pid`; already set if the pid exited before registration."""
        with self._cond:
            return self._register_locked(pid)

    def _register_locked(self, pid: int) -> Exit:
        fut = self._waiters.get(pid)
        if fut is not None:
            return fut
        fut = Exit(pid)
        code = self._unclaimed.pop(pid, None)
        if code is not None:
            fut.set(code)
        else:
            self._waiters[pid] = fut
        return fut

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int,
        stdout: int,
        stderr: int,
        env: dict[str, str] | None = None,
        setsid: bool = False,
    ) -> Exit:
        """Start argv[0] (an absolute path) with the given fds as its stdio."""
        actions = [
            (os.POSIX_SPAWN_DUP2, stdin, 0),
            (os.POSIX_SPAWN_DUP2, stdout, 1),
            (os.POSIX_SPAWN_DUP2, stderr, 2),
        ]
        with self._cond:
            pid = os.posix_spawn(
                argv[0], list(argv), env if env is not None else dict(os.environ),
                file_actions=actions, setsid=setsid,
            )
            # An unclaimed status under this brand-new pid belongs to an earlier process.
            self._unclaimed.pop(pid, None)
            fut = self._register_locked(pid)
            self._cond.notify_all()  # wake the reaper if it was idle without children
        return fut

    def _deliver(self, pid: int, code: int) -> None:
        with self._cond:
            fut = self._waiters.pop(pid, None)
            if fut is None:
                self._unclaimed[pid] = code
                while len(self._unclaimed) > _MAX_UNCLAIMED:
                    self._unclaimed.popitem(last=False)
        if fut is not None:
            fut.set(code)

    def _run(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                # No children: orphans cannot appear either, so sleep until spawn() makes one.
                with self._cond:
                    self._cond.wait(1.0)
                continue
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self._deliver(pid, exit_code(status))
