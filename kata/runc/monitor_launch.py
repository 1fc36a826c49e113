"""Start a container process's monitor (kata.runc.monitor) and learn whether it took over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import kata
from kata.errors import KataError
from kata.utils.process import ProcessId

# The directory that holds the kata package: the monitor runs with -S (no site-packages to scan).
_PACKAGE_PARENT = str(Path(kata.__file__).resolve().parent.parent)


def metrics_library() -> str:
    """Where prometheus-client is installed: the monitor, started with -S, adds it to its path on the
    first scrape of its sandbox's metrics (and only then pays for the import)."""
    import importlib.util

    spec = importlib.util.find_spec("prometheus_client")
    return str(Path(spec.origin).parent.parent) if spec is not None and spec.origin else ""


# Control sockets of detached monitors, open until this process exits (see PendingMonitor.configure).
_HELD: list[socket.socket] = []


class MonitorError(KataError):
    pass


class PendingMonitor:
    """A monitor started ahead of time: Python's start-up overlaps the VM's, and the monitor waits
    for its configuration. It inherits our stdio, which it relays."""

    def __init__(self, label: list[str], stdio: tuple[int | None, int | None, int | None] = (None, None, None)
                 ) -> None:
        """``label`` ends its argv, so that `ps` shows which container it stands for (never the
        container's command: host command lines are readable by every local user); ``stdio``: the
        descriptors it relays, when not ours."""
        self._control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ, PYTHONPATH=_PACKAGE_PARENT)
        env.pop("PYTHONSTARTUP", None)
        argv = [sys.executable, "-S", "-m", "kata.runc.monitor", "--control-fd", str(theirs.fileno()), "--",
                *label]
        try:
            self.proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), env=env, close_fds=True,
                                         stdin=stdio[0], stdout=stdio[1], stderr=stdio[2])
        except OSError as exc:
            self._control.close()
            raise MonitorError(f"cannot start the container's monitor: {exc}") from exc
        finally:
            theirs.close()

    def configure(self, conf: dict[str, Any], timeout: float = 60.0) -> ProcessId:
        """Hand over the work and wait for "ok"; the monitor runs on its own from then on.

        A detached monitor outlives this process; its control socket stays open here until this
        process exits (or calls release()), which is how the monitor learns that our caller has its
        pid (see kata.runc.monitor.LauncherWatch). A foreground one is waited for: it is let go at
        once."""
        reply = ""
        try:
            self._control.sendall(json.dumps(conf).encode() + b"\n")
            self._control.settimeout(timeout)
            reply = self._control.makefile("rb").readline().decode(errors="replace").strip()
        except OSError as exc:
            reply = f"error no answer: {exc}"
        finally:
            if reply == "ok" and not conf.get("foreground"):
                _HELD.append(self._control)  # not closed when this object is collected
            else:
                self._control.close()
        ident = ProcessId.of(self.proc.pid)
        if reply != "ok" or ident is None:
            self.cancel()
            why = reply.removeprefix("error ").strip() or f"it exited with status {self.proc.returncode}"
            raise MonitorError(f"container monitor failed: {why}")
        return ident

    def release(self) -> None:
        """Let a configured monitor exit when it may: for a caller that lives on after handing the
        monitor's pid over (kata-runtime itself lets process exit do it)."""
        if self._control in _HELD:
            _HELD.remove(self._control)
        self._control.close()

    def cancel(self) -> None:
        self._control.close()  # an unconfigured monitor exits when its control socket closes
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
