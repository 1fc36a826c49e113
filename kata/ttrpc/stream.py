"""Byte streams that ttrpc runs over: sockets (unix, vsock) and raw file descriptors (virtio-serial ports).

Both kinds must let close() from one thread wake a read blocked in another, or a client could never be
closed while its reader thread waits for the peer.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from typing import Protocol


class WriteTimeout(TimeoutError):
    """A write could not finish by its deadline; ``sent`` bytes of it went out (a frame cut short
    leaves the stream unusable)."""

    def __init__(self, sent: int) -> None:
        super().__init__(f"write timed out after {sent} bytes")
        self.sent = sent


class Stream(Protocol):
    def read(self, n: int) -> bytes:
        """Up to n bytes; b"" at EOF (or once the stream is closed)."""
        ...

    def write(self, data: bytes, deadline: float | None = None) -> None:
        """All of data, or raise OSError; WriteTimeout once ``deadline`` (time.monotonic()) is past,
        as when the peer stops reading."""
        ...

    def close(self) -> None: ...


def _poll_ms(deadline: float) -> int:
    return max(0, int((deadline - time.monotonic()) * 1000) + 1)


class _SocketStream:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._closed = False

    def read(self, n: int) -> bytes:
        try:
            return self._sock.recv(n)
        except OSError:
            if self._closed:
                return b""
            raise

    def write(self, data: bytes, deadline: float | None = None) -> None:
        if deadline is None:
            self._sock.sendall(data)
            return
        view = memoryview(data)
        sent = 0
        poller: select.poll | None = None
        while sent < len(data):
            try:
                sent += self._sock.send(view[sent:], socket.MSG_DONTWAIT)
                continue
            except BlockingIOError:
                pass
            if poller is None:
                poller = select.poll()
                poller.register(self._sock, select.POLLOUT)
            if time.monotonic() >= deadline or not poller.poll(_poll_ms(deadline)):
                raise WriteTimeout(sent)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # shutdown() wakes a recv() blocked in another thread; close() alone does not on Linux.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def socket_stream(sock: socket.socket) -> Stream:
    """A connected stream socket (AF_UNIX, AF_VSOCK, ...) as a Stream; close() closes the socket."""
    return _SocketStream(sock)


class _FdStream:
    """Reads and writes with poll() so that close() can wake a blocked reader through a pipe.

    The fd is closed only once no read or write is using it, so a concurrently reused fd number is never
    read by mistake. Works for blocking and non-blocking fds alike.
    """

    def __init__(self, fd: int, write_fd: int | None) -> None:
        self._rfd = fd
        self._wfd = fd if write_fd is None else write_fd
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False
        self._released = False

    def _enter(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._users += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._users -= 1
            release = self._closed and self._users == 0
        if release:
            self._release()

    def _wait(self, fd: int, events: int, deadline: float | None = None) -> bool:
        """Wait until fd is ready; False once the stream was closed. WriteTimeout(0) past ``deadline``."""
        poller = select.poll()
        poller.register(fd, events)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = poller.poll(None if deadline is None else _poll_ms(deadline))
            if self._closed:
                return False
            if any(f == fd for f, _ in ready):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                raise WriteTimeout(0)

    def read(self, n: int) -> bytes:
        if not self._enter():
            return b""
        try:
            while True:
                if not self._wait(self._rfd, select.POLLIN):
                    return b""
                try:
                    return os.read(self._rfd, n)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    # A virtio-serial port whose host side went away reports EIO/ENXIO on some kernels.
                    if exc.errno in (errno.EIO, errno.ENXIO, errno.ECONNRESET):
                        return b""
                    raise
        finally:
            self._leave()

    def write(self, data: bytes, deadline: float | None = None) -> None:
        if not self._enter():
            raise BrokenPipeError(errno.EPIPE, "stream closed")
        try:
            view = memoryview(data)
            sent = 0
            while sent < len(data):
                try:
                    # With a deadline, only write once poll() says there is room: a blocking fd
                    # could otherwise block here for good (it may still, for a write larger than
                    # the room there is; host-side streams are sockets, which never do).
                    if deadline is not None and not self._wait(self._wfd, select.POLLOUT, deadline):
                        raise BrokenPipeError(errno.EPIPE, "stream closed")
                    sent += os.write(self._wfd, view[sent:])
                except BlockingIOError:
                    if not self._wait(self._wfd, select.POLLOUT, deadline):
                        raise BrokenPipeError(errno.EPIPE, "stream closed") from None
                except WriteTimeout:
                    raise WriteTimeout(sent) from None
        finally:
            self._leave()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            release = self._users == 0
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if release:
            self._release()

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        for fd in {self._rfd, self._wfd, self._wake_r, self._wake_w}:
            try:
                os.close(fd)
            except OSError:
                pass


def fd_stream(fd: int, write_fd: int | None = None) -> Stream:
    """A file descriptor (e.g. /dev/vport1p1 opened O_RDWR) as a Stream; the stream owns and closes it.

    write_fd, when given, is written instead of fd: a pipe pair is one stream in two descriptors.
    """
    return _FdStream(fd, write_fd)
