"""Host side of the agent channel: connect to the guest agent's endpoint, retrying until a deadline."""

from __future__ import annotations

import os
import socket
import time

from kata import ttrpc
from kata.errors import KataError
from kata.protocols.agent_api import AgentEndpoint

_RETRY = 0.01


class TransportError(KataError):
    """The agent channel could not be opened; the message is one line."""


def open_socket(endpoint: AgentEndpoint, timeout: float) -> socket.socket:
    """One connection attempt to ``endpoint`` (the agent's, or another guest channel's)."""
    if endpoint.kind == "serial":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        addr: str | tuple[int, int] = endpoint.path
    elif endpoint.kind == "vsock":
        if not hasattr(socket, "AF_VSOCK"):
            raise TransportError("vsock is not supported by this Python/kernel")
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        addr = (endpoint.cid, endpoint.port)
    else:
        raise TransportError(f"unknown agent endpoint kind {endpoint.kind!r}")
    try:
        sock.settimeout(max(timeout, 0.05))
        sock.connect(addr)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def connect(endpoint: AgentEndpoint, timeout: float) -> ttrpc.Stream:
    """A stream to the agent. For "serial" the path is QEMU's chardev socket, which appears once
    QEMU is up; for vsock the guest listens only once the agent runs: both are retried."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        remaining = deadline - time.monotonic()
        if endpoint.kind == "serial" and not os.path.exists(endpoint.path):
            last = FileNotFoundError(f"{endpoint.path} does not exist")
        else:
            try:
                return ttrpc.socket_stream(open_socket(endpoint, remaining))
            except TransportError:
                raise
            except OSError as e:
                last = e
        if time.monotonic() >= deadline:
            where = endpoint.path if endpoint.kind == "serial" else f"cid {endpoint.cid} port {endpoint.port}"
            raise TransportError(
                f"cannot connect to the agent ({endpoint.kind} {where}) within {timeout:.1f}s: {last}"
            )
        time.sleep(_RETRY)
