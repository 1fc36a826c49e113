"""A lazily connected QMP session that reports failures as one-line HypervisorErrors."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import HypervisorError

if TYPE_CHECKING:
    from qemu.qmp.legacy import QEMUMonitorProtocol

COMMAND_TIMEOUT = 30.0


def main_loop_ready(path: Path, timeout: float) -> bool:
    """True once QEMU answers a command on the QMP socket, i.e. machine init is over and vCPUs run.

    The greeting alone proves nothing: QMP I/O lives in its own thread, which greets clients while
    the main thread is still loading the kernel (and may yet fail). Commands run on the main loop.
    A raw exchange costs far less than a qemu.qmp handshake (no event loop), and QEMU accepts a new
    client after we hang up.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(max(timeout, 0.01))
            s.connect(str(path))
            s.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"query-status","id":"ready"}\n')
            data = b""
            while b'"id": "ready"' not in data and b'"id":"ready"' not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
            return True
    except OSError:
        return False


class Qmp:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._mon: QEMUMonitorProtocol | None = None

    def _monitor(self) -> QEMUMonitorProtocol:
        if self._mon is None:
            # Imported here: qemu.qmp pulls in asyncio (~60 ms), which start/stop never need.
            from qemu.qmp import QMPError
            from qemu.qmp.legacy import QEMUMonitorProtocol

            mon = QEMUMonitorProtocol(str(self._path))
            try:
                mon.connect(negotiate=True)
            except (QMPError, OSError) as exc:
                raise HypervisorError(f"cannot connect to QMP at {self._path}: {exc}") from exc
            mon.settimeout(COMMAND_TIMEOUT)
            self._mon = mon
        return self._mon

    def run(self, command: str, **args: Any) -> Any:
        from qemu.qmp import QMPError

        try:
            return self._monitor().cmd(command, **args)
        except (QMPError, OSError, TimeoutError) as exc:
            # ExecuteError's text is QEMU's own one-line description.
            raise HypervisorError(f"QMP {command} failed: {str(exc).strip() or type(exc).__name__}") from exc

    def wait_migration(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            info = self.run("query-migrate")
            status = info.get("status", "none")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise HypervisorError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
            if time.monotonic() > deadline:
                self.run("migrate_cancel")
                raise HypervisorError(f"migration not done after {timeout:.0f}s (status {status})")
            time.sleep(0.01)

    def close(self) -> None:
        if self._mon is not None:
            from qemu.qmp import QMPError

            try:
                self._mon.close()
            except (QMPError, OSError):
                pass  # QEMU is usually gone by now
            self._mon = None
