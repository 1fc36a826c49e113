"""Client and server end to end, in-process, over a unix socketpair and over a pair of pipes."""

from __future__ import annotations

import os
import pty
import socket
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value, StringValue

from kata.protocols.ttrpc_pb2 import Request, Response
from kata.ttrpc import (
    Client,
    Code,
    ConnectionClosed,
    Context,
    Method,
    Server,
    Stream,
    TTRPCError,
    fd_stream,
    socket_stream,
)
from kata.ttrpc.frame import (
    FLAG_REMOTE_CLOSED,
    FLAG_REMOTE_OPEN,
    MAX_MESSAGE_SIZE,
    TYPE_DATA,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    FrameReader,
    encode,
)
from kata.utils.sockets import peer_pid
from tests.support.streams import pipe_pair, socket_pair

pytestmark = pytest.mark.timeout(30)

SERVICE = "test.Echo"


def pty_pair() -> tuple[Stream, Stream]:
    """One O_RDWR character device fd per side, like a virtio-serial port; EIO on hangup, not b""."""
    master, slave = pty.openpty()
    tty.setraw(slave)  # no line discipline: bytes pass unchanged
    return fd_stream(slave), fd_stream(master)


@dataclass
class Calls:
    """What the test service saw, for assertions about handlers that must (not) have run."""

    started: list[str]
    gate: threading.Event


def make_server(calls: Calls, max_workers: int = 32) -> Server:
    def echo(ctx: Context, req: StringValue) -> StringValue:
        calls.started.append("echo")
        return StringValue(value=req.value)

    def sleep(ctx: Context, req: Int64Value) -> Int64Value:
        calls.started.append(f"sleep{req.value}")
        time.sleep(req.value / 1000)
        return Int64Value(value=req.value)

    def block(ctx: Context, req: Empty) -> Empty:
        calls.started.append("block")
        calls.gate.wait(20)
        return Empty()

    def fail(ctx: Context, req: StringValue) -> Empty:
        if req.value == "typed":
            raise TTRPCError(Code.NOT_FOUND, "container abc not found")
        raise ValueError("boom")

    def context(ctx: Context, req: Empty) -> StringValue:
        left = "none" if ctx.deadline is None else f"{ctx.deadline - time.monotonic():.1f}"
        md = ",".join(f"{k}={v}" for k, v in sorted(ctx.metadata.items()))
        return StringValue(value=f"{ctx.service}/{ctx.method} {md} {left}")

    def huge(ctx: Context, req: Empty) -> BytesValue:
        return BytesValue(value=b"\0" * (MAX_MESSAGE_SIZE + 1))

    server = Server(max_workers=max_workers)
    server.register_service(
        SERVICE,
        {
            "Echo": Method(StringValue, echo),
            "Sleep": Method(Int64Value, sleep),
            "Block": Method(Empty, block),
            "LongPoll": Method(Empty, block, blocking=True),
            "Fail": Method(StringValue, fail),
            "Context": Method(Empty, context),
            "Huge": Method(Empty, huge),
        },
    )
    return server


@dataclass
class Setup:
    client: Client
    server: Server
    calls: Calls
    server_stream: Stream
    closed: threading.Event


def start(pair: Callable[[], tuple[Stream, Stream]], max_workers: int = 32) -> Setup:
    client_stream, server_stream = pair()
    calls = Calls([], threading.Event())
    server = make_server(calls, max_workers)
    threading.Thread(target=server.serve, args=(server_stream,), daemon=True).start()
    closed = threading.Event()
    return Setup(Client(client_stream, on_close=closed.set), server, calls, server_stream, closed)


@pytest.fixture(params=[socket_pair, pipe_pair, pty_pair], ids=["socketpair", "pipes", "pty"])
def setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    s = start(request.param)
    yield s
    s.calls.gate.set()
    s.client.close()
    s.server.shutdown()
    s.server_stream.close()


def echo(client: Client, text: str) -> str:
    return client.call(SERVICE, "Echo", StringValue(value=text), StringValue, timeout=5).value


def test_unary_call(setup: Setup) -> None:
    assert echo(setup.client, "hello") == "hello"
    assert echo(setup.client, "") == ""


def test_concurrent_calls_complete_out_of_order(setup: Setup) -> None:
    delays = [400, 300, 200, 100, 0]
    results: dict[int, int] = {}
    finished: list[int] = []
    lock = threading.Lock()

    def one(ms: int) -> None:
        value = setup.client.call(SERVICE, "Sleep", Int64Value(value=ms), Int64Value, timeout=5).value
        with lock:
            results[ms] = value
            finished.append(ms)

    threads = [threading.Thread(target=one, args=(ms,)) for ms in delays]
    t0 = time.monotonic()
    for t in threads:
        t.start()
        time.sleep(0.01)  # issue them in this order
    for t in threads:
        t.join()
    assert results == {ms: ms for ms in delays}
    assert finished == sorted(delays)  # the slow first call held up none of the others
    assert time.monotonic() - t0 < 1.5


def test_deadline_on_a_slow_handler(setup: Setup) -> None:
    t0 = time.monotonic()
    with pytest.raises(TTRPCError) as err:
        setup.client.call(SERVICE, "Sleep", Int64Value(value=1500), Int64Value, timeout=0.2)
    assert err.value.code == Code.DEADLINE_EXCEEDED
    assert 0.15 < time.monotonic() - t0 < 1.0
    # The late response is dropped quietly and the connection stays usable.
    assert echo(setup.client, "after") == "after"
    time.sleep(1.5)
    assert echo(setup.client, "later") == "later"


def test_deadline_and_metadata_reach_the_handler(setup: Setup) -> None:
    md = {"a": "1", "b": "x"}
    got = setup.client.call(SERVICE, "Context", Empty(), StringValue, timeout=3, metadata=md)
    service_method, md, left = got.value.split(" ")
    assert (service_method, md) == (f"{SERVICE}/Context", "a=1,b=x")
    assert 2.0 < float(left) <= 3.0
    assert setup.client.call(SERVICE, "Context", Empty(), StringValue).value.endswith(" none")


def test_expired_deadline_is_not_run_by_the_server() -> None:
    s = start(socket_pair, max_workers=1)
    try:
        blocker = threading.Thread(target=lambda: s.client.call(SERVICE, "Block", Empty(), Empty, timeout=10))
        blocker.start()
        while "block" not in s.calls.started:
            time.sleep(0.01)
        with pytest.raises(TTRPCError) as err:
            s.client.call(SERVICE, "Echo", StringValue(value="queued"), StringValue, timeout=0.2)
        assert err.value.code == Code.DEADLINE_EXCEEDED
        # The server counts the deadline from when it read the request, a little after the client
        # sent it: free the worker only once the server's deadline has passed too.
        time.sleep(0.3)
        s.calls.gate.set()
        blocker.join()
        assert echo(s.client, "next") == "next"
        assert s.calls.started == ["block", "echo"]  # the queued, expired call never ran
    finally:
        s.calls.gate.set()
        s.client.close()
        s.server.shutdown()
        s.server_stream.close()


def test_remote_errors_map_to_codes(setup: Setup) -> None:
    with pytest.raises(TTRPCError) as err:
        setup.client.call(SERVICE, "Fail", StringValue(value="typed"), Empty)
    assert (err.value.code, err.value.message) == (Code.NOT_FOUND, "container abc not found")
    assert str(err.value) == "not_found: container abc not found"
    with pytest.raises(TTRPCError) as err:
        setup.client.call(SERVICE, "Fail", StringValue(value="other"), Empty)
    assert (err.value.code, err.value.message) == (Code.UNKNOWN, "boom")
    assert not isinstance(err.value, ConnectionClosed)
    assert echo(setup.client, "still serving") == "still serving"


def test_unknown_service_and_method(setup: Setup) -> None:
    with pytest.raises(TTRPCError) as err:
        setup.client.call(SERVICE, "Nope", Empty(), Empty)
    assert err.value.code == Code.UNIMPLEMENTED
    assert "Nope" in err.value.message and SERVICE in err.value.message
    with pytest.raises(TTRPCError) as err:
        setup.client.call("no.Such", "Echo", Empty(), Empty)
    assert err.value.code == Code.UNIMPLEMENTED and "no.Such" in err.value.message


def test_request_payload_of_the_wrong_type(setup: Setup) -> None:
    # Same field number and wire type, but proto3 strings must be UTF-8: the server cannot parse it.
    with pytest.raises(TTRPCError) as err:
        setup.client.call(SERVICE, "Echo", BytesValue(value=b"\xff\xfe"), StringValue)
    assert err.value.code == Code.INVALID_ARGUMENT


def test_oversized_request_and_response_fail_only_that_call(setup: Setup) -> None:
    with pytest.raises(TTRPCError) as err:
        setup.client.call(SERVICE, "Echo", StringValue(value="x" * MAX_MESSAGE_SIZE), StringValue)
    assert err.value.code == Code.RESOURCE_EXHAUSTED
    with pytest.raises(TTRPCError) as err:
        setup.client.call(SERVICE, "Huge", Empty(), BytesValue, timeout=5)
    assert err.value.code == Code.RESOURCE_EXHAUSTED
    assert echo(setup.client, "ok") == "ok"


def start_blocked_call(setup: Setup) -> tuple[threading.Thread, list[BaseException]]:
    """A call that stays in the server's Block handler; returns its thread and where its error goes."""
    errors: list[BaseException] = []

    def blocked() -> None:
        try:
            setup.client.call(SERVICE, "Block", Empty(), Empty)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    while "block" not in setup.calls.started:
        time.sleep(0.01)
    return t, errors


def test_peer_close_fails_calls_in_flight_promptly(setup: Setup) -> None:
    t, errors = start_blocked_call(setup)
    t0 = time.monotonic()
    setup.server.shutdown()  # closes the server's end of the stream
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 1.0
    assert len(errors) == 1 and isinstance(errors[0], ConnectionClosed)
    assert errors[0].code == Code.UNAVAILABLE
    assert setup.closed.wait(2) and setup.client.closed
    with pytest.raises(ConnectionClosed):
        echo(setup.client, "too late")


def test_client_close_fails_calls_in_flight(setup: Setup) -> None:
    t, errors = start_blocked_call(setup)
    setup.client.close()
    t.join(5)
    assert not t.is_alive() and isinstance(errors[0], ConnectionClosed)
    assert setup.closed.wait(2)


# --- the server against hand-made frames -------------------------------------------------------------


class RawPeer:
    """The client side of a connection driven frame by frame, to send what a Client never would."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.reader = FrameReader(stream)

    def send(self, data: bytes) -> None:
        self.stream.write(data)

    def request(self, stream_id: int, method: str, payload: bytes, flags: int = 0) -> None:
        req = Request(service=SERVICE, method=method, payload=payload).SerializeToString()
        self.send(encode(stream_id, TYPE_REQUEST, req, flags))

    def response(self) -> tuple[int, Response]:
        f = self.reader.next()
        assert f is not None and f.type == TYPE_RESPONSE
        return f.stream_id, Response.FromString(f.payload)


@pytest.fixture(params=[socket_pair, pipe_pair], ids=["socketpair", "pipes"])
def raw(request: pytest.FixtureRequest) -> Iterator[RawPeer]:
    client_stream, server_stream = request.param()
    server = make_server(Calls([], threading.Event()))
    threading.Thread(target=server.serve, args=(server_stream,), daemon=True).start()
    yield RawPeer(client_stream)
    server.shutdown()
    client_stream.close()
    server_stream.close()


def assert_echo(raw: RawPeer, stream_id: int) -> None:
    raw.request(stream_id, "Echo", StringValue(value="valid").SerializeToString())
    sid, resp = raw.response()
    assert sid == stream_id and resp.status.code == Code.OK
    assert StringValue.FromString(resp.payload).value == "valid"


def test_garbage_request_payload_gets_an_error_then_serving_continues(raw: RawPeer) -> None:
    raw.send(encode(1, TYPE_REQUEST, b"\xff\xff\xff\xff garbage"))
    sid, resp = raw.response()
    assert sid == 1 and resp.status.code == Code.INVALID_ARGUMENT
    assert_echo(raw, 3)


def test_oversized_request_frame_gets_resource_exhausted_then_serving_continues(raw: RawPeer) -> None:
    raw.send(encode(5, TYPE_REQUEST, b"\0" * (MAX_MESSAGE_SIZE + 100)))
    sid, resp = raw.response()
    assert sid == 5 and resp.status.code == Code.RESOURCE_EXHAUSTED
    assert_echo(raw, 7)


def test_even_stream_id_is_rejected(raw: RawPeer) -> None:
    raw.request(2, "Echo", b"")
    sid, resp = raw.response()
    assert sid == 2 and resp.status.code == Code.INVALID_ARGUMENT
    assert_echo(raw, 3)


def test_streaming_frames_do_not_desynchronise_the_server(raw: RawPeer) -> None:
    raw.request(1, "Echo", b"", flags=FLAG_REMOTE_OPEN)
    sid, resp = raw.response()
    assert sid == 1 and resp.status.code == Code.UNIMPLEMENTED
    raw.send(encode(1, TYPE_DATA, b"stream data", FLAG_REMOTE_CLOSED))  # ignored
    raw.send(encode(9, TYPE_RESPONSE, b"\x01\x02"))  # a server takes no responses: ignored
    raw.send(encode(11, 0x42, b"future message type"))  # skipped, for compatibility
    assert_echo(raw, 3)
    # remote closed on a request means "no more data from me": a unary method still answers.
    raw.request(5, "Echo", StringValue(value="rc").SerializeToString(), flags=FLAG_REMOTE_CLOSED)
    sid, resp = raw.response()
    assert sid == 5 and StringValue.FromString(resp.payload).value == "rc"


def test_unsyncable_stream_closes_only_that_connection() -> None:
    client_stream, server_stream = socket_pair()
    other_client, other_server = socket_pair()
    server = make_server(Calls([], threading.Event()))
    done = threading.Event()

    def serve_bad() -> None:
        server.serve(server_stream)
        done.set()

    threading.Thread(target=serve_bad, daemon=True).start()
    threading.Thread(target=server.serve, args=(other_server,), daemon=True).start()
    good = Client(other_client)
    try:
        bad = RawPeer(client_stream)
        bad.send(b"\xff" * 64)  # no frame header can be found in this
        assert done.wait(5)
        assert echo(good, "unaffected") == "unaffected"
    finally:
        good.close()
        server.shutdown()
        client_stream.close()
        server_stream.close()


# --- the client against hand-made frames -------------------------------------------------------------


def test_client_survives_bad_responses() -> None:
    client_stream, server_stream = socket_pair()
    client = Client(client_stream)
    peer = FrameReader(server_stream)
    results: list[object] = []

    def call(text: str) -> None:
        try:
            reply = client.call(SERVICE, "Echo", StringValue(value=text), StringValue, timeout=5)
            results.append(reply.value)
        except TTRPCError as exc:
            results.append(exc.code)

    try:
        for reply in (
            lambda sid: encode(sid, TYPE_RESPONSE, b"\0" * (MAX_MESSAGE_SIZE + 1)),
            lambda sid: encode(sid, TYPE_RESPONSE, b"\xff\xff garbage"),
            lambda sid: encode(sid + 1000, TYPE_RESPONSE, b"") + encode(sid, TYPE_DATA, b"x")
            + encode(sid, TYPE_RESPONSE, Response(payload=StringValue(value="ok").SerializeToString())
                     .SerializeToString()),
        ):
            t = threading.Thread(target=call, args=("x",))
            t.start()
            f = peer.next()
            assert f is not None and f.type == TYPE_REQUEST and f.stream_id % 2 == 1
            server_stream.write(reply(f.stream_id))
            t.join(5)
        assert results == [Code.RESOURCE_EXHAUSTED, Code.INTERNAL, "ok"]
        assert not client.closed
    finally:
        client.close()
        server_stream.close()


def test_client_stream_ids_are_odd_and_increase_by_two() -> None:
    client_stream, server_stream = socket_pair()
    client = Client(client_stream)
    peer = FrameReader(server_stream)
    try:
        ids = []
        for _ in range(3):
            t = threading.Thread(target=lambda: client.call(SERVICE, "Echo", Empty(), Empty, timeout=5))
            t.start()
            f = peer.next()
            assert f is not None and f.flags == 0  # empty flags: a unary request
            req = Request.FromString(f.payload)
            assert (req.service, req.method) == (SERVICE, "Echo") and 0 < req.timeout_nano <= 5 * 10**9
            ids.append(f.stream_id)
            server_stream.write(encode(f.stream_id, TYPE_RESPONSE, Response().SerializeToString()))
            t.join(5)
        assert ids == [1, 3, 5]
    finally:
        client.close()
        server_stream.close()


def test_serve_listener_accepts_many_connections_until_shutdown(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "ttrpc.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    server = make_server(Calls([], threading.Event()))
    peers: list[int | None] = []  # on_accept sees each connection first: the monitor keeps its client's pid
    accept = threading.Thread(target=server.serve_listener,
                              args=(listener, lambda s: peers.append(peer_pid(s))), daemon=True)
    accept.start()
    clients = []
    for i in range(3):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        clients.append(Client(socket_stream(sock)))
        assert echo(clients[-1], f"c{i}") == f"c{i}"
    assert peers == [os.getpid()] * 3
    server.shutdown()
    accept.join(5)
    assert not accept.is_alive()
    for c in clients:
        with pytest.raises(ConnectionClosed):
            echo(c, "gone")
        c.close()
    listener.close()


def test_fallback_forwards_raw_payloads_and_wait_idle() -> None:
    """A proxy: unregistered services go to the fallback on serialized payloads; it answers later,
    from any thread, or fails at once by raising; wait_idle tells when no client is connected any more."""
    server = Server()
    later: list[threading.Timer] = []

    def forward(ctx: Context, payload: bytes, reply: Callable[[bytes | TTRPCError], None]) -> None:
        if ctx.method == "Fail":
            raise TTRPCError(Code.NOT_FOUND, "no such thing")
        answer = StringValue(value=f"{ctx.service}/{ctx.method}:{StringValue.FromString(payload).value}")
        if ctx.method == "Later":  # the usual case: the answer comes from another thread
            later.append(threading.Timer(0.05, reply, args=(answer.SerializeToString(),)))
            later[-1].start()
        elif ctx.method == "LaterFail":
            later.append(threading.Timer(0.05, reply, args=(TTRPCError(Code.ABORTED, "upstream\nsaid no"),)))
            later[-1].start()
        else:
            reply(answer.SerializeToString())

    server.set_fallback(forward)
    a, b = socket_pair()
    threading.Thread(target=server.serve, args=(a,), daemon=True).start()
    client = Client(b)
    try:
        reply = client.call_raw("any.Service", "Echo", StringValue(value="x").SerializeToString(), timeout=5)
        assert StringValue.FromString(reply).value == "any.Service/Echo:x"
        reply = client.call_raw("any.Service", "Later", StringValue(value="y").SerializeToString(), timeout=5)
        assert StringValue.FromString(reply).value == "any.Service/Later:y"
        with pytest.raises(TTRPCError) as err:
            client.call_raw("any.Service", "Fail", b"", timeout=5)
        assert err.value.code == Code.NOT_FOUND
        with pytest.raises(TTRPCError) as err:
            client.call_raw("any.Service", "LaterFail", b"", timeout=5)
        assert err.value.code == Code.ABORTED and err.value.message == "upstream\\nsaid no"
        assert server.wait_idle(0.1) is False
    finally:
        client.close()
        for t in later:
            t.join()
    assert server.wait_idle(5.0) is True
    server.shutdown()
    a.close()


# --- long-poll methods, asynchronous calls, writes to a peer that does not read ----------------------


def test_long_poll_calls_leave_the_workers_free() -> None:
    """Fifty calls parked in a long-poll method, two workers: other calls still answer at once. The same
    calls on a method that is not declared long-poll take the workers, and the next call waits."""
    s = start(socket_pair, max_workers=2)
    parked: list[bytes | TTRPCError] = []
    try:
        for _ in range(50):
            s.client.call_async(SERVICE, "LongPoll", b"", parked.append)
        assert echo(s.client, "free") == "free"  # 5 s: generous; it would never come if workers were held
        assert len(parked) == 0
        assert threading.stack_size() == 0  # the long-poll threads' small stack was theirs only
        for _ in range(2):
            s.client.call_async(SERVICE, "Block", b"", parked.append)
        with pytest.raises(TTRPCError) as err:
            s.client.call(SERVICE, "Echo", StringValue(value="starved"), StringValue, timeout=0.3)
        assert err.value.code == Code.DEADLINE_EXCEEDED
    finally:
        s.calls.gate.set()
        deadline = time.monotonic() + 10
        while len(parked) < 52 and time.monotonic() < deadline:
            time.sleep(0.01)
        s.client.close()
        s.server.shutdown()
        s.server_stream.close()
    assert len(parked) == 52 and all(p == b"" for p in parked)


def test_call_async_results_errors_and_deadlines() -> None:
    s = start(socket_pair)
    got: dict[str, list[bytes | TTRPCError]] = {}
    order: list[str] = []
    done = threading.Event()

    def collect(name: str) -> Callable[[bytes | TTRPCError], None]:
        def on_done(result: bytes | TTRPCError) -> None:
            got.setdefault(name, []).append(result)
            order.append(name)
            if len(order) == 5:
                done.set()
        return on_done

    try:
        t0 = time.monotonic()
        s.client.call_async(SERVICE, "Echo", StringValue(value="hi").SerializeToString(), collect("echo"), 5)
        typed = StringValue(value="typed").SerializeToString()
        s.client.call_async(SERVICE, "Fail", typed, collect("fail"), 5)
        # One timer thread ends these in deadline order, whatever order they were started in.
        for name, timeout in (("slow", 0.6), ("fast", 0.2), ("middle", 0.4)):
            s.client.call_async(SERVICE, "LongPoll", b"", collect(name), timeout)
        assert done.wait(5)
        assert time.monotonic() - t0 < 3
        assert StringValue.FromString(got["echo"][0]).value == "hi"  # type: ignore[arg-type]
        fail = got["fail"][0]
        assert isinstance(fail, TTRPCError) and fail.code == Code.NOT_FOUND
        assert order[-3:] == ["fast", "middle", "slow"]
        for name in ("fast", "middle", "slow"):
            result = got[name][0]
            assert isinstance(result, TTRPCError) and result.code == Code.DEADLINE_EXCEEDED
        assert all(len(v) == 1 for v in got.values())  # exactly once each
        with pytest.raises(TTRPCError) as err:
            s.client.call_async(SERVICE, "Echo", b"", collect("never"), 0)
        assert err.value.code == Code.DEADLINE_EXCEEDED
    finally:
        s.calls.gate.set()
        s.client.close()
        s.server.shutdown()
        s.server_stream.close()
    assert "never" not in got
    assert not [t for t in threading.enumerate() if t.name == "ttrpc-client-timer" and t.is_alive()]


def test_close_ends_async_calls_once_and_refuses_new_ones() -> None:
    s = start(socket_pair)
    results: list[bytes | TTRPCError] = []
    try:
        s.client.call_async(SERVICE, "LongPoll", b"", results.append, 30)
        s.client.call_async(SERVICE, "LongPoll", b"", results.append)
        while s.calls.started.count("block") < 2:
            time.sleep(0.01)
        s.client.close()
        assert len(results) == 2 and all(isinstance(r, ConnectionClosed) for r in results)
        with pytest.raises(ConnectionClosed):
            s.client.call_async(SERVICE, "Echo", b"", results.append)
        assert len(results) == 2
    finally:
        s.calls.gate.set()
        s.server.shutdown()
        s.server_stream.close()


def test_a_peer_that_stops_reading_holds_no_call_past_its_deadline() -> None:
    client_stream, server_stream = socket_pair()  # nobody ever reads server_stream
    client = Client(client_stream)
    big = b"\0" * (2 << 20)  # far more than the socket buffers hold
    errors: list[BaseException] = []

    def no_deadline() -> None:
        try:
            client.call_raw(SERVICE, "Echo", big)
        except TTRPCError as exc:
            errors.append(exc)

    try:
        # A call without a deadline may wait for the peer for good; one with a deadline may not,
        # even when it cannot get at the connection.
        t = threading.Thread(target=no_deadline)
        t.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises(TTRPCError) as err:
            client.call_raw(SERVICE, "Echo", b"small", timeout=0.3)
        assert err.value.code == Code.DEADLINE_EXCEEDED and time.monotonic() - t0 < 2
        assert not client.closed
        client.close()
        t.join(5)
        assert not t.is_alive() and isinstance(errors[0], ConnectionClosed)
        # With a deadline, a frame cut short ends the connection: the stream cannot be read right any more.
        client_stream, server_stream2 = socket_pair()
        client = Client(client_stream)
        t0 = time.monotonic()
        with pytest.raises(TTRPCError) as err:
            client.call_raw(SERVICE, "Echo", big, timeout=0.3)
        assert err.value.code == Code.DEADLINE_EXCEEDED and time.monotonic() - t0 < 2
        assert client.closed
        server_stream2.close()
    finally:
        client.close()
        server_stream.close()


def test_no_thread_for_a_long_poll_call_fails_that_call_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(task: Callable[[], None], name: str) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr("kata.ttrpc.server.start_thread", exhausted)
    s = start(socket_pair)
    try:
        with pytest.raises(TTRPCError) as err:
            s.client.call(SERVICE, "LongPoll", Empty(), Empty, timeout=5)
        assert err.value.code == Code.RESOURCE_EXHAUSTED
        assert echo(s.client, "still serving") == "still serving"
    finally:
        s.client.close()
        s.server.shutdown()
        s.server_stream.close()


def test_deadlines_of_answered_async_calls_do_not_pile_up() -> None:
    s = start(socket_pair)
    answered = threading.Semaphore(0)
    try:
        for _ in range(500):
            s.client.call_async(SERVICE, "Echo", b"", lambda result: answered.release(), timeout=60)
            assert answered.acquire(timeout=5)
        assert len(s.client._deadlines) <= 130  # what is in flight, give or take the slack kept
    finally:
        s.client.close()
        s.server.shutdown()
        s.server_stream.close()
