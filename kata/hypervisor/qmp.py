"""A lazily connected QMP session that reports failures as one-line HypervisorErrors."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from .base import HypervisorError

COMMAND_TIMEOUT = 30.0


def greeting_ready(path: Path, timeout: float = 0.2) -> bool:
    """True once QEMU's main loop answers on the QMP socket.

    Listening starts when the chardev is created, before machine init; the greeting is only sent from
    the main loop, i.e. once the devices exist and the vCPUs run. Reading it on a raw socket costs far
    less than a QMP handshake (no event loop), and QEMU accepts a fresh client after we hang up.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            return s.recv(64).startswith(b'{"QMP"')
    except OSError:
        return False


class Qmp:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._mon: QEMUMonitorProtocol | None = None

    def _monitor(self) -> QEMUMonitorProtocol:
        if self._mon is None:
            mon = QEMUMonitorProtocol(str(self._path))
            try:
                mon.connect(negotiate=True)
            except (QMPError, OSError) as exc:
                raise HypervisorError(f"cannot connect to QMP at {self._path}: {exc}") from exc
            mon.settimeout(COMMAND_TIMEOUT)
            self._mon = mon
        return self._mon

    def run(self, command: str, **args: Any) -> Any:
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
            try:
                self._mon.close()
            except (QMPError, OSError):
                pass  # QEMU is usually gone by now
            self._mon = None
