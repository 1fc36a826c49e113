"""Connected ttrpc stream pairs in one process, (client end, server end): for the ttrpc tests and the
round-trip benchmark (bench/ttrpc_roundtrip.py)."""

from __future__ import annotations

import os
import socket

from kata.ttrpc import Stream, fd_stream, socket_stream


def socket_pair() -> tuple[Stream, Stream]:
    a, b = socket.socketpair()
    return socket_stream(a), socket_stream(b)


def pipe_pair() -> tuple[Stream, Stream]:
    c2s_r, c2s_w = os.pipe()
    s2c_r, s2c_w = os.pipe()
    return fd_stream(s2c_r, c2s_w), fd_stream(c2s_r, s2c_w)

