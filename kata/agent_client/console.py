"""The host end of a guest's debug console: open a session, then relay the operator's input into
it and the shell's output out to the operator's terminal until the shell exits.

The guest is untrusted here as everywhere: only frame headers are read (a length over the format's
bound, or a kind the guest may not send, ends the session); what a data frame carries is written to
the terminal unchanged, which is what the operator asked for. Nothing is buffered without bound:
output goes out as it arrives (a stalled terminal stalls the guest's shell), input is read only
while less than BUFFER_LIMIT of it waits for the guest.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from kata.agent_client.transport import open_socket
from kata.errors import KataError
from kata.protocols import debug_console as proto
from kata.protocols.agent_api import AgentEndpoint

BUFFER_LIMIT = 64 * 1024
READ_CHUNK = 16 * 1024
CONNECT_TIMEOUT = 5.0
# The guest answers OPEN by starting the shell. A port holds one host at a time: while another
# session has it, this one is not even read, and gives up after this long.
START_TIMEOUT = 15.0


class ConsoleError(KataError):
    """The console could not be opened, or broke off; one line."""


class Session:
    """One shell in the guest, for this process."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self.sock = sock
        self.where = where
        self.decoder = proto.Decoder(proto.GUEST_KINDS)
        self.early: list[tuple[bytes, bytes]] = []  # frames that came with STARTED

    @classmethod
    def open(cls, endpoint: AgentEndpoint, where: str, *, rows: int, cols: int, tty: bool, term: str,
             timeout: float = START_TIMEOUT) -> Session:
        """Connect and ask for a shell; returns once the guest says it runs."""
        try:
            sock = open_socket(endpoint, CONNECT_TIMEOUT)
        except OSError as exc:
            raise ConsoleError(f"cannot connect to the debug console of {where}: "
                               f"{exc.strerror or exc}") from None
        session = cls(sock, where)
        try:
            session._start(proto.open_frame(rows, cols, tty, term), timeout)
        except BaseException:
            sock.close()
            raise
        return session

    def _start(self, opening: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(opening)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError()
                self.sock.settimeout(left)
                data = self.sock.recv(READ_CHUNK)
                if not data:
                    raise ConsoleError(f"the debug console of {self.where} closed before its shell started")
                frames = self._decode(data)
                for i, (kind, _) in enumerate(frames):
                    if kind == proto.STARTED:
                        self.early = frames[i + 1:]
                        return
        except TimeoutError:
            raise ConsoleError(f"the debug console of {self.where} did not start a shell within "
                               f"{timeout:g}s (another session may hold it)") from None
        except OSError as exc:
            raise ConsoleError(f"the debug console of {self.where}: {exc.strerror or exc}") from None
        finally:
            self.sock.settimeout(None)

    def _decode(self, data: bytes) -> list[tuple[bytes, bytes]]:
        try:
            return self.decoder.feed(data)
        except proto.ProtocolError as exc:
            raise ConsoleError(f"the debug console of {self.where} broke the protocol: {exc}") from None

    def relay(self, stdin: int, stdout: int, *, resize_from: int | None = None) -> int:
        """Relay until the shell exits; its exit status. ``resize_from``: the terminal whose size
        the guest's pty follows (on SIGWINCH). At the end of ``stdin``, the shell's input ends."""
        out = bytearray()
        stdin_open = True
        self.sock.setblocking(False)
        with _winch_pipe(resize_from is not None) as wake:
            for kind, payload in self.early:
                status = self._on_frame(kind, payload, stdout)
                if status is not None:
                    return status
            while True:
                p = select.poll()
                p.register(self.sock, select.POLLIN | (select.POLLOUT if out else 0))
                if stdin_open and len(out) < BUFFER_LIMIT:
                    p.register(stdin, select.POLLIN)
                if wake is not None:
                    p.register(wake, select.POLLIN)
                for fd, ev in p.poll():
                    if fd == self.sock.fileno():
                        if ev & select.POLLOUT:
                            self._send(out)
                        if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                            status = self._receive(stdout)
                            if status is not None:
                                return status
                    elif fd == stdin:
                        data = os.read(stdin, READ_CHUNK)
                        if data:
                            out += proto.data_frames(data)
                        else:
                            stdin_open = False
                            out += proto.frame(proto.EOF)
                    elif fd == wake:
                        _drain(wake)
                        assert resize_from is not None
                        out += proto.resize_frame(*_size(resize_from))

    def _send(self, out: bytearray) -> None:
        try:
            del out[:self.sock.send(out)]
        except BlockingIOError:
            pass
        except OSError as exc:
            raise ConsoleError(f"the debug console of {self.where}: {exc.strerror or exc}") from None

    def _receive(self, stdout: int) -> int | None:
        try:
            data = self.sock.recv(READ_CHUNK)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                raise ConsoleError(f"the debug console of {self.where}: {exc.strerror or exc}") from None
            data = b""
        if not data:
            raise ConsoleError(f"the debug console of {self.where} closed before its shell exited "
                               "(has the VM stopped?)")
        for kind, payload in self._decode(data):
            status = self._on_frame(kind, payload, stdout)
            if status is not None:
                return status
        return None

    def _on_frame(self, kind: bytes, payload: bytes, stdout: int) -> int | None:
        if kind == proto.DATA:
            _write_all(stdout, payload)
        elif kind == proto.EXITED:
            try:
                return proto.parse_exited(payload)
            except proto.ProtocolError as exc:
                raise ConsoleError(f"the debug console of {self.where} broke the protocol: {exc}") from None
        return None

    def close(self) -> None:
        self.sock.close()


def terminal_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on ``fd``; (0, 0), which leaves the guest's default, for none."""
    return _size(fd) if os.isatty(fd) else (0, 0)


def _size(fd: int) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 0, 0
    return size.lines, size.columns


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])


@contextmanager
def _winch_pipe(enabled: bool) -> Iterator[int | None]:
    """A pipe that gets a byte on each SIGWINCH while the relay runs (the handler only writes, and
    wakes the relay's poll, which would otherwise resume waiting)."""
    if not enabled:
        yield None
        return
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def on_winch(_sig: int, _frame: object) -> None:
        try:
            os.write(w, b"x")
        except BlockingIOError:
            pass

    previous = signal.signal(signal.SIGWINCH, on_winch)
    try:
        yield r
    finally:
        signal.signal(signal.SIGWINCH, previous)
        os.close(r)
        os.close(w)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 64):
            pass
    except BlockingIOError:
        pass
