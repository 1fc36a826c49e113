"""The ttrpc.Request / ttrpc.Response envelopes and their google.rpc.Status, as used by both ends.

Encoded with kata.ttrpc.wire rather than generated code, so that ttrpc itself needs no protobuf
runtime (kata/protocols/ttrpc.proto documents the same messages; a test checks they agree).
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from kata.ttrpc import wire
from kata.ttrpc.errors import Code, TTRPCError, to_code

DecodeError = wire.WireError

M = TypeVar("M", bound="Message")


class Message(Protocol):
    """What ttrpc needs of a typed message: generated protobuf classes have both methods."""

    def SerializeToString(self) -> bytes: ...  # noqa: N802 - protobuf's name


class KeyValue:
    __slots__ = ("key", "value")

    def __init__(self, key: str = "", value: str = "") -> None:
        self.key = key
        self.value = value


class Status:
    __slots__ = ("code", "message")

    def __init__(self, code: int = 0, message: str = "") -> None:
        self.code = code
        self.message = message

    def SerializeToString(self) -> bytes:  # noqa: N802
        return wire.encode(((1, self.code), (2, self.message)))

    @classmethod
    def FromString(cls, data: bytes) -> Status:  # noqa: N802
        f = wire.decode(data)
        return cls(wire.last_int(f, 1, signed32=True), wire.last_str(f, 2))


class Request:
    __slots__ = ("service", "method", "payload", "timeout_nano", "metadata")

    def __init__(self, service: str = "", method: str = "", payload: bytes = b"", timeout_nano: int = 0,
                 metadata: list[KeyValue] | None = None) -> None:
        self.service = service
        self.method = method
        self.payload = payload
        self.timeout_nano = timeout_nano
        self.metadata = metadata if metadata is not None else []

    def SerializeToString(self) -> bytes:  # noqa: N802
        head = wire.encode(((1, self.service), (2, self.method), (3, self.payload), (4, self.timeout_nano)))
        meta = b"".join(wire.encode(((5, wire.encode(((1, kv.key), (2, kv.value)))),))
                        for kv in self.metadata)
        return head + meta

    @classmethod
    def FromString(cls, data: bytes) -> Request:  # noqa: N802
        f = wire.decode(data)
        metadata = []
        for raw in f.get(5, []):
            if isinstance(raw, bytes):
                kv = wire.decode(raw)
                metadata.append(KeyValue(wire.last_str(kv, 1), wire.last_str(kv, 2)))
        return cls(wire.last_str(f, 1), wire.last_str(f, 2), wire.last_bytes(f, 3), wire.last_int(f, 4),
                   metadata)


class Response:
    __slots__ = ("status", "payload")

    def __init__(self, status: Status | None = None, payload: bytes = b"") -> None:
        self.status = status
        self.payload = payload

    def SerializeToString(self) -> bytes:  # noqa: N802
        status = None if self.status is None else self.status.SerializeToString()
        # An OK status still travels as a present (empty) message, as the Go side sends it.
        head = wire.encode(((2, self.payload),))
        if status is not None:
            head = wire.encode(((1, status),)) or b"\x0a\x00"
            head += wire.encode(((2, self.payload),))
        return head

    @classmethod
    def FromString(cls, data: bytes) -> Response:  # noqa: N802
        f = wire.decode(data)
        raw = f.get(1)
        status = Status.FromString(raw[-1]) if raw and isinstance(raw[-1], bytes) else None
        return cls(status, wire.last_bytes(f, 2))


def error_response(code: Code, message: str) -> bytes:
    """A serialized Response that carries only an error status."""
    return Response(status=Status(code=int(code), message=message)).SerializeToString()


def error_from_status(status: Status) -> TTRPCError:
    return TTRPCError(to_code(status.code), status.message)


__all__ = ["DecodeError", "KeyValue", "Message", "Request", "Response", "Status", "error_from_status",
           "error_response"]
