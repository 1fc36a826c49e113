"""The agent's end of a container process's stdio: three pipes, or one pty master when it has a tty."""

from __future__ import annotations

import errno
import os
import threading

# What we write on CloseStdin of a tty process: the terminal's end-of-file character (VEOF, ^D).
_TTY_EOF = b"\x04"


class EndOfStream(Exception):
    """The stream has ended (the process closed it, or it had none)."""


class Stdio:
    """Pipes: `child_fds()` are handed to the spawned process, then `close_child_fds()`."""

    def __init__(self, *, tty_master: int | None = None) -> None:
        self.tty_master = tty_master
        self._lock = threading.Lock()
        self._child: list[int] = []
        self.stdin_w: int | None = None
        self.stdout_r: int | None = None
        self.stderr_r: int | None = None

    @classmethod
    def pipes(cls) -> Stdio:
        s = cls()
        in_r, s.stdin_w = os.pipe()
        s.stdout_r, out_w = os.pipe()
        s.stderr_r, err_w = os.pipe()
        s._child = [in_r, out_w, err_w]
        return s

    def child_fds(self) -> tuple[int, int, int]:
        return self._child[0], self._child[1], self._child[2]

    def close_child_fds(self) -> None:
        # The pipes only report EOF once no copy of the write ends is left in the agent.
        for fd in self._child:
            os.close(fd)
        self._child = []

    def _read(self, which: str, n: int) -> bytes:
        fd = getattr(self, which)
        if fd is None:
            raise EndOfStream()
        try:
            data = os.read(fd, max(1, n))
        except OSError as e:
            # A pty master reads EIO once the last slave fd is closed: that is its EOF.
            if e.errno not in (errno.EIO, errno.EBADF):
                raise
            data = b""
        if not data:
            self._close(which)  # at its end a stream's descriptor goes: an exec must not keep it
            raise EndOfStream()
        return data

    def _close(self, which: str) -> None:
        with self._lock:
            fd = getattr(self, which)
            setattr(self, which, None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def read_stdout(self, n: int) -> bytes:
        return self._read("tty_master" if self.tty_master is not None else "stdout_r", n)

    def read_stderr(self, n: int) -> bytes:
        # With a tty, stderr is merged into the terminal: it has no stream of its own.
        if self.tty_master is not None:
            raise EndOfStream()
        return self._read("stderr_r", n)

    def drained(self) -> bool:
        """Every output stream was read to its end (and its descriptor closed)."""
        return self.stdout_r is None and self.stderr_r is None and self.tty_master is None

    def write_stdin(self, data: bytes) -> int:
        fd = self.tty_master if self.tty_master is not None else self.stdin_w
        if fd is None:
            raise EndOfStream()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        return len(data)

    def close_stdin(self) -> None:
        if self.tty_master is not None:
            os.write(self.tty_master, _TTY_EOF)
            return
        with self._lock:
            fd, self.stdin_w = self.stdin_w, None
        if fd is not None:
            os.close(fd)

    def resize(self, rows: int, cols: int) -> None:
        import fcntl
        import struct
        import termios

        if self.tty_master is None:
            raise EndOfStream()
        fcntl.ioctl(self.tty_master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close(self) -> None:
        """Close every fd the agent holds (process removed)."""
        self.close_child_fds()
        with self._lock:
            fds = [self.stdin_w, self.stdout_r, self.stderr_r, self.tty_master]
            self.stdin_w = self.stdout_r = self.stderr_r = self.tty_master = None
        for fd in fds:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
