"""The ttrpc server: decodes requests on a stream and runs each handler on a worker thread.

Handlers share a bounded pool of workers, except long-poll methods (``Method(..., blocking=True)``),
which wait without bound (for a process's exit or output): each such call runs on a thread of its own,
so that any number of them leave the pool free for everything else. A forwarding proxy's fallback
holds no thread at all while its call is away.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from kata.ttrpc import frame
from kata.ttrpc.envelope import DecodeError, Message, Request, Response, Status, error_response
from kata.ttrpc.errors import Code, ProtocolError, TTRPCError
from kata.ttrpc.stream import Stream, socket_stream
from kata.ttrpc.workers import WorkerPool, start_thread


class Context:
    """What a handler knows about its call. deadline is on the time.monotonic() clock, None if unbounded.

    A plain slotted class, as are Method and frame.Frame: dataclasses costs import time in the guest.
    """

    __slots__ = ("service", "method", "metadata", "deadline")

    def __init__(self, service: str, method: str, metadata: dict[str, str], deadline: float | None) -> None:
        self.service = service
        self.method = method
        self.metadata = metadata
        self.deadline = deadline


Handler = Callable[[Context, Message], Message]
# How a forwarded call ends: the response's payload, or the error to answer with.
Reply = Callable[[bytes | TTRPCError], None]
# Serves every service that has no registered methods, on serialized payloads: a forwarding proxy.
# It runs on the connection's reader thread and must not block: it starts the call and calls
# reply() exactly once, later, from any thread. If it raises instead, that is the answer.
Forwarder = Callable[[Context, bytes, Reply], None]

Req = TypeVar("Req", bound=Message)


class Method(Generic[Req]):
    """A unary method: how to parse its request, and the handler that answers it.

    Generic in the request type so a handler may take its own message type (Method(StringValue, echo))
    and still type-check; at run time the handler gets exactly request_type.

    ``blocking``: a long-poll method, whose handler may wait without bound; each call gets a thread
    of its own instead of one of the shared workers.
    """

    __slots__ = ("request_type", "handler", "blocking")

    def __init__(
        self, request_type: type[Req], handler: Callable[[Context, Req], Message], blocking: bool = False
    ) -> None:
        self.request_type = request_type
        self.handler = handler
        self.blocking = blocking


class _Connection:
    """One served stream: responses are written whole under a lock, and dropped once the stream ended.

    Dropping matters on a virtio-serial port, where the next host client reuses the same fd and stream ids.
    """

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.alive = True
        self._lock = threading.Lock()

    def send(self, stream_id: int, payload: bytes) -> None:
        data = frame.encode(stream_id, frame.TYPE_RESPONSE, payload)
        with self._lock:
            if not self.alive:
                return
            try:
                self.stream.write(data)
            except OSError:
                # The reader sees the broken stream too and ends serve(); nothing to answer to now.
                self.alive = False

    def end(self) -> None:
        with self._lock:
            self.alive = False


class Server:
    """Serves registered services on any number of streams at once; handlers share max_workers threads,
    long-poll methods have one each.
    """

    def __init__(self, max_workers: int = 32) -> None:
        self._services: dict[str, dict[str, Method[Any]]] = {}
        self._fallback: Forwarder | None = None
        self._pool = WorkerPool(max_workers, "ttrpc-handler")
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._listeners: set[socket.socket] = set()
        self._stopped = False

    def register_service(self, name: str, methods: Mapping[str, Method[Any]]) -> None:
        """Add (or replace) a service; its full name is what clients send, e.g. "grpc.AgentService"."""
        with self._lock:
            self._services[name] = dict(methods)

    def set_fallback(self, forwarder: Forwarder) -> None:
        """Answer calls to unregistered services through ``forwarder`` (see Forwarder)."""
        self._fallback = forwarder

    def serve(self, stream: Stream) -> None:
        """Serve one stream until EOF or shutdown().

        The caller keeps ownership of the stream (shutdown() closes it to wake the reader). Responses of
        handlers still running when this returns are dropped, so serving the same fd again is safe.
        """
        conn = _Connection(stream)
        with self._lock:
            if self._stopped:
                return
            self._connections.add(conn)
        reader = frame.FrameReader(stream)
        try:
            while True:
                f = reader.next()
                if f is None:
                    return
                self._receive(conn, f)
        except (ProtocolError, OSError):
            return  # a garbled or broken stream: end this connection only
        finally:
            conn.end()
            with self._lock:
                self._connections.discard(conn)

    def serve_listener(self, listener: socket.socket,
                       on_accept: Callable[[socket.socket], None] | None = None) -> None:
        """Accept connections until shutdown(), serving each on its own thread; ``on_accept`` sees
        each connection first (it must not block, nor raise)."""
        with self._lock:
            if self._stopped:
                return
            self._listeners.add(listener)
        try:
            while not self._stopped:
                try:
                    sock, _ = listener.accept()
                except OSError:
                    if self._stopped:
                        return
                    raise
                if on_accept is not None:
                    on_accept(sock)
                threading.Thread(
                    target=self._serve_socket, args=(sock,), name="ttrpc-conn", daemon=True
                ).start()
        finally:
            with self._lock:
                self._listeners.discard(listener)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no stream is being served; False if some still were after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._connections:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def shutdown(self) -> None:
        """Stop accepting, close every served stream and stop the workers (running handlers finish)."""
        with self._lock:
            self._stopped = True
            listeners = list(self._listeners)
            connections = list(self._connections)
        for listener in listeners:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
            except OSError:
                pass
        for conn in connections:
            conn.end()
            conn.stream.close()
        self._pool.shutdown()

    def _serve_socket(self, sock: socket.socket) -> None:
        stream = socket_stream(sock)
        try:
            self.serve(stream)
        finally:
            stream.close()

    def _receive(self, conn: _Connection, f: frame.Frame) -> None:
        if f.type != frame.TYPE_REQUEST:
            # Data frames need a streaming method, and this server registers none; responses are not
            # for servers. Both are skipped, as ttrpc asks for unknown traffic, and framing stays intact.
            return
        if f.oversized:
            conn.send(
                f.stream_id,
                error_response(
                    Code.RESOURCE_EXHAUSTED,
                    f"message length {f.length} exceeds maximum message size of {frame.MAX_MESSAGE_SIZE}",
                ),
            )
            return
        if f.stream_id % 2 != 1:
            odd = error_response(Code.INVALID_ARGUMENT, "stream id must be odd for client streams")
            conn.send(f.stream_id, odd)
            return
        try:
            req = Request.FromString(f.payload)
        except DecodeError as exc:
            conn.send(f.stream_id, error_response(Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}"))
            return
        if f.flags & frame.FLAG_REMOTE_OPEN:
            unsupported = f"{req.service}/{req.method}: client streaming is not supported"
            conn.send(f.stream_id, error_response(Code.UNIMPLEMENTED, unsupported))
            return
        received = time.monotonic()
        deadline = received + req.timeout_nano / 1e9 if req.timeout_nano > 0 else None
        methods = self._services.get(req.service)
        if methods is None and self._fallback is not None:
            self._forward(self._fallback, conn, f.stream_id, req, deadline)
            return
        method = None if methods is None else methods.get(req.method)
        if method is None:
            missing = (f"service {req.service} not implemented" if methods is None
                       else f"service {req.service}: method {req.method} not implemented")
            conn.send(f.stream_id, error_response(Code.UNIMPLEMENTED, missing))
            return
        stream_id = f.stream_id

        def task() -> None:
            conn.send(stream_id, self._outcome(req, method, deadline))

        if method.blocking:
            try:
                start_thread(task, f"ttrpc-{req.method}")
            except RuntimeError:  # no thread to be had: this call fails, the connection goes on
                conn.send(stream_id, error_response(Code.RESOURCE_EXHAUSTED, f"{req.method}: no thread left"))
        elif not self._pool.submit(task):
            conn.send(stream_id, error_response(Code.UNAVAILABLE, "server is shutting down"))

    def _outcome(self, req: Request, method: Method[Any], deadline: float | None) -> bytes:
        """The serialized Response to req: the handler's answer, or any failure as a status."""
        name = f"{req.service}/{req.method}"
        try:
            if deadline is not None and time.monotonic() >= deadline:
                # It waited for a worker past its deadline: the client has given up, so do not run it.
                raise TTRPCError(Code.DEADLINE_EXCEEDED, f"{name}: deadline expired before start")
            try:
                request = method.request_type.FromString(req.payload)
            except Exception as exc:  # protobuf's DecodeError: the payload is not this method's message
                raise TTRPCError(Code.INVALID_ARGUMENT, f"{name}: bad request: {exc}") from exc
            ctx = _context(req, deadline)
            result = method.handler(ctx, request)
            if not hasattr(result, "SerializeToString"):
                raise TTRPCError(Code.INTERNAL, f"{name}: handler returned {type(result).__name__}")
            return self._response(name, result.SerializeToString(), deadline)
        except BaseException as exc:  # noqa: BLE001 - any handler failure becomes a status, never a crash
            return _error(exc)

    def _forward(
        self, forwarder: Forwarder, conn: _Connection, stream_id: int, req: Request, deadline: float | None
    ) -> None:
        name = f"{req.service}/{req.method}"

        def reply(result: bytes | TTRPCError) -> None:
            try:
                if isinstance(result, TTRPCError):
                    raise result
                data = self._response(name, result, deadline)
            except TTRPCError as exc:
                data = _error(exc)
            # Sent by a worker: a client slow to read its answers must not stall the thread that
            # completed the call (for a proxy, the reader of the upstream connection).
            self._pool.submit(lambda: conn.send(stream_id, data))  # refused at shutdown: conn is ending

        ctx = _context(req, deadline)
        try:
            forwarder(ctx, req.payload, reply)
        except BaseException as exc:  # noqa: BLE001 - it could not start: that is the answer
            conn.send(stream_id, _error(exc))

    @staticmethod
    def _response(name: str, payload: bytes, deadline: float | None) -> bytes:
        if deadline is not None and time.monotonic() >= deadline:
            raise TTRPCError(Code.DEADLINE_EXCEEDED, f"{name}: deadline exceeded")
        data = Response(status=Status(code=int(Code.OK)), payload=payload).SerializeToString()
        if len(data) > frame.MAX_MESSAGE_SIZE:
            raise TTRPCError(
                Code.RESOURCE_EXHAUSTED,
                f"{name}: response of {len(data)} bytes exceeds the maximum",
            )
        return data


def _context(req: Request, deadline: float | None) -> Context:
    return Context(req.service, req.method, {kv.key: kv.value for kv in req.metadata}, deadline)


def _error(exc: BaseException) -> bytes:
    """A failure as a serialized error Response: TTRPCError keeps its code, the rest are UNKNOWN."""
    if isinstance(exc, TTRPCError):
        return error_response(exc.code, exc.message)
    return error_response(Code.UNKNOWN, str(exc) or type(exc).__name__)
