"""The debug console (Kata's debug_console_enabled): a root shell in the guest, on a channel of
its own, for the operator's `kata-runtime debug-console`.

One session at a time. When the host connects, it sends OPEN (its terminal's size, whether it is
one); the shell then runs on a new pty, in the guest's root namespaces as the agent (PID 1) is, and
this thread relays between the channel and the pty master in frames
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
        if len(fields) > 4 and int(fields[4]) == sid:  # field 6, session, counted after the name
            found.append(int(name))
    return found


class Session:
    """One host's shell: relay between ``chan`` (non-blocking) and a pty until either side ends."""

    def __init__(self, chan: int, reaper: Reaper) -> None:
        self.chan = chan
        self.reaper = reaper
        self.decoder = proto.Decoder(proto.HOST_KINDS)
        self.to_chan = bytearray()
        self.to_pty = bytearray()
        self.master: int | None = None
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

    def _start_shell(self, rows: int, cols: int, echo: bool, term: str) -> None:
        master, slave = os.openpty()
        try:
            _set_size(master, rows, cols)
            if not echo:
                # Piped: no echo of the input, and newlines as they are, as a script expects.
                attrs = termios.tcgetattr(slave)
                attrs[1] &= ~termios.ONLCR
                attrs[3] &= ~(termios.ECHO | termios.ECHONL)
                termios.tcsetattr(slave, termios.TCSANOW, attrs)
            env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": "/",
                   "TERM": term or "vt100"}
            if not echo:
                env.update(PS1="", PS2="")
            shell = next((s for s in SHELLS if os.access(s, os.X_OK)), None)
            if shell is None or not os.access(SETSID[0], os.X_OK):
                raise OSError(errno.ENOENT, "the guest has no shell (or no busybox for setsid)")
            self.shell = self.reaper.spawn([*SETSID, shell], stdin=slave, stdout=slave, stderr=slave, env=env)
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        self.to_chan += proto.frame(proto.STARTED)
        log.info(f"debug console: shell {self.shell.pid} started")

    def _relay(self) -> None:
        assert self.shell is not None
        while not self.host_gone:
            if self.master is None and self.shell.done():
                break  # the pty is drained and the shell gone: report its status
            p = select.poll()
            p.register(self.chan, (select.POLLIN if len(self.to_pty) < BUFFER_LIMIT else 0)
                       | (select.POLLOUT if self.to_chan else 0))
            if self.master is not None:
                p.register(self.master, (select.POLLIN if len(self.to_chan) < BUFFER_LIMIT else 0)
                           | (select.POLLOUT if self.to_pty else 0))
            # With the pty closed, only the shell's exit is awaited: look at it often.
            for fd, ev in p.poll((EXIT_POLL if self.master is not None else 0.02) * 1000):
                if fd == self.chan:
                    self._on_chan(ev)
                elif fd == self.master:
                    self._on_master(ev)
            if self.master is not None and self.shell.done() and not self._readable(self.master):
                # The shell is gone but something it left keeps the pty open: the session is over.
                self._close_master()
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
            self.to_pty += payload
        elif kind == proto.RESIZE and self.master is not None:
            _set_size(self.master, *proto.parse_resize(payload))
        elif kind == proto.EOF:
            self.to_pty += _TTY_EOF
        elif kind == proto.OPEN:
            raise proto.ProtocolError("a second OPEN frame")

    def _on_master(self, ev: int) -> None:
        assert self.master is not None
        if ev & select.POLLOUT and self.to_pty:
            try:
                del self.to_pty[:os.write(self.master, self.to_pty)]
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                self.to_pty.clear()  # nobody holds the pty's other side to read it
        if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
            try:
                data = os.read(self.master, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != errno.EIO:  # EIO: the last holder of the pty's other side closed it
                    raise
                data = b""
            if data:
                self.to_chan += proto.data_frames(data)
            else:
                self._close_master()

    def _end(self) -> None:
        """Leave nothing of the session: the shell and its session are hung up, then killed."""
        self._close_master()
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
        return bool(p.poll(0))

    def _close_master(self) -> None:
        if self.master is not None:
            os.close(self.master)
            self.master = None


def _set_size(fd: int, rows: int, cols: int) -> None:
    if rows and cols:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
