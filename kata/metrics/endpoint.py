"""One sandbox's metrics over its unix socket: HTTP/1.0 `GET /metrics`, one request per connection.

The socket is born root-only (umask 077, kata.utils.sockets.listen_private) in the sandbox's root-only
state directory.
The server holds no thread while idle beyond its accept loop, serves a few scrapes at once and drops
connections past that, and gives every connection a deadline, so a stuck client holds nothing for long.
Nothing heavy is imported until a scrape comes (prometheus-client costs the runc path's monitor ~14 MB).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kata.metrics import MetricsError
from kata.utils.sockets import listen_private
from kata.utils.text import one_line

PATH = "/metrics"
# A request is a line and a few headers; a scrape's answer is tens of KB per sandbox.
_MAX_REQUEST = 8192
MAX_RESPONSE = 16 << 20
_CONNECTION_DEADLINE = 10.0
_MAX_CONCURRENT = 4


class Endpoint:
    """Serves ``render()`` (Prometheus text) at GET /metrics on the unix socket ``path``."""

    def __init__(self, path: Path, render: Callable[[], bytes]) -> None:
        self.path = path
        self._render = render
        self._slots = threading.BoundedSemaphore(_MAX_CONCURRENT)
        self._listener: socket.socket | None = None

    def start(self) -> None:
        self._listener = listen_private(str(self.path), 16)
        threading.Thread(target=self._accept, args=(self._listener,), name="metrics", daemon=True).start()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop (close alone would not)
            except OSError:
                pass
            listener.close()
            try:
                self.path.unlink()
            except OSError:
                pass

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                conn.close()  # as many scrapes as we serve at once are under way already
                continue
            threading.Thread(target=self._serve, args=(conn,), name="metrics-scrape", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(_CONNECTION_DEADLINE)
                status, body, ctype = self._answer(_read_request(conn))
                head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n").encode()
                conn.sendall(head + body)
        except OSError:
            pass  # the client went, or was too slow
        finally:
            self._slots.release()

    def _answer(self, request_line: str) -> tuple[str, bytes, str]:
        words = request_line.split()
        if len(words) < 2 or words[0] != "GET":
            return "405 Method Not Allowed", b"only GET\n", "text/plain"
        if words[1].split("?")[0] != PATH:
            return "404 Not Found", b"not found\n", "text/plain"
        try:
            body = self._render()
        except Exception as exc:  # noqa: BLE001 - any failure is this scrape's, in one line; we serve on
            return "503 Service Unavailable", one_line(exc).encode() + b"\n", "text/plain"
        from kata.metrics.families import CONTENT_TYPE

        return "200 OK", body, CONTENT_TYPE


def _read_request(conn: socket.socket) -> str:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        chunk = conn.recv(_MAX_REQUEST)
        if not chunk:
            break
        data += chunk
        if len(data) > _MAX_REQUEST:
            raise OSError("request too long")
    return data.split(b"\n", 1)[0].decode("ascii", errors="replace")


def fetch(path: Path, timeout: float) -> bytes:
    """The sandbox's text from its socket within ``timeout`` seconds; MetricsError, one line, otherwise."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(f"GET {PATH} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MetricsError(f"no answer within {timeout:g}s")
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_RESPONSE:
                    raise MetricsError(f"an answer of more than {MAX_RESPONSE} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise MetricsError(f"no answer within {timeout:g}s") from None
    except OSError as exc:
        raise MetricsError(f"{path}: {exc.strerror or exc}") from None
    head, sep, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if not sep or len(status) < 2:
        raise MetricsError("not an HTTP answer")
    if status[1] != b"200":
        raise MetricsError(one_line(body.decode(errors="replace")) or status[1].decode(errors="replace"))
    return body
