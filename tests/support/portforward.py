"""A minimal client of Kubernetes' port-forward protocol over WebSocket, as a kubelet-side client
speaks it to containerd's streaming server (the URL the CRI's PortForward returns).

The server (containerd 1.6's pkg/cri/streaming, Kubernetes' own) takes the ports in the query
(``?port=N``) and the subprotocol ``v4.channel.k8s.io``: every binary message starts with a channel
byte, channel 0 carrying the data of the first port and channel 1 its error text. Each channel's
first message is the port, two bytes little-endian. Version 4 has no half-close: the forwarded
connection ends when the server closes the WebSocket, after the pod's side has closed.

    result = forward_once(url, 8080, b"GET / HTTP/1.0\\r\\n\\r\\n")
    result.data, result.error

Everything has a deadline; a protocol violation is a PortForwardError with one line.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import urlsplit

from kata.errors import KataError

SUBPROTOCOL = "v4.channel.k8s.io"
DATA_CHANNEL, ERROR_CHANNEL = 0, 1
_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's handshake constant
_MAX_HEADER = 16 * 1024
_MAX_MESSAGE = 4 * 1024 * 1024  # what this client takes in one message (the server sends 32 KiB)
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

Connect = Callable[[str, int, float], socket.socket]


class PortForwardError(KataError):
    pass


class Forwarded(NamedTuple):
    data: bytes  # what the pod's port sent back
    error: str  # the server's error text for the port ("" when none)
    seconds: float  # from the upgrade to the WebSocket's end


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


class WebSocket:
    """A client WebSocket (RFC 6455) on a connected socket: masked frames out, bounded frames in."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self.closed = False

    @classmethod
    def open(cls, url: str, query: str, subprotocol: str, timeout: float,
             connect: Connect = _connect) -> WebSocket:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise PortForwardError(f"not a plain http URL: {url!r}")
        sock = connect(parts.hostname, parts.port or 80, timeout)
        sock.settimeout(timeout)
        ws = cls(sock)
        try:
            target = f"{parts.path or '/'}?{'&'.join(q for q in (parts.query, query) if q)}"
            ws._handshake(parts.netloc, target, subprotocol)
        except BaseException:
            sock.close()
            raise
        return ws

    def _handshake(self, host: str, target: str, subprotocol: str) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                   f"Sec-WebSocket-Protocol: {subprotocol}\r\nOrigin: http://{host}\r\n\r\n")
        self.sock.sendall(request.encode())
        while b"\r\n\r\n" not in self._buf:
            if len(self._buf) > _MAX_HEADER:
                raise PortForwardError("the server's handshake answer is too long")
            self._fill()
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            raise PortForwardError(f"no WebSocket upgrade: {lines[0]!r}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        accept = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            raise PortForwardError("the server's Sec-WebSocket-Accept does not match our key")
        if headers.get("sec-websocket-protocol") != subprotocol:
            raise PortForwardError(f"the server chose subprotocol {headers.get('sec-websocket-protocol')!r}")

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        self._buf += data

    def _take(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def send(self, payload: bytes, opcode: int = _OP_BINARY) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        key = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        self.sock.sendall(header + mask + masked)

    def receive(self) -> bytes | None:
        """The next data message, whole; None once the server has closed the WebSocket."""
        message = b""
        while True:
            first, second = self._take(2)
            opcode, fin = first & 0x0F, bool(first & 0x80)
            if second & 0x80:
                raise PortForwardError("the server masked a frame")
            n = second & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._take(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._take(8))
            if len(message) + n > _MAX_MESSAGE:
                raise PortForwardError(f"a message of more than {_MAX_MESSAGE} bytes")
            payload = self._take(n)
            if opcode == _OP_CLOSE:
                self.closed = True
                return None
            if opcode == _OP_PING:
                self.send(payload, _OP_PONG)
            elif opcode in (_OP_BINARY, _OP_TEXT, _OP_CONT):
                message += payload
                if fin:
                    return message
            elif opcode != _OP_PONG:
                raise PortForwardError(f"unknown WebSocket opcode {opcode}")

    def close(self) -> None:
        try:
            if not self.closed:
                self.send(struct.pack("!H", 1000), _OP_CLOSE)
        except OSError:
            pass
        self.sock.close()


def forward_once(url: str, port: int, payload: bytes, timeout: float = 30.0,
                 connect: Connect = _connect) -> Forwarded:
    """Open a forward of ``port`` at ``url``, send ``payload`` to it, and read what comes back until
    the server ends the forward (its side closed, or an error); ``connect`` makes the TCP connection
    (to reach a server in another network namespace)."""
    deadline = time.monotonic() + timeout
    ws = WebSocket.open(url, f"port={port}", SUBPROTOCOL, timeout, connect)
    started = time.monotonic()
    data, error = b"", b""
    announced: set[int] = set()
    try:
        if payload:
            ws.send(bytes([DATA_CHANNEL]) + payload)
        while True:
            ws.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                message = ws.receive()
            except EOFError:
                break
            except TimeoutError:
                raise PortForwardError(f"port {port}: no end of the forward within {timeout:g} s") from None
            if message is None:
                break
            if not message:
                continue
            channel, body = message[0], message[1:]
            if channel not in (DATA_CHANNEL, ERROR_CHANNEL):
                raise PortForwardError(f"a message on channel {channel}")
            if channel not in announced:  # each channel's first message names its port
                if body != struct.pack("<H", port):
                    raise PortForwardError(f"channel {channel} opened for {body!r}, not port {port}")
                announced.add(channel)
                continue
            if channel == DATA_CHANNEL:
                data += body
            else:
                error += body
    finally:
        ws.close()
    return Forwarded(data, error.decode(errors="replace"), time.monotonic() - started)
