"""ttrpc message framing: a 10-byte header (length, stream id, type, flags) then the payload.

The reader keeps the stream in sync with oversized frames by discarding their payload, as containerd's
ttrpc does, so one bad message costs one call and not the connection.
"""

from __future__ import annotations

import struct

from kata.ttrpc.errors import ProtocolError
from kata.ttrpc.stream import Stream

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_MESSAGE_SIZE = 4 << 20

TYPE_REQUEST = 0x1
TYPE_RESPONSE = 0x2
TYPE_DATA = 0x3
KNOWN_TYPES = frozenset((TYPE_REQUEST, TYPE_RESPONSE, TYPE_DATA))

FLAG_REMOTE_CLOSED = 0x1
FLAG_REMOTE_OPEN = 0x2
FLAG_NO_DATA = 0x4

# Reads are this large so that most small frames arrive in one system call, header and payload together.
_READ_CHUNK = 64 * 1024


class Frame:
    """One received frame. A plain slotted class: building a dataclass costs import time in the guest."""

    __slots__ = ("stream_id", "type", "flags", "payload", "oversized", "length")

    def __init__(
        self, stream_id: int, type: int, flags: int, payload: bytes, oversized: bool = False, length: int = 0
    ) -> None:
        self.stream_id = stream_id
        self.type = type
        self.flags = flags
        self.payload = payload
        # True when the payload was longer than allowed: it was discarded and `payload` is empty.
        self.oversized = oversized
        self.length = length


def encode(stream_id: int, msg_type: int, payload: bytes, flags: int = 0) -> bytes:
    """One frame as bytes, ready for a single write (callers check the size limit first)."""
    return HEADER.pack(len(payload), stream_id, msg_type, flags) + payload


def decode_header(data: bytes) -> tuple[int, int, int, int]:
    """(length, stream_id, type, flags) from the first 10 bytes."""
    length, stream_id, msg_type, flags = HEADER.unpack_from(data)
    return length, stream_id, msg_type, flags


class FrameReader:
    """Reads whole frames from a Stream; one reader per stream, used from one thread."""

    def __init__(self, stream: Stream, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._stream = stream
        self._max = max_size
        self._buf = bytearray()

    def _fill(self, need: int) -> bool:
        """Buffer at least `need` bytes; False on EOF."""
        while len(self._buf) < need:
            chunk = self._stream.read(max(_READ_CHUNK, need - len(self._buf)))
            if not chunk:
                return False
            self._buf += chunk
        return True

    def _discard(self, n: int) -> bool:
        have = min(n, len(self._buf))
        del self._buf[:have]
        n -= have
        while n > 0:
            chunk = self._stream.read(min(n, _READ_CHUNK))
            if not chunk:
                return False
            n -= len(chunk)
        # A read never asks for more than is left of the discarded payload, so nothing is over-read.
        return True

    def next(self) -> Frame | None:
        """The next frame, or None at a clean EOF between frames.

        Raises ProtocolError when the stream is garbled beyond recovery or ends inside a frame.
        """
        if not self._fill(HEADER_SIZE):
            if self._buf:
                raise ProtocolError(f"connection closed inside a frame header ({len(self._buf)} bytes)")
            return None
        length, stream_id, msg_type, flags = HEADER.unpack_from(self._buf)
        if length > self._max:
            if msg_type not in KNOWN_TYPES:
                # An unknown type with an absurd length is noise, not a frame: no way to find the next one.
                raise ProtocolError(f"garbled frame header: type {msg_type:#x}, length {length}")
            del self._buf[:HEADER_SIZE]
            if not self._discard(length):
                raise ProtocolError("connection closed inside an oversized frame")
            return Frame(stream_id, msg_type, flags, b"", oversized=True, length=length)
        end = HEADER_SIZE + length
        if not self._fill(end):
            raise ProtocolError(f"connection closed inside a frame ({len(self._buf)} of {end} bytes)")
        payload = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        return Frame(stream_id, msg_type, flags, payload, length=length)
