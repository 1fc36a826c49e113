"""Port forwarding into a pod's VM: what the CRI's port-forward dials on the pod's loopback, relayed
to the same port on the guest's loopback (Kata lacks it: kata-containers#10843).

containerd enters the pod's network namespace and dials ``localhost:PORT``; with the workload in the
VM nothing listens there. So the pod's process on the host (the shim) keeps, in that namespace, a
listener on 127.0.0.1 (and ::1) and a nat rule that sends every TCP connection to loopback there to
it (kata.network.loopback_redirect). Each accepted connection's original port is asked of the agent
(PortForwardConnect), which dials it on the guest's loopback, and the bytes are relayed both ways
over the agent channel (PortForwardWrite and PortForwardRead, long-poll calls like stdio's), with
half-closes passed on. No port list: every port works, and one the guest does not listen on is
answered with a reset at once.

Bounds: at most ``max_connections`` in flight (more are reset), reads of at most CHUNK bytes (an
answer longer than asked fails the connection), connection ids the host picks. The guest answers only
the calls the host makes for a connection the host accepted; nothing it says makes the host dial or
open anything. stop() closes the listeners and every connection and removes the rule (or leaves it to
the namespace, which ends with the pod); the threads end as their calls do (all of them once the
agent connection closes).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kata.errors import KataError
from kata.utils.text import one_line

if TYPE_CHECKING:
    from kata.agent_client.client import AgentClient

log = logging.getLogger("kata.sandbox")

CHUNK = 64 * 1024
MAX_CONNECTIONS = 64
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same number
# What the guest has to accept or refuse a loopback connection in (its own bound is shorter).
CONNECT_TIMEOUT = 10.0
_LOOPBACK: dict[int, bytes] = {socket.AF_INET: socket.inet_pton(socket.AF_INET, "127.0.0.1"),
                               socket.AF_INET6: socket.inet_pton(socket.AF_INET6, "::1")}


def parse_original_dst(raw: bytes, family: int) -> int:
    """The port of a redirected connection's original destination (a sockaddr_in or sockaddr_in6
    from SO_ORIGINAL_DST), which must be the loopback address the rule redirects; ValueError else."""
    size, addr_at = (16, 4) if family == socket.AF_INET else (28, 8)
    if len(raw) < size:
        raise ValueError(f"original destination of {len(raw)} bytes")
    (got_family,) = struct.unpack_from("=H", raw)
    (port,) = struct.unpack_from("!H", raw, 2)
    addr = raw[addr_at:addr_at + len(_LOOPBACK[family])]
    if got_family != family or addr != _LOOPBACK[family]:
        raise ValueError("original destination is not loopback")
    if not 1 <= port <= 65535:
        raise ValueError(f"original port {port}")
    return port


def original_port(sock: socket.socket) -> int:
    family = sock.family
    level, size = (socket.SOL_IP, 16) if family == socket.AF_INET else (socket.IPPROTO_IPV6, 28)
    return parse_original_dst(sock.getsockopt(level, SO_ORIGINAL_DST, size), family)


def _reset(sock: socket.socket) -> None:
    """Close with a reset, so that the client reads an error rather than an empty answer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


class Forwarder:
    """One pod's forwarder; start() it in the pod's network namespace, stop() it before its VM goes."""

    def __init__(self, agent: AgentClient, listeners: list[socket.socket],
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.agent = agent
        self.listeners = listeners
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._active: dict[int, socket.socket] = {}
        self._threads: set[threading.Thread] = set()
        self._stopping = False
        self._netns_fd: int | None = None

    @property
    def ports(self) -> list[int]:
        return [sock.getsockname()[1] for sock in self.listeners]

    @classmethod
    def start(cls, agent: AgentClient, netns_path: str, max_connections: int = MAX_CONNECTIONS) -> Forwarder:
        """Listeners on the loopback of the namespace at ``netns_path`` and the rule that sends its
        loopback connections to them; KataError (nothing left behind) when they cannot be made."""
        from kata.network import loopback_redirect
        from kata.utils import netns

        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise KataError(f"network namespace {netns_path}: {exc.strerror}") from None
        listeners: list[socket.socket] = []

        def set_up() -> None:
            listeners.append(_listen(socket.AF_INET))
            try:
                listeners.append(_listen(socket.AF_INET6))
            except OSError as exc:  # IPv6 off in the namespace: IPv4 alone
                log.debug(f"port forwarding without IPv6: {exc.strerror or exc}")
            ports = [sock.getsockname()[1] for sock in listeners]
            loopback_redirect.install(ports[0], ports[1] if len(ports) > 1 else None)

        try:
            netns.call_in(f"/proc/self/fd/{fd}", set_up)
        except BaseException:
            for sock in listeners:
                sock.close()
            os.close(fd)
            raise
        forwarder = cls(agent, listeners, max_connections)
        forwarder._netns_fd = fd  # kept to remove the rule at stop, even after the path is gone
        for sock in listeners:
            forwarder._spawn(forwarder._accept_loop, sock, name="portfwd-accept")
        return forwarder

    def _spawn(self, target: Callable[..., None], *args: object, name: str) -> threading.Thread:
        """A thread that join() waits for."""
        thread = threading.Thread(target=self._run, args=(target, *args), name=name, daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return thread

    def _run(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    # ---- accepting ------------------------------------------------------------------------------
    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError as exc:
                if self._stopping:
                    return
                log.warning(f"port forwarding: accept: {exc.strerror or exc}")
                time.sleep(0.1)  # out of descriptors, say: try again, without spinning
                continue
            self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        try:
            port = original_port(client)
        except (OSError, ValueError) as exc:
            log.warning(f"port forwarding: a connection without its original port: {one_line(exc)}")
            _reset(client)
            return
        with self._lock:
            if self._stopping or len(self._active) >= self.max_connections:
                full = not self._stopping
                conn_id = 0
            else:
                full = False
                conn_id = next(self._ids)
                self._active[conn_id] = client
        if not conn_id:
            if full:
                log.warning(f"port forwarding: {self.max_connections} connections in flight; "
                            f"one to port {port} is refused")
            _reset(client)
            return
        self._spawn(self._relay, conn_id, client, port, name=f"portfwd-{conn_id}")

    # ---- relaying -------------------------------------------------------------------------------
    def _relay(self, conn_id: int, client: socket.socket, port: int) -> None:
        from kata.agent_client.client import AgentError

        try:
            try:
                self.agent.port_forward_connect(conn_id=conn_id, port=port,
                                                ipv6=client.family == socket.AF_INET6,
                                                timeout=CONNECT_TIMEOUT)
            except (AgentError, OSError) as exc:
                log.debug(f"port forwarding to port {port}: {one_line(exc)}")
                with self._lock:
                    self._active.pop(conn_id, None)
                _reset(client)
                return
            upstream = self._spawn(self._upstream, conn_id, client, name=f"portfwd-{conn_id}-in")
            self._downstream(conn_id, client)
            upstream.join()
            self._close_in_guest(conn_id, write_only=False)
        finally:
            with self._lock:
                self._active.pop(conn_id, None)
            client.close()

    def _upstream(self, conn_id: int, client: socket.socket) -> None:
        """Client to guest; at the client's end, a half-close; on an error, the whole connection."""
        from kata.agent_client.client import AgentError

        while True:
            try:
                data = client.recv(CHUNK)
            except OSError:
                self._close_in_guest(conn_id, write_only=False)  # the guest side's read ends too
                return
            if not data:
                # A half-close passes on; one of stop()'s closes the whole connection.
                self._close_in_guest(conn_id, write_only=not self._stopping)
                return
            try:
                self.agent.port_forward_write(conn_id=conn_id, data=data)
            except AgentError:
                _shutdown(client, socket.SHUT_RDWR)
                return

    def _downstream(self, conn_id: int, client: socket.socket) -> None:
        """Guest to client; at the guest's end, a half-close; on an error, the whole connection."""
        from kata.agent_client.client import AgentError, StreamEOF

        while True:
            try:
                data = self.agent.port_forward_read(conn_id=conn_id, length=CHUNK)
            except StreamEOF:
                _shutdown(client, socket.SHUT_WR)
                return
            except AgentError:
                _shutdown(client, socket.SHUT_RDWR)  # the client's reader and our upstream end
                return
            try:
                client.sendall(data)
            except OSError:
                _shutdown(client, socket.SHUT_RDWR)
                self._close_in_guest(conn_id, write_only=False)
                return

    def _close_in_guest(self, conn_id: int, write_only: bool) -> None:
        from kata.agent_client.client import AgentError

        try:
            self.agent.port_forward_close(conn_id=conn_id, write_only=write_only)
        except AgentError:
            pass  # the VM is going, or the guest lost it: nothing more to close there

    # ---- the end --------------------------------------------------------------------------------
    def stop(self, namespace_ends: bool = False) -> None:
        """No more connections: the listeners, every connection in flight and the rule go (the rule
        with the namespace, when ``namespace_ends``: running nft for it cost every pod's stop 16 ms).
        Threads blocked in an agent call end with it (stop before the agent connection closes, and
        the guest sees each connection closed)."""
        from kata.network import loopback_redirect
        from kata.utils import netns

        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            clients = list(self._active.values())
        for sock in self.listeners:
            _shutdown(sock, socket.SHUT_RDWR)  # wakes its accept()
            sock.close()
        for client in clients:
            _shutdown(client, socket.SHUT_RDWR)
        fd, self._netns_fd = self._netns_fd, None
        if fd is not None and namespace_ends:
            os.close(fd)
        elif fd is not None:
            try:
                netns.call_in(f"/proc/self/fd/{fd}", loopback_redirect.remove)
            except KataError as exc:
                log.warning(f"port forwarding: removing its rule: {exc}")
            finally:
                os.close(fd)

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every thread to end; whether they all did."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            threads[0].join(left)

    def __len__(self) -> int:
        with self._lock:
            return len(self._active)


def _listen(family: socket.AddressFamily) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock
