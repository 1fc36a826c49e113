"""What a hung test saw: the processes of a container stack (daemons, shims, kata-runtime, monitors,
QEMU, virtiofsd, clients) with their parents, states and kernel wait channels, and the Python stacks of
ours (py-spy, from the dev extra). Taken while the hang lasts, so that a failure that happens only on
a CI machine says where everything waited.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from kata.utils.procfs import stat_fields

# Command-line words of the processes worth showing.
WATCHED = (b"containerd", b"dockerd", b"docker", b"ctr", b"kata", b"qemu-system", b"virtiofsd", b"crictl",
           b"podman", b"conmon")
# The whole report's time: py-spy reads one process at a time.
REPORT_TIMEOUT = 20.0


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return "?"


def _processes() -> list[tuple[int, int, str, str, str]]:
    """(pid, ppid, state, wchan, command line) of the watched processes."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat_fields(entry)
        if not fields or not any(w in cmd for w in WATCHED):
            continue
        text = cmd.replace(b"\0", b" ").decode(errors="replace").strip()
        found.append((int(entry), int(fields[1]), fields[0], _read(f"/proc/{entry}/wchan"), text[:160]))
    return sorted(found)


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"  # the venv's, when PATH does not have it
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def _python_stacks(pid: int, tool: str, timeout: float) -> str:
    if timeout <= 0:
        return "    (no time left)"
    try:
        # --nonblocking: the process is read as it runs, not stopped (the hang must not move).
        proc = subprocess.run([tool, "dump", "--nonblocking", "--pid", str(pid)], capture_output=True,
                              text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"    (py-spy: {exc})"
    lines = (proc.stdout or proc.stderr).splitlines()
    return "\n".join(f"    {line}" for line in lines if line.strip())


def snapshot(timeout: float = REPORT_TIMEOUT) -> str:
    """The report, as text, within about ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    me = os.getpid()
    procs = [p for p in _processes() if p[0] != me]
    lines = [f"{pid} ppid {ppid} {state} wchan={wchan}: {cmd}" for pid, ppid, state, wchan, cmd in procs]
    tool = _py_spy()
    for pid, _ppid, _state, _wchan, cmd in procs:
        if "python" in cmd.split(" ", 1)[0] or "kata-runtime" in cmd or "containerd-shim-kata" in cmd:
            stacks = (_python_stacks(pid, tool, deadline - time.monotonic()) if tool
                      else "    (py-spy is not installed)")
            lines.append(f"-- {pid} {cmd[:80]}\n{stacks}")
    return "\n".join(lines) or "(no process of the container stack is running)"


class HangWatch:
    """Takes a snapshot once ``after`` seconds have passed inside the block; ``report`` holds it
    once the block has ended."""

    def __init__(self, after: float) -> None:
        self.report = ""
        self._timer = threading.Timer(after, self._take)
        self._timer.daemon = True

    def _take(self) -> None:
        self.report = snapshot()

    def __enter__(self) -> HangWatch:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._timer.join(REPORT_TIMEOUT + 10)  # a snapshot under way finishes first
