"""A lazily connected QMP session that reports failures as one-line HypervisorErrors."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from .base import HypervisorError

COMMAND_TIMEOUT = 30.0


def main_loop_ready(path: Path, timeout: float) -> bool:
    """True once QEMU answers a command on the QMP socket, i.e. machine init is over and vCPUs run.

    The greeting alone proves nothing: QMP I/O lives in its own thread, which greets clients while
    the main thread is still loading the kernel (and may yet fail). Commands run on the main loop.
    QEMU accepts a new client after we hang up.
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
    """A synchronous QMP client: one JSON object per line each way; events are skipped.

    Our own rather than qemu.qmp's: that one runs an asyncio loop (about 60 ms to import, a thread,
    and a destructor that can fail at interpreter exit), which a few commands do not need.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self._next_id = 0

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(COMMAND_TIMEOUT)
            sock.connect(str(self._path))
            self._sock, self._reader = sock, sock.makefile("rb")
            self._read()  # the greeting
            self._exchange("qmp_capabilities", {})
        except (OSError, ValueError, HypervisorError) as exc:
            self.close()
            sock.close()
            raise HypervisorError(f"cannot connect to QMP at {self._path}: {exc}") from exc

    def _read(self) -> dict[str, Any]:
        line = self._reader.readline()
        if not line:
            raise HypervisorError("QMP connection closed by QEMU")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise HypervisorError(f"unexpected QMP message {line[:80]!r}")
        return msg

    def _exchange(self, command: str, args: dict[str, Any], pass_fd: int | None = None) -> Any:
        assert self._sock is not None
        self._next_id += 1
        ident = f"k{self._next_id}"
        request: dict[str, Any] = {"execute": command, "id": ident}
        if args:
            request["arguments"] = args
        data = json.dumps(request).encode() + b"\n"
        if pass_fd is None:
            self._sock.sendall(data)
        elif socket.send_fds(self._sock, [data], [pass_fd]) != len(data):
            raise HypervisorError(f"QMP {command}: short write")
        while True:
            msg = self._read()
            if msg.get("id") != ident:
                continue  # an event, or the greeting's leftovers
            if "error" in msg:
                raise HypervisorError(str(msg["error"].get("desc", msg["error"])))
            return msg.get("return")

    # Positional-only: QMP arguments may be named "fd" or "command" (netdev_add's tap fd=).
    def run(self, command: str, /, **args: Any) -> Any:
        return self.run_with_fd(command, None, **args)

    def run_with_fd(self, command: str, fd: int | None, /, **args: Any) -> Any:
        """Run ``command`` with ``fd`` sent along as SCM_RIGHTS (what getfd and add-fd take)."""
        try:
            if self._sock is None:
                self._connect()
            return self._exchange(command, args, fd)
        except (OSError, ValueError, HypervisorError) as exc:
            # QEMU's error text is its own one-line description.
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
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
