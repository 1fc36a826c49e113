"""The hand-written envelope codec against protobuf's generated classes for the same .proto."""

from __future__ import annotations

import pytest

from kata.protocols import agent_pb2, ttrpc_pb2
from kata.protocols.google.rpc import status_pb2
from kata.ttrpc import envelope, wire


def test_request_matches_generated_code_both_ways() -> None:
    ours = envelope.Request("grpc.AgentService", "WaitProcess", b"\x0a\x01c", 5_000_000_000,
                            [envelope.KeyValue("k", "v"), envelope.KeyValue("k2", "")])
    theirs = ttrpc_pb2.Request(service="grpc.AgentService", method="WaitProcess", payload=b"\x0a\x01c",
                               timeout_nano=5_000_000_000,
                               metadata=[ttrpc_pb2.KeyValue(key="k", value="v"),
                                         ttrpc_pb2.KeyValue(key="k2")])
    assert ours.SerializeToString() == theirs.SerializeToString()
    back = envelope.Request.FromString(theirs.SerializeToString())
    assert (back.service, back.method, back.payload, back.timeout_nano) == (
        "grpc.AgentService", "WaitProcess", b"\x0a\x01c", 5_000_000_000)
    assert [(kv.key, kv.value) for kv in back.metadata] == [("k", "v"), ("k2", "")]


@pytest.mark.parametrize("code,message", [(0, ""), (5, "no such container"), (11, "EOF")])
def test_response_matches_generated_code(code: int, message: str) -> None:
    ours = envelope.Response(envelope.Status(code, message), b"payload").SerializeToString()
    theirs = ttrpc_pb2.Response(status=status_pb2.Status(code=code, message=message), payload=b"payload")
    assert ttrpc_pb2.Response.FromString(ours) == theirs
    back = envelope.Response.FromString(theirs.SerializeToString())
    assert back.status is not None and (back.status.code, back.status.message) == (code, message)
    assert back.payload == b"payload"


def test_negative_int32_and_unknown_fields() -> None:
    data = agent_pb2.WaitProcessResponse(status=-1).SerializeToString()
    assert wire.last_int(wire.decode(data), 1, signed32=True) == -1
    assert wire.encode(((1, -1),)) == data
    # A fixed64 field the reader does not know is skipped, not an error.
    assert wire.decode(b"\x09" + bytes(8) + b"\x10\x07") == {2: [7]}


@pytest.mark.parametrize("junk", [b"\x0a\x05ab", b"\x08", b"\x00", b"\x0b", b"\xff" * 11])
def test_malformed_input_is_a_decode_error(junk: bytes) -> None:
    with pytest.raises(envelope.DecodeError):
        envelope.Request.FromString(junk)


def test_a_message_of_too_many_fields_is_a_decode_error() -> None:
    assert len(wire.decode(b"\x08\x01" * wire.MAX_FIELDS)[1]) == wire.MAX_FIELDS
    with pytest.raises(wire.WireError):
        wire.decode(b"\x08\x01" * (wire.MAX_FIELDS + 1))
