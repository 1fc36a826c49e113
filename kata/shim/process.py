"""One process of a task (the container's init, or an exec): its state, its stdio relay and its exit.

States follow containerd's: created -> running -> stopped; a task's init may also be paused. The
exit is recorded only after the process's output has been copied out and its stdio closed, so a
client that sees the exit has all the output (containerd's clients wait on both).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from kata import ttrpc
from kata.agent_client import relay
from kata.agent_client.lite import LiteAgent
from kata.sandbox.status import VM_GONE_STATUS, Status, exit_status
from kata.shim.stdio import ProcessIO, StdinOpener, StdioPaths, open_outputs
from kata.utils.text import one_line

# After an exit, how long its remaining output may take to drain before stdio is closed anyway.
_DRAIN_TIMEOUT = 10.0

log = logging.getLogger("kata.shim")


class Process:
    def __init__(self, container_id: str, exec_id: str, stdio: StdioPaths, namespace: str,
                 spec_json: bytes = b"") -> None:
        self.container_id = container_id
        self.exec_id = exec_id  # "" for the init
        self.stdio = stdio
        self.namespace = namespace
        self.spec_json = spec_json  # an exec's OCI process, as JSON
        self.status = Status.CREATED
        self.exit_status = 0
        self.exited_at: float | None = None
        self.oom_killed = False
        self._exited = threading.Event()
        self._io: ProcessIO | None = None
        self._outputs: list[threading.Thread] = []
        self._stdin: StdinOpener | None = None
        self._stdin_thread: threading.Thread | None = None

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    # ---- stdio -----------------------------------------------------------------------------
    def open_io(self, agent: LiteAgent) -> None:
        """Open the host ends and start copying; the process must exist in the guest."""
        self._io = open_outputs(self.stdio, self.container_id, self.namespace)
        streams = [("stdout", self._io.stdout), ("stderr", self._io.stderr)]
        for stream, fd in streams:
            if fd is not None:
                t = threading.Thread(target=relay.pump_out,
                                     args=(agent, stream, self.container_id, self.exec_id, fd),
                                     name=f"{stream}-{self.exec_id or self.container_id}", daemon=True)
                t.start()
                self._outputs.append(t)
        if self.stdio.stdin:
            opener = StdinOpener(self.stdio.stdin)
            self._stdin = opener
            self._stdin_thread = threading.Thread(target=self._copy_stdin, args=(agent, opener), daemon=True)
            self._stdin_thread.start()

    def _copy_stdin(self, agent: LiteAgent, opener: StdinOpener) -> None:
        fd = opener.open()
        if fd is None:
            # containerd closed our stdin without ever writing to it: the process's stdin ends too.
            if not self.stdio.terminal and not self.exited:
                try:
                    agent.close_stdin(self.container_id, self.exec_id)
                except ttrpc.TTRPCError:
                    pass
            return
        try:
            relay.pump_in(agent, self.container_id, self.exec_id, fd, self.stdio.terminal)
        finally:
            os.close(fd)

    def close_stdin(self, timeout: float = 5.0) -> None:
        """containerd's CloseIO: its writer has closed, so the copy ends with the process's stdin
        (one that never opened the fifo is given up on)."""
        if self._stdin is not None and not self._stdin.opened:
            self._stdin.cancel()
        if self._stdin_thread is not None:
            self._stdin_thread.join(timeout)

    def _close_io(self) -> None:
        for t in self._outputs:
            t.join(_DRAIN_TIMEOUT)
        if self._stdin is not None:
            self._stdin.cancel()
        if self._io is not None:
            self._io.close()

    # ---- life --------------------------------------------------------------------------------
    def watch(self, agent: LiteAgent, on_exit: Callable[[Process], None]) -> None:
        """From a started process on: wait for its exit on a thread of its own, then call on_exit.
        The exit is recorded whatever the agent answers: containerd's Wait must end."""
        name = self.exec_id or self.container_id

        def waiter() -> None:
            try:
                status, self.oom_killed = agent.wait_exit(self.container_id, self.exec_id)
            except ttrpc.TTRPCError:
                status = VM_GONE_STATUS  # the VM is gone, or its answer made no sense
            except Exception as exc:  # noqa: BLE001 - a bug must not leave the process running for ever
                log.error(f"process {name}: waiting for its exit: {one_line(exc)}")
                status = VM_GONE_STATUS
            self.finish(status)
            try:
                on_exit(self)
            except Exception as exc:  # noqa: BLE001 - one line in the log, never a thread's traceback
                log.error(f"process {name}: reporting its exit: {one_line(exc)}")

        threading.Thread(target=waiter, name=f"wait-{name}", daemon=True).start()

    def finish(self, status: int) -> None:
        """Record the exit (once): output drained and stdio closed first."""
        if self._exited.is_set():
            return
        try:
            self._close_io()
        except Exception as exc:  # noqa: BLE001 - the exit is recorded all the same: Wait must end
            log.error(f"process {self.exec_id or self.container_id}: closing its stdio: {one_line(exc)}")
        self.exit_status = exit_status(status)
        self.exited_at = time.time()
        self.status = Status.STOPPED
        self._exited.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._exited.wait(timeout)
