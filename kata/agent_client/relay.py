"""Copy a guest process's stdio between the agent and host descriptors.

The same pumps serve a container's monitor (kata-runtime) and containerd-shim-kata-v2: output is
read from the agent until the stream ends, input is written to it until the host side ends.
"""

from __future__ import annotations

import os

from kata import ttrpc
from kata.agent_client.lite import LiteAgent, StreamEnded

CHUNK = 64 * 1024


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def pump_out(agent: LiteAgent, stream: str, cid: str, exec_id: str, fd: int) -> None:
    """Copy the process's "stdout" or "stderr" to ``fd`` until the stream (or ``fd``) ends."""
    while True:
        try:
            data = agent.read(stream, cid, exec_id, CHUNK)
            if data:
                write_all(fd, data)
        except (StreamEnded, OSError, ttrpc.TTRPCError):
            return


def pump_in(agent: LiteAgent, cid: str, exec_id: str, fd: int, terminal: bool) -> None:
    """Copy ``fd`` to the process's stdin; at its end, close the process's stdin too."""
    while True:
        try:
            data = os.read(fd, CHUNK)
        except OSError:
            data = b""
        try:
            if not data:
                if not terminal:  # a pty has no EOF to pass on; its output may continue
                    agent.close_stdin(cid, exec_id)
                return
            agent.write_stdin(cid, exec_id, data)
        except ttrpc.TTRPCError:
            return
