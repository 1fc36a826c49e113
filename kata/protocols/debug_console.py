"""The debug console's wire format, which both ends share: small typed frames on a channel of its
own (a virtio-serial port, or a vsock port), apart from the agent's ttrpc channel.

Why frames, not a raw byte stream: a virtio-serial port cannot tell the host that the guest side
closed (QEMU keeps the host's socket open), so the end of the shell and its status must travel in
band; and the terminal's size and the end of a piped input need a way in beside the keystrokes.
The host reads only the frame headers: what a data frame carries goes to the operator's terminal
as it came. Cheap to import: the guest agent loads it.
"""

from __future__ import annotations

import struct

# Name of the virtio-serial port in the guest (/sys/class/virtio-ports/*/name).
SERIAL_PORT_NAME = "agent.debug_console.0"
# Kata's default debug_console_vport, for VMs whose channels are vsock.
VSOCK_PORT = 1026
# Kernel parameters the hypervisor driver sets (Kata's names): the agent offers the console, and
# on vsock listens on that port.
KERNEL_PARAM = "agent.debug_console"
VPORT_PARAM = "agent.debug_console_vport"

# kind (1 byte), payload length (2 bytes, big-endian), payload.
HEADER = struct.Struct(">cH")
MAX_PAYLOAD = 16 * 1024

# host -> guest
OPEN = b"O"  # the session's first frame: rows, cols (u16 each), flags (u8), then TERM (ASCII)
DATA = b"D"  # keystrokes, or piped input
RESIZE = b"W"  # rows, cols (u16 each)
EOF = b"E"  # the host's input has ended: so does the shell's (a pty gets its end-of-file character)
# guest -> host (DATA as well: what the shell wrote)
STARTED = b"S"  # the shell runs: the session is this host's
EXITED = b"X"  # the shell has exited: its status (u8, 128+N for a death by signal N)

HOST_KINDS = frozenset({OPEN, DATA, RESIZE, EOF})
GUEST_KINDS = frozenset({DATA, STARTED, EXITED})

FLAG_TTY = 1  # the host is a terminal: the shell runs on a pty (else on pipes, for a script)
_OPEN = struct.Struct(">HHB")
_SIZE = struct.Struct(">HH")
MAX_TERM = 64
_TERM_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.+-_")


class ProtocolError(Exception):
    """A frame that breaks the format; the session ends."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(kind, len(payload)) + payload


def data_frames(data: bytes) -> bytes:
    """``data`` as DATA frames of at most MAX_PAYLOAD bytes each."""
    return b"".join(frame(DATA, data[i:i + MAX_PAYLOAD]) for i in range(0, len(data), MAX_PAYLOAD))


def open_frame(rows: int, cols: int, tty: bool, term: str) -> bytes:
    raw = term.encode("ascii", "replace")[:MAX_TERM]
    return frame(OPEN, _OPEN.pack(_clamp(rows), _clamp(cols), FLAG_TTY if tty else 0) + raw)


def parse_open(payload: bytes) -> tuple[int, int, bool, str]:
    """(rows, cols, tty, TERM) of an OPEN frame; a TERM outside [A-Za-z0-9.+-_] becomes ''."""
    if len(payload) < _OPEN.size or len(payload) > _OPEN.size + MAX_TERM:
        raise ProtocolError(f"open frame of {len(payload)} bytes")
    rows, cols, flags = _OPEN.unpack_from(payload)
    term = payload[_OPEN.size:]
    return rows, cols, bool(flags & FLAG_TTY), term.decode() if set(term) <= _TERM_CHARS else ""


def resize_frame(rows: int, cols: int) -> bytes:
    return frame(RESIZE, _SIZE.pack(_clamp(rows), _clamp(cols)))


def parse_resize(payload: bytes) -> tuple[int, int]:
    if len(payload) != _SIZE.size:
        raise ProtocolError(f"resize frame of {len(payload)} bytes")
    rows, cols = _SIZE.unpack(payload)
    return rows, cols


def exited_frame(status: int) -> bytes:
    return frame(EXITED, bytes([status & 0xFF]))


def parse_exited(payload: bytes) -> int:
    if len(payload) != 1:
        raise ProtocolError(f"exit frame of {len(payload)} bytes")
    return payload[0]


def _clamp(n: int) -> int:
    return max(0, min(n, 0xFFFF))


class Decoder:
    """Frames out of a byte stream, as it arrives. What it holds is bounded by one frame (plus the
    last chunk fed), whatever the other side sends: a length over MAX_PAYLOAD or an unexpected kind
    is a ProtocolError."""

    def __init__(self, kinds: frozenset[bytes]) -> None:
        self._kinds = kinds
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._buf)
            if kind not in self._kinds:
                raise ProtocolError(f"unexpected frame kind {kind!r}")
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append((kind, bytes(self._buf[HEADER.size:end])))
            del self._buf[:end]
        return frames

    @property
    def pending(self) -> int:
        """Bytes held of a frame not yet complete."""
        return len(self._buf)
