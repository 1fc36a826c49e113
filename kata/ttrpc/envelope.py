"""The ttrpc.Request / ttrpc.Response envelopes and their status, as used by both ends."""

from __future__ import annotations

from google.protobuf.message import DecodeError, Message

from kata.protocols.google.rpc.status_pb2 import Status
from kata.protocols.ttrpc_pb2 import KeyValue, Request, Response
from kata.ttrpc.errors import Code, TTRPCError, to_code

__all__ = [
    "DecodeError",
    "KeyValue",
    "Message",
    "Request",
    "Response",
    "Status",
    "error_from_status",
    "error_response",
]


def error_response(code: Code, message: str) -> bytes:
    """A serialized Response that carries only an error status."""
    return Response(status=Status(code=int(code), message=message)).SerializeToString()


def error_from_status(status: Status) -> TTRPCError:
    return TTRPCError(to_code(status.code), status.message)
