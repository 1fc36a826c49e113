"""The ttrpc client: many concurrent unary calls multiplexed over one stream by stream id.

Whatever the peer sends, a call ends in its response payload or a TTRPCError (ConnectionClosed when the
connection is gone), and a call with a deadline ends by it: a garbled stream closes the connection, an
unparseable response fails its call, anything else (answers nobody waits for, frames of other types) is
skipped.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

from kata.ttrpc import frame
from kata.ttrpc.envelope import DecodeError, KeyValue, Message, Request, Response, error_from_status
from kata.ttrpc.errors import Code, ConnectionClosed, ProtocolError, TTRPCError
from kata.ttrpc.stream import Stream, WriteTimeout

M = TypeVar("M", bound=Message)

_MAX_STREAM_ID = 0xFFFFFFFF

# What a call ends in: the response's payload, or why there is none.
Result = bytes | TTRPCError
Callback = Callable[[Result], None]


class _Pending:
    """One call in flight. Whoever takes it out of Client._calls (the reader, the deadline, close())
    finishes it, so it finishes exactly once."""

    __slots__ = ("on_done", "what", "timeout")

    def __init__(self, on_done: Callback, what: str, timeout: float | None) -> None:
        self.on_done = on_done
        self.what = what  # "service/method", for messages
        self.timeout = timeout

    def finish(self, result: Result) -> None:
        try:
            self.on_done(result)
        except Exception:  # noqa: BLE001 - a caller's callback must not end the thread that runs it
            pass

    def expired(self) -> TTRPCError:
        return TTRPCError(Code.DEADLINE_EXCEEDED, f"{self.what}: no response within {self.timeout}s")


class Client:
    """A ttrpc client over one Stream; thread-safe, with one daemon reader thread (and, once an
    asynchronous call has a deadline, one timer thread).

    on_close runs once, on the reader thread, when the connection ends for any reason (peer EOF, a
    garbled stream, or close()).
    """

    def __init__(self, stream: Stream, on_close: Callable[[], None] | None = None) -> None:
        self._stream = stream
        self._on_close = on_close
        self._lock = threading.Lock()  # guards _calls, _next_id, _closed and _deadlines
        self._write_lock = threading.Lock()
        self._calls: dict[int, _Pending] = {}
        self._next_id = 1  # client-initiated streams are odd
        self._closed = False
        self._close_reason = "ttrpc: connection closed"
        # Deadlines of asynchronous calls, a heap: (deadline, stream id). An entry whose call was
        # answered in time is skipped when it comes up, or dropped once most entries are such.
        self._deadlines: list[tuple[float, int]] = []
        self._timer_wake = threading.Condition(self._lock)
        self._timer: threading.Thread | None = None
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
            raise TTRPCError(Code.INTERNAL, f"{service}/{method}: cannot decode response: {exc}") from None

    def call_raw(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bytes:
        """call() on serialized messages: what a proxy forwards, or a caller without generated code."""
        done = threading.Lock()
        done.acquire()
        results: list[Result] = []

        def on_done(result: Result) -> None:
            results.append(result)
            done.release()

        deadline = None if timeout is None else time.monotonic() + timeout
        stream_id = self._start(service, method, payload, timeout, metadata, on_done, timed=False)
        if deadline is None:
            done.acquire()
        elif not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
            pending = self._forget(stream_id)
            if pending is not None:
                raise pending.expired()
            done.acquire()  # the reader claimed the call just now: its result is a moment away
        result = results[0]
        if isinstance(result, TTRPCError):
            raise result
        return result

    def call_async(
        self,
        service: str,
        method: str,
        payload: bytes,
        on_done: Callback,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Start a call without waiting for it: ``on_done`` gets its payload or TTRPCError exactly
        once, later, on the reader's thread (or the timer's, at the deadline, or close()'s): it must
        not block. Raises TTRPCError when the call cannot even start (``on_done`` is then not called).
        """
        self._start(service, method, payload, timeout, metadata, on_done, timed=True)

    def close(self) -> None:
        """Fail calls in flight with ConnectionClosed and close the stream; safe to call twice."""
        self._shutdown("ttrpc: client closed")
        me = threading.current_thread()
        for thread in (self._reader, self._timer):
            if thread is not None and thread is not me:
                thread.join(timeout=5)

    # ---- sending ---------------------------------------------------------------------------------
    def _start(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
        on_done: Callback,
        timed: bool,
    ) -> int:
        """Register and send the request; ``timed``: the timer thread enforces the deadline."""
        what = f"{service}/{method}"
        if timeout is not None and timeout <= 0:
            raise TTRPCError(Code.DEADLINE_EXCEEDED, f"{what}: timeout {timeout}s already over")
        deadline = None if timeout is None else time.monotonic() + timeout
        envelope = Request(service=service, method=method, payload=payload)
        if timeout is not None:
            envelope.timeout_nano = max(1, int(timeout * 1e9))
        if metadata:
            envelope.metadata.extend(KeyValue(key=k, value=v) for k, v in metadata.items())
        data = envelope.SerializeToString()
        if len(data) > frame.MAX_MESSAGE_SIZE:
            raise TTRPCError(
                Code.RESOURCE_EXHAUSTED,
                f"{what}: request of {len(data)} bytes exceeds the maximum of {frame.MAX_MESSAGE_SIZE}",
            )
        with self._lock:
            if self._closed:
                raise ConnectionClosed(self._close_reason)
            stream_id = self._next_id
            if stream_id > _MAX_STREAM_ID:
                raise TTRPCError(Code.RESOURCE_EXHAUSTED, "ttrpc: stream ids exhausted on this connection")
            self._next_id += 2
            self._calls[stream_id] = _Pending(on_done, what, timeout)
            if timed and deadline is not None:
                self._add_deadline(deadline, stream_id)
        self._send(stream_id, frame.encode(stream_id, frame.TYPE_REQUEST, data), deadline, what)
        return stream_id

    def _send(self, stream_id: int, data: bytes, deadline: float | None, what: str) -> None:
        """Write one request frame, by the call's deadline: a peer that stops reading must not hold a
        call (or every call behind it) past its deadline.

        On failure the call is taken back and the error raised, unless the peer answered it already
        (a hostile peer can guess stream ids): its result was delivered, so nothing is raised.
        """
        if deadline is None:
            self._write_lock.acquire()
        elif not self._write_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            if self._forget(stream_id) is not None:
                raise TTRPCError(Code.DEADLINE_EXCEEDED, f"{what}: the connection is busy (peer not reading)")
            return
        try:
            self._stream.write(data, deadline)
        except WriteTimeout as exc:
            owned = self._forget(stream_id) is not None
            if exc.sent:
                # Half a frame went out: nothing later on this stream could be read right.
                self._shutdown("ttrpc: a request was cut short (peer not reading)")
            if owned:
                raise TTRPCError(Code.DEADLINE_EXCEEDED, f"{what}: cannot send (peer not reading)") from None
        except OSError as exc:
            owned = self._forget(stream_id) is not None
            self._shutdown(f"ttrpc: write failed: {exc}")
            if owned:
                raise ConnectionClosed(f"ttrpc: write failed: {exc}") from None
        finally:
            self._write_lock.release()

    # ---- completing --------------------------------------------------------------------------------
    def _forget(self, stream_id: int) -> _Pending | None:
        with self._lock:
            return self._calls.pop(stream_id, None)

    def _complete(self, stream_id: int, result: Result) -> None:
        pending = self._forget(stream_id)
        if pending is not None:  # else a late answer to a call that timed out, or noise
            pending.finish(result)

    def _shutdown(self, reason: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_reason = reason
            calls, self._calls = self._calls, {}
            self._timer_wake.notify()
        for pending in calls.values():
            pending.finish(ConnectionClosed(reason))
        self._stream.close()

    # ---- deadlines of asynchronous calls -------------------------------------------------------------
    def _add_deadline(self, deadline: float, stream_id: int) -> None:
        """With self._lock held."""
        if len(self._deadlines) > 64 and len(self._deadlines) > 2 * len(self._calls):
            # Mostly calls answered in time: keep the heap as small as what is in flight.
            self._deadlines = [entry for entry in self._deadlines if entry[1] in self._calls]
            heapq.heapify(self._deadlines)
        heapq.heappush(self._deadlines, (deadline, stream_id))
        if self._timer is None:
            self._timer = threading.Thread(target=self._run_timer, name="ttrpc-client-timer", daemon=True)
            self._timer.start()
        elif self._deadlines[0][1] == stream_id:
            self._timer_wake.notify()  # the earliest deadline changed

    def _run_timer(self) -> None:
        while True:
            expired: list[_Pending] = []
            with self._lock:
                while not expired:
                    if self._closed:
                        return
                    now = time.monotonic()
                    while self._deadlines and self._deadlines[0][0] <= now:
                        pending = self._calls.pop(heapq.heappop(self._deadlines)[1], None)
                        if pending is not None:
                            expired.append(pending)
                    if not expired:
                        self._timer_wake.wait(self._deadlines[0][0] - now if self._deadlines else None)
            for pending in expired:
                pending.finish(pending.expired())

    # ---- receiving ---------------------------------------------------------------------------------
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
                self._complete(f.stream_id, _result(f))
        except ProtocolError as exc:
            reason = f"ttrpc: {exc}"
        except OSError as exc:
            reason = f"ttrpc: read failed: {exc}"
        except Exception as exc:  # noqa: BLE001 - whatever it was, the connection ends, not the process
            reason = f"ttrpc: reading the connection failed: {type(exc).__name__}: {exc}"
        finally:
            self._shutdown(reason)
            if self._on_close is not None:
                try:
                    self._on_close()
                except Exception:  # noqa: BLE001 - a callback bug must not hide the close itself
                    pass


def _result(f: frame.Frame) -> Result:
    """What one response frame means for its call."""
    if f.oversized:
        too_big = f"response of {f.length} bytes exceeds the maximum of {frame.MAX_MESSAGE_SIZE}"
        return TTRPCError(Code.RESOURCE_EXHAUSTED, too_big)
    try:
        response = Response.FromString(f.payload)
    except DecodeError as exc:
        return TTRPCError(Code.INTERNAL, f"malformed response: {exc}")
    if response.status is not None and response.status.code != Code.OK:
        return error_from_status(response.status)
    return response.payload
