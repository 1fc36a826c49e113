"""The guest's end of port forwarding: connections to the guest's own loopback, relayed for the host.

The host accepts a connection made to the pod's loopback in its network namespace on the host (the
CRI's port-forward) and asks for the same port here. Only loopback is ever dialled (127.0.0.1 or
::1, in the agent's network namespace, which every container of the pod shares), so whatever the
host asks, the agent reaches nothing the pod's own processes could not reach. The connections in
flight and each read are bounded.
"""

from __future__ import annotations

import errno
import socket
import threading

from kata import ttrpc
from kata.guest.agent.sandbox import AlreadyExists, InvalidArgument, NotFound
from kata.guest.agent.stdio import EndOfStream

MAX_CONNECTIONS = 256
MAX_READ = 64 * 1024
# Dialling loopback answers at once (accepted or refused); a listener whose backlog is full leaves
# the SYN unanswered, and the host's call must not wait on it for long.
CONNECT_TIMEOUT = 3.0
_LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


class Forwards:
    """The forwarded connections by the host's id."""

    def __init__(self, max_connections: int = MAX_CONNECTIONS) -> None:
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._conns: dict[int, socket.socket | None] = {}  # None: still being dialled

    def connect(self, conn_id: int, port: int, ipv6: bool) -> None:
        """Dial ``port`` on loopback (the client's family first, then the other: a server may listen
        on one family only) and keep the connection as ``conn_id``."""
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"port {port} is out of range")
        with self._lock:
            if conn_id in self._conns:
                raise AlreadyExists(f"forwarded connection {conn_id}: already exists")
            if len(self._conns) >= self.max_connections:
                raise ttrpc.TTRPCError(ttrpc.Code.RESOURCE_EXHAUSTED,
                                       f"{self.max_connections} forwarded connections in flight")
            self._conns[conn_id] = None  # the slot is taken while we dial
        families = [socket.AF_INET6, socket.AF_INET] if ipv6 else [socket.AF_INET, socket.AF_INET6]
        try:
            sock = _dial(families, port)
        except BaseException:
            with self._lock:
                self._conns.pop(conn_id, None)
            raise
        with self._lock:
            if conn_id in self._conns:
                self._conns[conn_id] = sock
                return
        sock.close()  # closed by the host while we dialled
        raise NotFound(f"forwarded connection {conn_id}: closed while connecting")

    def _get(self, conn_id: int) -> socket.socket:
        with self._lock:
            sock = self._conns.get(conn_id)
        if sock is None:
            raise NotFound(f"forwarded connection {conn_id}: not found")
        return sock

    def read(self, conn_id: int, n: int) -> bytes:
        """The next bytes the guest's server sent (at most ``n``, bounded); EndOfStream at its end."""
        sock = self._get(conn_id)
        try:
            data = sock.recv(min(max(n, 1), MAX_READ))
        except OSError as exc:
            if exc.errno == errno.EBADF:  # closed under us by close(): that ends the stream too
                raise EndOfStream() from None
            raise ttrpc.TTRPCError(ttrpc.Code.ABORTED, f"forwarded connection {conn_id}: "
                                   f"{exc.strerror or exc}") from None
        if not data:
            raise EndOfStream()
        return data

    def write(self, conn_id: int, data: bytes) -> int:
        sock = self._get(conn_id)
        try:
            sock.sendall(data)
        except OSError as exc:
            raise ttrpc.TTRPCError(ttrpc.Code.ABORTED, f"forwarded connection {conn_id}: "
                                   f"{exc.strerror or exc}") from None
        return len(data)

    def close(self, conn_id: int, write_only: bool) -> None:
        """The host's client finished sending (``write_only``: the server reads its end), or the
        connection goes; closing one that is gone is no error."""
        if write_only:
            try:
                self._get(conn_id).shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        with self._lock:
            sock = self._conns.pop(conn_id, None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked on it: close() alone would not
            except OSError:
                pass
            sock.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._conns)


def _dial(families: list[socket.AddressFamily], port: int) -> socket.socket:
    last: OSError | None = None
    for family in families:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect((_LOOPBACK[family], port))
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.settimeout(None)
        return sock
    assert last is not None
    why = "connection refused" if isinstance(last, ConnectionRefusedError) else str(last.strerror or last)
    raise ttrpc.TTRPCError(ttrpc.Code.UNAVAILABLE, f"port {port} on the guest's loopback: {why}")
