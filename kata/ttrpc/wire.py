"""The protobuf wire format, just enough for ttrpc's envelope and a few small messages.

ttrpc's own envelope has three tiny messages; encoding them here keeps `google.protobuf` out of
processes that only forward or make a handful of calls (the per-container monitor must stay small).
Typed API messages still use the generated protobuf classes.
"""

from __future__ import annotations

from collections.abc import Iterable

VARINT = 0
FIXED64 = 1
LEN = 2
FIXED32 = 5

Value = int | str | bytes
Fields = dict[int, list[int | bytes]]


class WireError(ValueError):
    """The bytes are not a valid protobuf message."""


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # negative int32/int64 travel as 10-byte two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode(fields: Iterable[tuple[int, Value | None]]) -> bytes:
    """(number, value) pairs as a message. Defaults (0, "", b"", None) are left out, as proto3 does;
    ints are varints, str and bytes length-delimited (a nested message is passed as its bytes)."""
    out = bytearray()
    for number, value in fields:
        if value is None or value == 0 or value == "" or value == b"":
            continue
        if isinstance(value, int):
            out += _varint(number << 3 | VARINT) + _varint(value)
        else:
            data = value.encode() if isinstance(value, str) else value
            out += _varint(number << 3 | LEN) + _varint(len(data)) + data
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError("truncated or overlong varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


# No message read here has more than a handful of fields; a peer's 4 MiB of two-byte fields would
# otherwise cost a hundred MiB of lists in a process meant to stay small.
MAX_FIELDS = 4096


def decode(data: bytes) -> Fields:
    """Every field of a message by number, in order: varints as int, length-delimited as bytes.
    Fixed-width fields are skipped (no message read here has one). At most MAX_FIELDS fields."""
    fields: Fields = {}
    pos = 0
    count = 0
    while pos < len(data):
        count += 1
        if count > MAX_FIELDS:
            raise WireError(f"more than {MAX_FIELDS} fields")
        key, pos = _read_varint(data, pos)
        number, kind = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if kind == VARINT:
            value, pos = _read_varint(data, pos)
            fields.setdefault(number, []).append(value)
        elif kind == LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise WireError("truncated field")
            fields.setdefault(number, []).append(data[pos:pos + size])
            pos += size
        elif kind in (FIXED64, FIXED32):
            pos += 8 if kind == FIXED64 else 4
            if pos > len(data):
                raise WireError("truncated field")
        else:
            raise WireError(f"unsupported wire type {kind}")
    return fields


def last_int(fields: Fields, number: int, signed32: bool = False) -> int:
    """The field's value (proto3: the last one wins), 0 when absent."""
    values = fields.get(number)
    if not values or not isinstance(values[-1], int):
        return 0
    value = values[-1]
    if signed32:
        value &= 0xFFFFFFFF
        if value >= 1 << 31:
            value -= 1 << 32
    elif value >= 1 << 63:
        value -= 1 << 64
    return value


def last_bytes(fields: Fields, number: int) -> bytes:
    values = fields.get(number)
    if not values or not isinstance(values[-1], bytes):
        return b""
    return values[-1]


def last_str(fields: Fields, number: int) -> str:
    try:
        return last_bytes(fields, number).decode()
    except UnicodeDecodeError as exc:
        raise WireError(f"field {number}: invalid UTF-8") from exc
