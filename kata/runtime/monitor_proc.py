"""Start a container process's monitor (kata.monitor) and learn whether it took over."""

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
from kata.hypervisor.daemon import ProcessId

# The directory that holds the kata package: the monitor runs with -S (no site-packages to scan).
_PACKAGE_PARENT = str(Path(kata.__file__).resolve().parent.parent)


class MonitorError(KataError):
    pass


def spawn(conf: dict[str, Any], label: list[str], timeout: float = 60.0) -> tuple[subprocess.Popen[bytes],
                                                                                  ProcessId]:
    """Start a monitor with ``conf`` and wait for its "ok". It inherits our stdio, which it relays.

    ``label`` ends its argv, so that `ps` shows which container and command it stands for."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ, PYTHONPATH=_PACKAGE_PARENT)
    env.pop("PYTHONSTARTUP", None)
    argv = [sys.executable, "-S", "-m", "kata.monitor", "--control-fd", str(theirs.fileno()), "--", *label]
    try:
        proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), env=env, close_fds=True)
    except OSError as exc:
        raise MonitorError(f"cannot start the container's monitor: {exc}") from exc
    finally:
        theirs.close()
    try:
        ours.sendall(json.dumps(conf).encode() + b"\n")
        ours.settimeout(timeout)
        reply = ours.makefile("rb").readline().decode(errors="replace").strip()
    except OSError as exc:
        reply = f"error no answer: {exc}"
    finally:
        ours.close()
    ident = ProcessId.of(proc.pid)
    if reply != "ok" or ident is None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        why = reply.removeprefix("error ").strip() or f"it exited with status {proc.returncode}"
        raise MonitorError(f"container monitor failed: {why}")
    return proc, ident
