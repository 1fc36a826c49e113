"""Port forwarding without a VM: the host's forwarder (kata.sandbox.portforward) in a real network
namespace with its real nft rule, talking over a socketpair to the real agent service, whose
connections go to servers on this process's loopback (the guest's, here). Plus the guest side's
bounds, the original-destination parsing and the rule's text, and a hostile agent."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from google.protobuf import empty_pb2

from kata import ttrpc
from kata.agent_client.client import AgentClient
from kata.errors import KataError
from kata.guest.agent import portforward as guest
from kata.guest.agent.sandbox import AlreadyExists, InvalidArgument, NotFound
from kata.guest.agent.stdio import EndOfStream
from kata.network import loopback_redirect
from kata.protocols import agent_pb2 as pb
from kata.protocols.agent_api import AGENT_SERVICE, LONG_POLL_METHODS
from kata.sandbox.portforward import CHUNK, Forwarder, parse_original_dst
from tests.support.netns import NETNS_DIR, call_in_netns, in_netns, temporary_netns
from tests.unit.guest_fakes import agent_server, serve_on_socketpair

pytestmark = pytest.mark.timeout(120)
needs_nft = pytest.mark.skipif(loopback_redirect.nft() is None, reason="nft is not installed (nftables)")


# ---- pure parts ---------------------------------------------------------------------------------
def _sockaddr_in(port: int, addr: str = "127.0.0.1", family: int = socket.AF_INET) -> bytes:
    return struct.pack("=H", family) + struct.pack("!H", port) + socket.inet_aton(addr) + bytes(8)


def _sockaddr_in6(port: int, addr: str = "::1") -> bytes:
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", port) + bytes(4)
            + socket.inet_pton(socket.AF_INET6, addr) + bytes(4))


def test_original_destination_is_a_loopback_port() -> None:
    assert parse_original_dst(_sockaddr_in(8080), socket.AF_INET) == 8080
    assert parse_original_dst(_sockaddr_in(65535), socket.AF_INET) == 65535
    assert parse_original_dst(_sockaddr_in6(1), socket.AF_INET6) == 1
    for raw, family in [(_sockaddr_in(0), socket.AF_INET),
                        (_sockaddr_in(80, "10.0.0.1"), socket.AF_INET),
                        (_sockaddr_in(80, family=socket.AF_INET6), socket.AF_INET),
                        (_sockaddr_in(80)[:8], socket.AF_INET),
                        (_sockaddr_in6(80, "::2"), socket.AF_INET6),
                        (_sockaddr_in(80), socket.AF_INET6)]:
        with pytest.raises(ValueError):
            parse_original_dst(raw, family)


def test_rule_redirects_only_loopback_tcp_to_the_forwarder() -> None:
    text = loopback_redirect.ruleset(4000, 6000)
    rules = [line.strip() for line in text.splitlines() if "redirect" in line]
    assert rules == ['oif "lo" ip daddr 127.0.0.1 meta l4proto tcp redirect to :4000',
                     'oif "lo" ip6 daddr ::1 meta l4proto tcp redirect to :6000']
    assert "hook output" in text and f"table inet {loopback_redirect.TABLE}" in text
    assert "ip6" not in loopback_redirect.ruleset(4000, None)
    for bad in (0, 65536, -1):
        with pytest.raises(ValueError):
            loopback_redirect.ruleset(bad, None)


def test_read_and_write_are_long_poll_calls() -> None:
    """The agent serves them on threads of their own, and the host calls them without a deadline: a
    quiet connection must not hold a shared worker or time out."""
    assert {"PortForwardRead", "PortForwardWrite"} <= LONG_POLL_METHODS
    assert "PortForwardConnect" not in LONG_POLL_METHODS


# ---- servers on "the guest's" loopback ----------------------------------------------------------
class Server:
    """A TCP server on 127.0.0.1: ``handle(conn)`` per connection, on a thread."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handle = handle
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            self.handle(conn)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _read_all(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def _count_then_answer(conn: socket.socket) -> None:
    """Reads to the client's half-close, then answers how much came: the half-close must pass."""
    conn.sendall(b"got %d" % len(_read_all(conn)))


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


@pytest.fixture
def server() -> Iterator[Callable[[Callable[[socket.socket], None]], Server]]:
    made: list[Server] = []

    def make(handle: Callable[[socket.socket], None]) -> Server:
        made.append(Server(handle))
        return made[-1]

    yield make
    for s in made:
        s.close()


# ---- the guest's side alone ---------------------------------------------------------------------
def test_guest_refuses_bad_ports_duplicates_and_too_many(server: Any) -> None:
    srv = server(_echo)
    forwards = guest.Forwards(max_connections=2)
    for port in (0, 65536, 70000):
        with pytest.raises(InvalidArgument):
            forwards.connect(1, port, ipv6=False)
    forwards.connect(1, srv.port, ipv6=False)
    with pytest.raises(AlreadyExists):
        forwards.connect(1, srv.port, ipv6=False)
    forwards.connect(2, srv.port, ipv6=True)  # ::1 first; the server is on 127.0.0.1 only
    with pytest.raises(ttrpc.TTRPCError) as err:
        forwards.connect(3, srv.port, ipv6=False)
    assert err.value.code == ttrpc.Code.RESOURCE_EXHAUSTED
    with pytest.raises(NotFound):
        forwards.read(3, 10)
    forwards.close(1, write_only=False)
    forwards.close(1, write_only=False)  # twice: no error
    forwards.connect(3, srv.port, ipv6=False)  # the slot is free again
    for conn_id in (2, 3):
        forwards.close(conn_id, write_only=False)
    assert len(forwards) == 0


def test_guest_answers_a_closed_port_at_once() -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    forwards = guest.Forwards()
    started = time.monotonic()
    with pytest.raises(ttrpc.TTRPCError) as err:
        forwards.connect(1, port, ipv6=False)
    assert err.value.code == ttrpc.Code.UNAVAILABLE and "refused" in err.value.message
    assert time.monotonic() - started < 1.0 and len(forwards) == 0


def test_guest_reads_are_bounded_and_close_wakes_a_blocked_read(server: Any) -> None:
    big = b"x" * (3 * guest.MAX_READ)
    srv = server(lambda conn: (conn.sendall(big), conn.recv(1)))
    forwards = guest.Forwards()
    forwards.connect(7, srv.port, ipv6=False)
    got = b""
    while len(got) < len(big):
        chunk = forwards.read(7, 10 * guest.MAX_READ)
        assert 0 < len(chunk) <= guest.MAX_READ
        got += chunk
    assert got == big
    ended: list[BaseException] = []

    def blocked_read() -> None:
        try:
            forwards.read(7, 10)
        except BaseException as exc:  # noqa: BLE001 - what ended it is the result
            ended.append(exc)

    reader = threading.Thread(target=blocked_read)
    reader.start()
    time.sleep(0.2)
    assert reader.is_alive()  # nothing more comes from the server
    forwards.close(7, write_only=False)
    reader.join(2.0)
    assert not reader.is_alive() and isinstance(ended[0], EndOfStream)


# ---- the host's forwarder against the real agent service ---------------------------------------
@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentClient]:
    srv, _ = agent_server(tmp_path, max_workers=8)
    host, guest_end = serve_on_socketpair(srv)
    client = AgentClient(host, timeout=10.0)
    yield client
    client.close()
    srv.shutdown()
    guest_end.close()


@pytest.fixture
def pod_netns() -> Iterator[str]:
    with temporary_netns("ktpfwd") as name:
        yield name


def _dial(netns: str, port: int, payload: bytes, *, family: int = socket.AF_INET,
          half_close: bool = True, timeout: float = 10.0) -> bytes | OSError:
    """From the pod's namespace, as containerd does: connect to loopback, send, read to the end."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"

    def run() -> bytes | OSError:
        with socket.socket(family) as c:
            c.settimeout(timeout)
            try:
                c.connect((host, port))  # on loopback, a reset can come before connect() returns
                c.sendall(payload)
                if half_close:
                    c.shutdown(socket.SHUT_WR)
                return _read_all(c)
            except (ConnectionResetError, BrokenPipeError) as exc:
                return exc

    return call_in_netns(netns, run)


def _ruleset(netns: str) -> str:
    return in_netns(netns, "nft", "list", "ruleset").stdout


@needs_nft
def test_forwarder_relays_any_port_both_ways_and_leaves_nothing(agent: AgentClient, pod_netns: str,
                                                                  server: Any) -> None:
    counting, echoing = server(_count_then_answer), server(_echo)
    forwarder = Forwarder.start(agent, f"{NETNS_DIR}/{pod_netns}")
    try:
        assert "redirect to" in _ruleset(pod_netns)
        # The listeners are on the namespace's loopback only.
        listening = in_netns(pod_netns, "ss", "-Htln").stdout.split()
        assert {f"127.0.0.1:{forwarder.ports[0]}", f"[::1]:{forwarder.ports[1]}"} <= set(listening)
        # Any port, no list: 3 MB up with a half-close, the answer back; over IPv6 loopback too.
        assert _dial(pod_netns, counting.port, b"y" * 3_000_000) == b"got 3000000"
        assert _dial(pod_netns, counting.port, b"v6", family=socket.AF_INET6) == b"got 2"
        # 2 MB through an echo, bytes intact in both directions, several connections at once.
        payload = bytes(range(256)) * 8192
        results: list[bytes | OSError] = []
        dials = [threading.Thread(target=lambda: results.append(_dial(pod_netns, echoing.port, payload)))
                 for _ in range(4)]
        for t in dials:
            t.start()
        for t in dials:
            t.join(60)
        assert results == [payload] * 4
        # A port nothing listens on in "the guest": the client reads a reset at once, not a hang.
        closed = socket.create_server(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        started = time.monotonic()
        assert isinstance(_dial(pod_netns, closed_port, b"hello", half_close=False), ConnectionResetError)
        assert time.monotonic() - started < 2.0
        assert len(forwarder) == 0
        # One connection left open at stop() is closed for its client and in the guest.
        held: list[bytes | OSError] = []
        holder = threading.Thread(target=lambda: held.append(
            _dial(pod_netns, echoing.port, b"held", half_close=False)))
        holder.start()
        deadline = time.monotonic() + 5
        while len(forwarder) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(forwarder) == 1
    finally:
        forwarder.stop()
    holder.join(10)
    # The echo may have come back before stop(); then the end (or a reset, for unread bytes).
    assert isinstance(held[0], ConnectionResetError) or b"held".startswith(held[0])
    assert forwarder.join(10.0)
    assert loopback_redirect.TABLE not in _ruleset(pod_netns)
    assert in_netns(pod_netns, "ss", "-Htln").stdout.strip() == ""
    assert all(s.fileno() == -1 for s in forwarder.listeners)
    forwarder.stop()  # twice: nothing more to do


@needs_nft
def test_forwarder_bounds_connections_in_flight(agent: AgentClient, pod_netns: str, server: Any) -> None:
    release = threading.Event()
    srv = server(lambda conn: (release.wait(30), conn.sendall(b"late")))
    forwarder = Forwarder.start(agent, f"{NETNS_DIR}/{pod_netns}", max_connections=2)
    try:
        held = [threading.Thread(target=_dial, args=(pod_netns, srv.port, b""), kwargs={"half_close": False})
                for _ in range(2)]
        for t in held:
            t.start()
        deadline = time.monotonic() + 5
        while len(forwarder) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(forwarder) == 2
        assert isinstance(_dial(pod_netns, srv.port, b"third", half_close=False), ConnectionResetError)
        release.set()
        for t in held:
            t.join(10)
    finally:
        release.set()
        forwarder.stop()
    assert forwarder.join(10.0)


def test_forwarder_needs_a_namespace(agent: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(KataError, match="network namespace"):
        Forwarder.start(agent, str(tmp_path / "no-such-netns"))


# ---- a hostile agent ----------------------------------------------------------------------------
@needs_nft
def test_an_agent_answering_more_than_asked_fails_only_that_connection(pod_netns: str) -> None:
    """A guest that answers a read with more than the host asked for: that connection is reset; the
    host reads nothing of it, and the forwarder goes on."""
    sizes: list[int] = []

    def read(_ctx: ttrpc.Context, req: pb.PortForwardReadRequest) -> pb.ReadStreamResponse:
        sizes.append(req.len)
        return pb.ReadStreamResponse(data=b"z" * (req.len + 1))

    def empty(_ctx: ttrpc.Context, _req: Any) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    hostile = ttrpc.Server(max_workers=4)
    hostile.register_service(AGENT_SERVICE, {
        "PortForwardConnect": ttrpc.Method(pb.PortForwardConnectRequest, empty),
        "PortForwardClose": ttrpc.Method(pb.PortForwardCloseRequest, empty),
        "PortForwardWrite": ttrpc.Method(pb.PortForwardWriteRequest,
                                         lambda _c, r: pb.WriteStreamResponse(len=len(r.data)), True),
        "PortForwardRead": ttrpc.Method(pb.PortForwardReadRequest, read, True),
    })
    host, guest_end = serve_on_socketpair(hostile)
    agent = AgentClient(host, timeout=5.0)
    forwarder = Forwarder.start(agent, f"{NETNS_DIR}/{pod_netns}")
    try:
        for _ in range(2):
            got = _dial(pod_netns, 80, b"hi", half_close=False)
            assert got == b"" or isinstance(got, ConnectionResetError)
        assert sizes and set(sizes) == {CHUNK}
    finally:
        forwarder.stop()
        agent.close()
        hostile.shutdown()
        guest_end.close()
    assert forwarder.join(10.0)


def test_a_forwarder_stopped_with_its_namespace_leaves_it_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    # The shim stops it when the pod ends, and containerd removes the namespace right after: no nft run.
    calls: list[str] = []
    monkeypatch.setattr(loopback_redirect, "remove", lambda: calls.append("remove"))
    forwarder = Forwarder(cast(Any, None), [])
    read_end, write_end = os.pipe()
    forwarder._netns_fd = read_end
    try:
        forwarder.stop(namespace_ends=True)
        assert calls == []
        with pytest.raises(BrokenPipeError):  # its descriptor closed: no reader left
            os.write(write_end, b"x")
    finally:
        os.close(write_end)
