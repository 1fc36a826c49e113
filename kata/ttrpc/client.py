"""The ttrpc client: many concurrent unary calls multiplexed over one stream by stream id."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

from kata.ttrpc import frame
from kata.ttrpc.envelope import DecodeError, KeyValue, Message, Request, Response, error_from_status
from kata.ttrpc.errors import Code, ConnectionClosed, ProtocolError, TTRPCError
from kata.ttrpc.stream import Stream

M = TypeVar("M", bound=Message)

_MAX_STREAM_ID = 0xFFFFFFFF


class _Pending:
    """One call in flight: the reader thread fills it in and releases the lock the caller waits on."""

    __slots__ = ("done", "payload", "error")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.payload = b""
        self.error: TTRPCError | None = None


class Client:
    """A ttrpc client over one Stream; thread-safe, with one daemon reader thread.

    on_close runs once, on the reader thread, when the connection ends for any reason (peer EOF, a
    garbled stream, or close()).
    """

    def __init__(self, stream: Stream, on_close: Callable[[], None] | None = None) -> None:
        self._stream = stream
        self._on_close = on_close
        self._lock = threading.Lock()  # guards _calls, _next_id and _closed
        self._write_lock = threading.Lock()
        self._calls: dict[int, _Pending] = {}
        self._next_id = 1  # client-initiated streams are odd
        self._closed = False
        self._close_reason = "ttrpc: connection closed"
        self._reader = threading.Thread(target=self._read_loop, name="ttrpc-client-reader", daemon=True)
        self._reader.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> M:
        """Call service/method and wait for its response (or the timeout, in seconds)."""
        payload = self.call_raw(service, method, request.SerializeToString(), timeout, metadata)
        try:
            return response_type.FromString(payload)  # type: ignore[attr-defined,no-any-return]
        except Exception as exc:  # protobuf's DecodeError, or ours
            raise TTRPCError(Code.INTERNAL, f"{service}/{method}: cannot decode response: {exc}") from exc

    def call_raw(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bytes:
        """call() on serialized messages: what a proxy forwards, or a caller without generated code."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if timeout is not None and timeout <= 0:
            raise TTRPCError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: timeout {timeout}s already over")
        envelope = Request(service=service, method=method, payload=payload)
        if timeout is not None:
            envelope.timeout_nano = max(1, int(timeout * 1e9))
        if metadata:
            envelope.metadata.extend(KeyValue(key=k, value=v) for k, v in metadata.items())
        data = envelope.SerializeToString()
        if len(data) > frame.MAX_MESSAGE_SIZE:
            raise TTRPCError(
                Code.RESOURCE_EXHAUSTED,
                f"{service}/{method}: request of {len(data)} bytes exceeds the maximum of "
                f"{frame.MAX_MESSAGE_SIZE}",
            )

        pending = _Pending()
        with self._lock:
            if self._closed:
                raise ConnectionClosed(self._close_reason)
            stream_id = self._next_id
            if stream_id > _MAX_STREAM_ID:
                raise TTRPCError(Code.RESOURCE_EXHAUSTED, "ttrpc: stream ids exhausted on this connection")
            self._next_id += 2
            self._calls[stream_id] = pending
        try:
            with self._write_lock:
                self._stream.write(frame.encode(stream_id, frame.TYPE_REQUEST, data))
        except OSError as exc:
            self._forget(stream_id)
            self._shutdown(f"ttrpc: write failed: {exc}")
            raise ConnectionClosed(f"ttrpc: write failed: {exc}") from exc

        if deadline is None:
            pending.done.acquire()
        elif not pending.done.acquire(timeout=max(0.0, deadline - time.monotonic())):
            if self._forget(stream_id):
                raise TTRPCError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: no response within {timeout}s")
            # The reader claimed the call just now: its result is a moment away.
            pending.done.acquire()

        if pending.error is not None:
            raise pending.error
        return pending.payload

    def close(self) -> None:
        """Fail calls in flight with ConnectionClosed and close the stream; safe to call twice."""
        self._shutdown("ttrpc: client closed")
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)

    def _forget(self, stream_id: int) -> bool:
        with self._lock:
            return self._calls.pop(stream_id, None) is not None

    def _complete(self, stream_id: int, payload: bytes = b"", error: TTRPCError | None = None) -> None:
        with self._lock:
            pending = self._calls.pop(stream_id, None)
        if pending is None:
            return  # a late answer to a call that timed out, or noise: nobody waits for it
        pending.payload = payload
        pending.error = error
        pending.done.release()

    def _shutdown(self, reason: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_reason = reason
            calls, self._calls = self._calls, {}
        for pending in calls.values():
            pending.error = ConnectionClosed(reason)
            pending.done.release()
        self._stream.close()

    def _read_loop(self) -> None:
        reader = frame.FrameReader(self._stream)
        reason = "ttrpc: connection closed by peer"
        try:
            while True:
                f = reader.next()
                if f is None:
                    break
                if f.type != frame.TYPE_RESPONSE:
                    continue  # data frames belong to streaming calls, which this client never starts
                if f.oversized:
                    self._complete(
                        f.stream_id,
                        error=TTRPCError(
                            Code.RESOURCE_EXHAUSTED,
                            f"response of {f.length} bytes exceeds the maximum of {frame.MAX_MESSAGE_SIZE}",
                        ),
                    )
                    continue
                try:
                    response = Response.FromString(f.payload)
                except DecodeError as exc:
                    self._complete(f.stream_id, error=TTRPCError(Code.INTERNAL, f"malformed response: {exc}"))
                    continue
                if response.status is not None and response.status.code != Code.OK:
                    self._complete(f.stream_id, error=error_from_status(response.status))
                else:
                    self._complete(f.stream_id, payload=response.payload)
        except ProtocolError as exc:
            reason = f"ttrpc: {exc}"
        except OSError as exc:
            reason = f"ttrpc: read failed: {exc}"
        finally:
            self._shutdown(reason)
            if self._on_close is not None:
                try:
                    self._on_close()
                except Exception:  # noqa: BLE001 - a callback bug must not hide the close itself
                    pass
