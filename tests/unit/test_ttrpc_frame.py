"""Framing: header layout, round trips, and how the reader survives split, oversized and garbled input."""

from __future__ import annotations

import socket
import threading

import pytest

from kata.ttrpc import socket_stream
from kata.ttrpc.errors import ProtocolError
from kata.ttrpc.frame import (
    FLAG_NO_DATA,
    FLAG_REMOTE_CLOSED,
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    TYPE_DATA,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    FrameReader,
    decode_header,
    encode,
)

pytestmark = pytest.mark.timeout(20)


def test_header_layout_is_big_endian_length_id_type_flags() -> None:
    data = encode(0x01020305, TYPE_RESPONSE, b"abc", flags=FLAG_REMOTE_CLOSED)
    assert HEADER_SIZE == 10
    assert data == b"\x00\x00\x00\x03" + b"\x01\x02\x03\x05" + b"\x02" + b"\x01" + b"abc"
    assert decode_header(data) == (3, 0x01020305, TYPE_RESPONSE, FLAG_REMOTE_CLOSED)


def _reader_over(chunks: list[bytes]) -> FrameReader:
    """A FrameReader on a real socket whose peer writes `chunks` one by one, then closes."""
    a, b = socket.socketpair()

    def feed() -> None:
        for c in chunks:
            b.sendall(c)
        b.close()

    threading.Thread(target=feed, daemon=True).start()
    return FrameReader(socket_stream(a))


def test_round_trip_of_several_frames_split_at_every_byte() -> None:
    big = b"x" * 70000
    wire = encode(1, TYPE_REQUEST, b"hello") + encode(3, TYPE_DATA, b"", FLAG_NO_DATA) + encode(5, 1, big)
    reader = _reader_over([wire[i : i + 1] for i in range(64)] + [wire[64:]])
    frames = []
    while (f := reader.next()) is not None:
        frames.append((f.stream_id, f.type, f.flags, f.payload))
    assert frames == [(1, TYPE_REQUEST, 0, b"hello"), (3, TYPE_DATA, FLAG_NO_DATA, b""), (5, 1, 0, big)]


def test_oversized_frame_is_discarded_and_the_next_frame_read() -> None:
    big = MAX_MESSAGE_SIZE + 1
    wire = encode(7, TYPE_REQUEST, b"\0" * big) + encode(9, TYPE_REQUEST, b"next")
    reader = _reader_over([wire])
    first = reader.next()
    assert first is not None and first.oversized and first.stream_id == 7 and first.length == big
    assert first.payload == b""
    second = reader.next()
    assert second is not None and (second.stream_id, second.payload) == (9, b"next")
    assert reader.next() is None


def test_garbled_header_is_a_protocol_error() -> None:
    reader = _reader_over([b"\xff" * 10])
    with pytest.raises(ProtocolError):
        reader.next()


def test_eof_inside_a_frame_is_a_protocol_error() -> None:
    reader = _reader_over([encode(1, TYPE_REQUEST, b"abcdef")[:-2]])
    with pytest.raises(ProtocolError):
        reader.next()
