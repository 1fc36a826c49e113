"""Status codes and the exceptions that carry them across a ttrpc connection."""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """The gRPC status codes, which ttrpc puts in google.rpc.Status.code."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def to_code(value: int) -> Code:
    """A wire code as a Code; a peer may send values we do not know, which gRPC treats as UNKNOWN."""
    try:
        return Code(value)
    except ValueError:
        return Code.UNKNOWN


class TTRPCError(Exception):
    """A call failed with a non-OK status, locally or on the remote side.

    The message is always one printable line of bounded length: a peer's status message (which a
    hostile guest writes) enters the host here, and is escaped and cut before anyone shows or logs it.
    """

    def __init__(self, code: Code, message: str) -> None:
        from kata.utils.text import printable  # here, not at import: the guest agent starts faster

        message = printable(message)
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name.lower()}: {self.message}"


class ConnectionClosed(TTRPCError):
    """The connection is gone: calls in flight and new calls fail with this (code UNAVAILABLE)."""

    def __init__(self, message: str = "ttrpc: connection closed") -> None:
        super().__init__(Code.UNAVAILABLE, message)


class ProtocolError(Exception):
    """The byte stream cannot be parsed as ttrpc frames any more; only closing the connection helps."""
