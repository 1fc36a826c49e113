"""The debug console (Kata's debug_console_enabled): a root shell in the guest, on a channel of
its own, for the operator's `kata-runtime debug-console`.

One session at a time. When the host connects, it sends OPEN (its terminal's size, whether it is
one); the shell then runs on a new pty (on pipes, for a piped session), in the guest's root
namespaces as the agent (PID 1) is, and this thread relays between the channel and the shell in frames
(:mod:`kata.protocols.debug_console`). When the shell exits, its status goes to the host; when the
host goes, every process of the shell's session gets SIGHUP, the shell SIGKILL after a grace, and
the port waits for the next host. Its own thread, with bounded buffers, never the agent channel's.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable

from kata.guest.agent import log
from kata.guest.agent.reaper import Exit, Reaper
from kata.protocols import debug_console as proto

# Each direction holds at most this much that its reader has not taken yet; past it, the other
# side is not read until it drains (a shell that prints without end waits for the host).
BUFFER_LIMIT = 64 * 1024
READ_CHUNK = 16 * 1024
# How long the host has to send OPEN once it connects, and to take the last output at the end.
OPEN_TIMEOUT = 10.0
FLUSH_TIMEOUT = 5.0
# How long the shell has after SIGHUP before SIGKILL.
HANGUP_GRACE = 1.0
# Without SIGIO, how often to look for a host; with it, the safety net behind the signal.
IDLE_POLL = 2.0
# A session looks at its shell's exit this often (a background job may keep the pty open after it).
EXIT_POLL = 0.5
SHELLS = ("/bin/bash", "/bin/sh")
# busybox's setsid -c makes the pty the shell's controlling terminal (posix_spawn cannot), which
# job control and ^C need.
SETSID = ("/bin/busybox", "setsid", "-c")
_TTY_EOF = b"\x04"


def start(reaper: Reaper, vsock_port: int | None) -> None:
    """Serve the console on a thread: on vsock ``vsock_port``, else on its virtio-serial port."""
    from kata.guest.agent import sigio

    sigio.install()  # only the main thread can; the console's thread registers its port later
    target: Callable[[], None] = ((lambda: _serve_vsock(reaper, vsock_port)) if vsock_port is not None
                                  else (lambda: _serve_serial(reaper)))

    def run() -> None:
        try:
            target()
        except Exception as e:  # noqa: BLE001 - the agent serves on without its console
            log.warn(f"debug console stopped: {e}")

    threading.Thread(target=run, name="debug-console", daemon=True).start()


def _serve_serial(reaper: Reaper, wait_port: float = 10.0) -> None:
    from kata.guest.agent import sigio
    from kata.guest.agent.channel import find_serial_port

    deadline = time.monotonic() + wait_port
    while (path := find_serial_port(proto.SERIAL_PORT_NAME)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no virtio-serial port named {proto.SERIAL_PORT_NAME}")
        time.sleep(0.05)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    wake = sigio.watch(fd)
    log.info(f"debug console on virtio-serial {path}")
    while True:
        # The port reports POLLHUP while no host is connected: wait for the SIGIO of its arrival.
        while _port_hung_up(fd):
            if wake is None:
                time.sleep(0.1)
                continue
            select.select([wake], [], [], IDLE_POLL)
            sigio.drain(wake)
        Session(fd, reaper).run()
        # Host-side output of a session that ended is not the next one's: wait for this host to go.
        _wait_hangup(fd)


def _serve_vsock(reaper: Reaper, port: int) -> None:
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, port))
    listener.listen(1)
    log.info(f"debug console on vsock port {port}")
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.setblocking(False)
            Session(conn.fileno(), reaper).run()


def _port_hung_up(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in p.poll(0))


def _wait_hangup(fd: int) -> None:
    p = select.poll()
    p.register(fd, select.POLLIN)
    while True:
        events = p.poll(None)
        if any(ev & (select.POLLHUP | select.POLLERR) for _, ev in events):
            return
        try:
            if not os.read(fd, READ_CHUNK):
                return
        except BlockingIOError:
            pass


def _session_members(sid: int, proc: str = "/proc") -> list[int]:
    """The pids whose session is ``sid``."""
    found = []
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(f"{proc}/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the name: state, ppid, pgrp, session (stat's fields 3 to 6).
        if len(fields) > 3 and int(fields[3]) == sid:
            found.append(int(name))
    return found


class Session:
    """One host's shell: relay between ``chan`` (non-blocking) and the shell until either side ends.

    On a terminal (the host's OPEN says so) the shell runs on a pty; piped, on pipes (stdout and
    stderr on one), as a script's shell would: no prompts, no echo, and the end of the host's input
    closes the shell's."""

    def __init__(self, chan: int, reaper: Reaper) -> None:
        self.chan = chan
        self.reaper = reaper
        self.decoder = proto.Decoder(proto.HOST_KINDS)
        self.to_chan = bytearray()
        self.to_shell = bytearray()
        self.tty: int | None = None  # the pty master: the shell's input and output both
        self.shell_out: int | None = None  # what the shell writes (the master, or a pipe)
        self.shell_in: int | None = None  # what it reads (the master, or a pipe)
        self.input_ended = False
        self.shell: Exit | None = None
        self.host_gone = False

    def run(self) -> None:
        try:
            opened = self._await_open()
            if opened is None:
                return
            self._start_shell(*opened)
            self._relay()
        except (OSError, proto.ProtocolError) as e:
            log.warn(f"debug console session: {e}")
        finally:
            self._end()

    # ---- the session's steps ----------------------------------------------------------------
    def _await_open(self) -> tuple[int, int, bool, str] | None:
        deadline = time.monotonic() + OPEN_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            if not self._wait(self.chan, select.POLLIN, left):
                return None
            data = self._read_chan()
            if data is None:
                return None
            for kind, payload in self.decoder.feed(data):
                if kind != proto.OPEN:
                    raise proto.ProtocolError(f"the session began with frame {kind!r}, not OPEN")
                return proto.parse_open(payload)
        return None

    def _start_shell(self, rows: int, cols: int, tty: bool, term: str) -> None:
        shell = next((s for s in SHELLS if os.access(s, os.X_OK)), None)
        if shell is None or (tty and not os.access(SETSID[0], os.X_OK)):
            raise OSError(errno.ENOENT, "the guest has no shell (or no busybox for setsid)")
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": "/"}
        if tty:
            master, slave = os.openpty()
            try:
                _set_size(master, rows, cols)
                self.shell = self.reaper.spawn([*SETSID, shell], stdin=slave, stdout=slave, stderr=slave,
                                               env={**env, "TERM": term or "vt100"})
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            self.tty = self.shell_out = self.shell_in = master
        else:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            try:
                # A session of its own all the same, so that its end finds every process it left.
                self.shell = self.reaper.spawn([shell], stdin=in_r, stdout=out_w, stderr=out_w, env=env,
                                               setsid=True)
            except BaseException:
                os.close(in_w)
                os.close(out_r)
                raise
            finally:
                os.close(in_r)
                os.close(out_w)
            self.shell_in, self.shell_out = in_w, out_r
        for fd in {self.shell_in, self.shell_out}:
            os.set_blocking(fd, False)
        self.to_chan += proto.frame(proto.STARTED)
        log.info(f"debug console: shell {self.shell.pid} started")

    def _relay(self) -> None:
        assert self.shell is not None
        while not self.host_gone:
            if self.shell_out is None and self.shell.done():
                break  # its output is drained and the shell gone: report its status
            events: dict[int, int] = {
                self.chan: (select.POLLIN if len(self.to_shell) < BUFFER_LIMIT else 0)
                | (select.POLLOUT if self.to_chan else 0)}
            if self.shell_out is not None and len(self.to_chan) < BUFFER_LIMIT:
                events[self.shell_out] = events.get(self.shell_out, 0) | select.POLLIN
            if self.shell_in is not None and self.to_shell:
                events[self.shell_in] = events.get(self.shell_in, 0) | select.POLLOUT
            p = select.poll()
            for fd, ev in events.items():
                p.register(fd, ev)
            # With the shell's output closed, only its exit is awaited: look at it often.
            for fd, ev in p.poll((EXIT_POLL if self.shell_out is not None else 0.02) * 1000):
                if fd == self.chan:
                    self._on_chan(ev)
                    continue
                if fd == self.shell_in and ev & (select.POLLOUT | select.POLLERR):
                    self._write_shell()
                if fd == self.shell_out and ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self._read_shell()
            if self.shell_out is not None and self.shell.done() and not self._readable(self.shell_out):
                # The shell is gone but something it left keeps its output open: the session is over.
                self._close_shell_fds()
        if self.host_gone:
            return
        self.to_chan += proto.exited_frame(self.shell.wait(HANGUP_GRACE) or 0)
        self._flush_chan(FLUSH_TIMEOUT)

    def _on_chan(self, ev: int) -> None:
        if ev & select.POLLOUT:
            self._write_chan()
        if ev & select.POLLIN:
            data = self._read_chan()
            if data is None:
                self.host_gone = True
                return
            for kind, payload in self.decoder.feed(data):
                self._on_frame(kind, payload)
        elif ev & (select.POLLHUP | select.POLLERR):
            self.host_gone = True

    def _on_frame(self, kind: bytes, payload: bytes) -> None:
        if kind == proto.DATA:
            if not self.input_ended:
                self.to_shell += payload
        elif kind == proto.RESIZE:
            if self.tty is not None:
                _set_size(self.tty, *proto.parse_resize(payload))
        elif kind == proto.EOF:
            if self.tty is not None:
                self.to_shell += _TTY_EOF  # the terminal's end of file, as a typed ^D
            else:
                self.input_ended = True
                self._write_shell()
        elif kind == proto.OPEN:
            raise proto.ProtocolError("a second OPEN frame")

    def _write_shell(self) -> None:
        if self.shell_in is None:
            self.to_shell.clear()
            return
        try:
            if self.to_shell:
                del self.to_shell[:os.write(self.shell_in, self.to_shell)]
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno not in (errno.EIO, errno.EPIPE):
                raise
            self.to_shell.clear()  # nobody reads the shell's input any more
        if self.input_ended and not self.to_shell and self.tty is None:
            os.close(self.shell_in)
            self.shell_in = None

    def _read_shell(self) -> None:
        assert self.shell_out is not None
        try:
            data = os.read(self.shell_out, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EIO:  # EIO: the last holder of the pty's other side closed it
                raise
            data = b""
        if data:
            self.to_chan += proto.data_frames(data)
        else:
            self._close_shell_fds()

    def _end(self) -> None:
        """Leave nothing of the session: its processes are hung up, and the shell killed if it stays."""
        self._close_shell_fds(also_input=True)
        shell = self.shell
        if shell is None:
            return
        # What the shell left running in its session (a job in the background) goes with it.
        for pid in _session_members(shell.pid):
            _kill(pid, signal.SIGHUP)
            _kill(pid, signal.SIGCONT)
        if not shell.done():
            if shell.wait(HANGUP_GRACE) is None:
                _kill(shell.pid, signal.SIGKILL)
                shell.wait(HANGUP_GRACE)
            log.info(f"debug console: shell {shell.pid} ended with its host")

    # ---- descriptors ----------------------------------------------------------------------------
    def _read_chan(self) -> bytes | None:
        """What the host sent; None once it has gone (a port reads EOF while no host is connected)."""
        try:
            data = os.read(self.chan, READ_CHUNK)
        except BlockingIOError:
            return b""
        except OSError as e:
            if e.errno in (errno.ECONNRESET, errno.EPIPE):
                return None
            raise
        return data or None

    def _write_chan(self) -> None:
        try:
            del self.to_chan[:os.write(self.chan, self.to_chan)]
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EIO, errno.ENODEV):
                raise
            self.host_gone = True

    def _flush_chan(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.to_chan and not self.host_gone and (left := deadline - time.monotonic()) > 0:
            if self._wait(self.chan, select.POLLOUT, left):
                self._write_chan()

    def _wait(self, fd: int, events: int, timeout: float) -> bool:
        """``fd`` is ready for ``events`` within ``timeout``; False (host_gone set) on a hang-up."""
        p = select.poll()
        p.register(fd, events)
        for _, ev in p.poll(timeout * 1000):
            if ev & (select.POLLHUP | select.POLLERR) and not ev & events:
                self.host_gone = True
                return False
            return True
        return True

    @staticmethod
    def _readable(fd: int) -> bool:
        p = select.poll()
        p.register(fd, select.POLLIN)
        return any(ev & select.POLLIN for _, ev in p.poll(0))

    def _close_shell_fds(self, also_input: bool = False) -> None:
        """The shell's output is done with (for a pty, its input too: one descriptor)."""
        fds = {self.shell_out}
        self.shell_out = None
        if self.tty is not None or also_input:
            fds.add(self.shell_in)
            self.shell_in = self.tty = None
        for fd in fds:
            if fd is not None:
                os.close(fd)


def _set_size(fd: int, rows: int, cols: int) -> None:
    if rows and cols:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
