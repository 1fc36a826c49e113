"""Relays a guest process's stdio to local file descriptors over the agent's stream RPCs."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from kata.agent.client import AgentClient, StreamEOF

_CHUNK = 64 * 1024


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class StdioRelay:
    """One thread per direction. stdin EOF becomes CloseStdin; output ends at the agent's EOF."""

    def __init__(self, agent: AgentClient, cid: str, exec_id: str, stdin_fd: int | None,
                 stdout_fd: int, stderr_fd: int, terminal: bool) -> None:
        self.agent = agent
        self.cid = cid
        self.exec_id = exec_id
        self.stdin_fd = stdin_fd
        self.terminal = terminal
        self._outputs: list[threading.Thread] = []
        self._targets: list[tuple[Callable[..., bytes], int]] = [(self._read_stdout, stdout_fd)]
        if not terminal:  # a terminal merges stderr into the pty
            self._targets.append((self._read_stderr, stderr_fd))

    def _read_stdout(self) -> bytes:
        return bytes(self.agent.read_stdout(container_id=self.cid, exec_id=self.exec_id, length=_CHUNK).data)

    def _read_stderr(self) -> bytes:
        return bytes(self.agent.read_stderr(container_id=self.cid, exec_id=self.exec_id, length=_CHUNK).data)

    def start(self) -> None:
        for read, fd in self._targets:
            t = threading.Thread(target=self._pump_out, args=(read, fd), daemon=True)
            t.start()
            self._outputs.append(t)
        if self.stdin_fd is not None:
            threading.Thread(target=self._pump_in, daemon=True).start()

    def _pump_out(self, read: Callable[[], bytes], fd: int) -> None:
        while True:
            try:
                data = read()
            except StreamEOF:
                return
            except Exception:  # connection gone: the waiter reports it
                return
            if data:
                try:
                    _write_all(fd, data)
                except OSError:
                    return

    def _pump_in(self) -> None:
        assert self.stdin_fd is not None
        while True:
            try:
                data = os.read(self.stdin_fd, _CHUNK)
            except OSError:
                data = b""
            try:
                if not data:
                    self.agent.close_stdin(container_id=self.cid, exec_id=self.exec_id)
                    return
                self.agent.write_stdin(container_id=self.cid, exec_id=self.exec_id, data=data)
            except Exception:
                return

    def drain(self, timeout: float) -> None:
        """Wait for the output streams to reach EOF (after the process has exited)."""
        for t in self._outputs:
            t.join(timeout)
