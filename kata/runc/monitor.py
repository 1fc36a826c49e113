"""The host process that stands for one container process in the guest (the pid in `--pid-file`).

Started by `kata-runtime create` (role "init"; "member" for a container created in the VM of its
pod's sandbox container) or `exec` (role "exec"). It lives exactly as long as
the guest process and exits with its status (128+N for a death by signal N, 255 when the VM is gone),
relays the process's stdio (the inherited descriptors, or a pty handed out on the console socket),
and forwards the signals it receives to the process. containerd's shim and Docker wait on it.

The init monitor also holds the sandbox's only agent connection (a virtio-serial port takes one
client) and forwards every other runtime call to it through a ttrpc proxy socket, which the monitors
of execs and of the pod's other containers connect to.

It is started as `python -S -m kata.runc.monitor` and imports no protobuf: there is one per container
process, so its memory counts for density. The parent sends its configuration as one JSON line on
the control socket (`--control-fd`) and reads back "ok" or "error <message>".
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import termios
import threading
import time
import tty
from typing import Any

from kata import ttrpc
from kata.agent_client import proxy, relay
from kata.agent_client.lite import LiteAgent
from kata.agent_client.ready import wait_ready
from kata.agent_client.transport import connect
from kata.protocols.agent_api import AgentEndpoint
from kata.sandbox.status import VM_GONE_STATUS, exit_status
from kata.utils import pidwatch
from kata.utils.sockets import listen_private, peer_pid
from kata.utils.text import one_line, thread_failure

# How long a detached monitor waits, at its exit, for the command that started it to exit (it does
# so right after it has written our pid), and how long after that, when the VM died under the
# process, before it exits (LauncherWatch).
LAUNCHER_TIMEOUT = 30.0
PID_FILE_GRACE = 0.5
# How long an init monitor waits, at its exit, for the proxy's clients that ended to be reaped.
PEERS_REAPED_TIMEOUT = 2.0

# runc forwards every signal but these to the container.
NOT_FORWARDED = {signal.SIGCHLD, signal.SIGWINCH, signal.SIGURG, signal.SIGKILL, signal.SIGSTOP,
                  signal.SIGPIPE, signal.SIGTTIN, signal.SIGTTOU, signal.SIGTSTP}


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def winsize(fd: int) -> tuple[int, int] | None:
    try:
        cols, rows = os.get_terminal_size(fd)
        return rows, cols
    except OSError:
        return None


class Monitor:
    def __init__(self, conf: dict[str, Any]) -> None:
        self.conf = conf
        self.cid: str = conf["cid"]
        self.exec_id: str = conf.get("exec_id", "")
        self.terminal = bool(conf.get("terminal"))
        self.agent: LiteAgent | None = None
        self.server: ttrpc.Server | None = None
        self.metrics: Any = None  # kata.metrics.endpoint.Endpoint, for an init monitor
        self.tty_fd: int | None = None  # the host pty's slave, or our own terminal in the foreground
        self.outputs: list[threading.Thread] = []
        # Signals to forward, one byte each: the handler only writes to this pipe (see below).
        self._signal_r, self._signal_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._signal_w, False)
        # Set once the container was started, or a signal could not reach it (its VM is gone).
        self.released = threading.Event()
        # Whether the agent told the process's end (not merely that it could not be waited for).
        self.ended = False
        # pidfds of the proxy's clients (exec monitors, commands), kept until their parents reap them.
        self._peers: list[int] = []
        self._peers_lock = threading.Lock()
        self._peers_closed = False

    # ---- bring-up --------------------------------------------------------------------------
    def connect(self) -> None:
        # The agent's own channel, or (an exec's or a pod member's monitor) the init monitor's proxy.
        endpoint = (AgentEndpoint(**self.conf["agent"]) if self.conf.get("agent")
                    else AgentEndpoint("serial", path=self.conf["proxy"]))
        self.agent = LiteAgent(ttrpc.Client(connect(endpoint, 10.0)))
        if self.conf.get("agent"):
            self._wait_ready(10.0)

    def _wait_ready(self, timeout: float) -> None:
        """The guest may take a moment to see the new host connection: a first request can be lost."""
        assert self.agent is not None
        wait_ready(self.agent.check, self.agent.client, timeout)

    def serve_proxy(self) -> None:
        """Forward every call on the proxy socket to the agent, as it is (kata.agent_client.proxy)."""
        assert self.agent is not None
        listener = listen_private(self.conf["proxy"], 64)
        self.server = proxy.forwarding_server(self.agent.client, self._seen)
        threading.Thread(target=self.server.serve_listener, args=(listener, self._peer), daemon=True).start()

    def _peer(self, sock: socket.socket) -> None:
        """Keep a pidfd of a new client; let go of those whose processes have been reaped. Our own
        parent (a foreground `run` that starts the container) is not kept: it waits for us."""
        pid = peer_pid(sock)
        try:
            fd = os.pidfd_open(pid) if pid is not None and pid != os.getppid() else None
        except OSError:
            fd = None  # gone already
        with self._peers_lock:
            if self._peers_closed:  # stopping: this connection is refused
                if fd is not None:
                    os.close(fd)
                return
            kept = []
            for old in self._peers:
                if pidwatch.reaped(old):
                    os.close(old)
                else:
                    kept.append(old)
            self._peers = kept if fd is None else [*kept, fd]

    def _seen(self, ctx: ttrpc.Context) -> None:
        if ctx.method == "StartContainer":
            self.released.set()

    def open_terminal(self) -> None:
        """A tty process: hand a host pty's master to the console socket and relay its slave, or,
        in the foreground, relay our own stdio (the caller's terminal)."""
        path = self.conf.get("console_socket")
        if not path:
            self.tty_fd = 0 if _fd_open(0) else None
            return
        master, slave = os.openpty()
        tty.setraw(slave)  # the guest's pty does the line discipline; this one must pass bytes through
        if not self.conf.get("foreground"):
            import fcntl

            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)  # so that a resize on the master signals us
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(10.0)
            sock.connect(path)
            socket.send_fds(sock, [os.ttyname(slave).encode()], [master])
        finally:
            sock.close()
            os.close(master)
        # The pty is the process's stdio now, as with runc: what we inherited must close, or a caller
        # that reads our parent's output to EOF (containerd's shim does) would wait for us forever.
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        self.tty_fd = slave

    def start_relay(self) -> None:
        if self.terminal:
            out = self.tty_fd if self.conf.get("console_socket") else 1
            targets = [("stdout", out)]
            stdin = self.tty_fd
        else:
            targets = [("stdout", 1), ("stderr", 2)]
            stdin = 0 if _fd_open(0) else None
        for stream, fd in targets:
            if fd is not None and _fd_open(fd):
                args = (self.agent, stream, self.cid, self.exec_id, fd)
                t = threading.Thread(target=relay.pump_out, args=args, daemon=True)
                t.start()
                self.outputs.append(t)
        if stdin is not None:
            args_in = (self.agent, self.cid, self.exec_id, stdin, self.terminal)
            threading.Thread(target=relay.pump_in, args=args_in, daemon=True).start()

    # ---- signals ---------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        # The handler only writes a byte to a pipe: an RPC must not run inside a signal handler, and
        # nor may a lock be taken there (a queue or a semaphore): a second signal that interrupts the
        # handler while it holds the lock would wait for it for ever, and the monitor with it.
        def queue(signum: int, _frame: Any) -> None:
            try:
                os.write(self._signal_w, bytes([signum]))
            except BlockingIOError:
                pass  # thousands unread: the process has been told already

        for s in signal.Signals:
            if s not in NOT_FORWARDED:
                try:
                    signal.signal(s, queue)
                except (OSError, ValueError):
                    pass
        if self.terminal:
            signal.signal(signal.SIGWINCH, queue)
        threading.Thread(target=self._forward_signals, daemon=True).start()

    def _forward_signals(self) -> None:
        assert self.agent is not None
        while True:
            try:
                signums = os.read(self._signal_r, 64)
            except InterruptedError:
                continue
            for signum in signums:
                self._forward(signum)

    def _forward(self, signum: int) -> None:
        assert self.agent is not None
        try:
            if signum == signal.SIGWINCH:
                self.resize()
            else:
                self.agent.signal(self.cid, self.exec_id, signum)
        except ttrpc.TTRPCError as exc:
            if exc.code == ttrpc.Code.UNAVAILABLE or self.agent.client.closed:
                self.released.set()  # nowhere to deliver it: the process is gone with its VM

    def resize(self) -> None:
        size = winsize(self.tty_fd) if self.tty_fd is not None else None
        if size and self.agent is not None:
            self.agent.resize(self.cid, self.exec_id, *size)

    # ---- the life of the process -----------------------------------------------------------
    def wait(self) -> int:
        """The process's exit status; VM_GONE_STATUS when it cannot be known."""
        assert self.agent is not None
        result: list[int] = []

        def waiter() -> None:
            try:
                result.append(self.agent.wait(self.cid, self.exec_id))  # type: ignore[union-attr]
                self.ended = True
            except ttrpc.TTRPCError:
                result.append(VM_GONE_STATUS)  # the agent is gone, or its answer made no sense
            except Exception as exc:  # noqa: BLE001 - a bug must not leave us without a status
                report(f"waiting for the process: {one_line(exc)}")
                result.append(VM_GONE_STATUS)

        w = threading.Thread(target=waiter, daemon=True)
        w.start()
        w.join()  # interrupted by a signal, which its handler queues, then waiting on: no wake-ups
        if self.conf["role"] == "init" and self.agent.client.closed:
            # The VM went before the container was started: like runc's init waiting on its exec
            # fifo, we stay until `start` (which fails) or a signal (`kill`, `delete --force`). A
            # caller that registers our pid only once create has returned (containerd's runc shim)
            # would otherwise miss our exit, and keep the task "created" for good.
            while not self.released.wait(0.5):
                pass
        for t in self.outputs:
            t.join(10.0)
        return result[0]

    def watch_vm(self) -> None:
        """The init monitor stands for the sandbox too. When its VMM or virtiofsd dies, the VM is
        gone (a guest whose shared filesystem died hangs on its next file access): the rest of it is
        killed (and waited for, at most 5 s), the agent connection ends, and every process of the
        container reads VM_GONE_STATUS instead of hanging."""
        procs = [(int(pid), int(start)) for pid, start in self.conf.get("vm", [])]

        def gone() -> None:
            pidwatch.kill_all(procs, signal.SIGKILL)
            if self.agent is not None:
                self.agent.client.close()

        pidwatch.watch(procs, gone)

    def serve_metrics(self) -> None:
        """The sandbox's Prometheus text on its socket (kata.metrics.sandbox, which the shim serves for a
        pod). prometheus-client is imported by the first scrape, from where the launcher found it."""
        conf = self.conf.get("metrics")
        if not conf:
            return
        from kata.metrics.sandbox import serve
        from kata.utils.process import ProcessId

        if conf.get("library") and conf["library"] not in sys.path:
            sys.path.append(conf["library"])  # after PYTHONPATH: our kata package stays the one used
        procs = {kind: [ProcessId(int(pid), int(start)) for pid, start in found]
                 for kind, found in conf.get("processes", {}).items()}
        try:
            self.metrics = serve(self.cid, procs, lambda: self.agent)
        except OSError as exc:  # the container runs without
            report(f"no metrics: {one_line(exc)}")

    def stop_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()

    def stop_proxy(self) -> None:
        if self.server is None:
            return
        # A pod's other containers (podman's pod members, in our VM) reach the agent through us, each
        # monitor on a connection of its own: while one runs, we stay, so that it ends as it would under
        # runc (podman stops a pod's containers all at once), not with the VM's channel. Its delete
        # takes it off the pod's record.
        while self._pod_members() and not self.server.wait_idle(0.5):
            pass
        # The exec monitors (connected through us) end and are reaped first, as a pid namespace's
        # init is reaped last: Docker 20.10 drops an exec whose exit comes after its container's, and
        # `docker exec` then waits for ever. Each goes at once, or once its launcher has. Processes
        # that outlive ours (a pid namespace the container shares: --pid=host) are killed, as
        # runc's shim kills what is left of a container whose init has exited.
        deadline = time.monotonic() + LAUNCHER_TIMEOUT + PID_FILE_GRACE + 1.0
        killed: set[str] = set()
        while not self.server.wait_idle(min(1.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                break
            self._kill_execs(killed)  # again each second: an exec being started is recorded late
        self.server.shutdown()
        with self._peers_lock:
            peers, self._peers, self._peers_closed = self._peers, [], True
        try:
            pidwatch.wait_reaped(peers, PEERS_REAPED_TIMEOUT)  # then the shim has seen their exits
        finally:
            for fd in peers:
                os.close(fd)
        try:
            os.unlink(self.conf["proxy"])
        except OSError:
            pass

    def _kill_execs(self, killed: set[str]) -> None:
        """SIGKILL the exec processes the container's record lists and ``killed`` does not, once
        the agent has told our own process's end (bounded read, short calls, never a failure: the
        VM may be gone, the processes too)."""
        if not self.ended or self.agent is None or self.agent.client.closed:
            return
        execs = {str(e) for e in self._record_field("record", "execs")} - killed
        agent = LiteAgent(self.agent.client, timeout=2.0)  # a stuck agent must not hold up our end
        for exec_id in execs:
            killed.add(exec_id)
            try:
                agent.signal(self.cid, exec_id, signal.SIGKILL)
            except ttrpc.TTRPCError:
                pass  # it ended already

    def _pod_members(self) -> bool:
        """Whether the pod's record lists containers other than ours."""
        return any(cid != self.cid for cid in self._record_field("pod_record", "limits"))

    def _record_field(self, conf_key: str, field: str) -> dict[str, Any]:
        """``field`` of the JSON record our configuration names at ``conf_key``, when it is a dict
        ({} otherwise). A bounded read: the records are ours, but a monitor must never hang or fail
        on one."""
        path = self.conf.get(conf_key)
        if not path:
            return {}
        try:
            with open(path, "rb") as f:
                value = json.loads(f.read(1 << 20)).get(field)
        except (OSError, ValueError, AttributeError):
            return {}
        return value if isinstance(value, dict) else {}


class LauncherWatch:
    """Holds a detached monitor's exit until the command that started it has exited, and a moment
    more. Containerd's runc shim (1.6) learns our pid from the pid file that command writes, once
    it has exited; an exit the shim reaps before that matches no process and is dropped, and the
    task or exec then waits forever. A process in a VM that died can end within milliseconds of
    starting, so this is not rare here. The command's end of the control socket closes when it
    exits (kata.runc.monitor_launch keeps it open till then)."""

    def __init__(self, control: socket.socket) -> None:
        self._control = control
        self._closed_at: float | None = None
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            while self._control.recv(64):
                pass
        except OSError:
            pass
        self._closed_at = time.monotonic()

    def outlive(self, grace: float) -> None:
        """Return once the launcher has been gone for ``grace`` seconds (or LAUNCHER_TIMEOUT passed)."""
        self._thread.join(LAUNCHER_TIMEOUT)
        if self._closed_at is not None:
            time.sleep(max(0.0, self._closed_at + grace - time.monotonic()))
        self._control.close()


def report(text: str) -> None:
    """One line on our stderr (the container's, unless it has a terminal): never a traceback."""
    try:
        os.write(2, f"kata-monitor: {text}\n".encode(errors="replace"))
    except OSError:
        pass


def _thread_died(args: threading.ExceptHookArgs) -> None:
    failure = thread_failure(args)
    if failure is not None:
        report(failure)


def _reply(control: socket.socket, text: str) -> None:
    try:
        control.sendall(text.encode() + b"\n")
    except OSError:
        pass  # the parent gave up waiting; our exit status still tells


def run(control: socket.socket) -> int:
    line = control.makefile("rb").readline()
    if not line:
        return 0  # started ahead of time, then not needed: the create failed
    conf = json.loads(line)
    mon = Monitor(conf)
    try:
        try:
            _bring_up(mon, conf)
        except Exception as exc:  # everything the parent must report: one line
            _reply(control, f"error {one_line(exc)}")
            return VM_GONE_STATUS
        _reply(control, "ok")
        if conf.get("foreground"):
            control.close()  # our launcher waits for our exit: nothing to wait for in return
            return mon.wait()
        launcher = LauncherWatch(control)
        status = mon.wait()
        # A process that ended on its own took long enough for the launcher's caller to have our
        # pid; one whose VM died may end at once, so there the caller gets a moment more.
        launcher.outlive(PID_FILE_GRACE if status == VM_GONE_STATUS else 0.0)
        return status
    finally:
        mon.stop_metrics()
        mon.stop_proxy()


def _bring_up(mon: Monitor, conf: dict[str, Any]) -> None:
    if conf.get("foreground"):
        # Our own process group, in the terminal's foreground: a Ctrl-C reaches us once (we
        # forward it), not also our caller (which would forward it a second time).
        os.setpgid(0, 0)
        if os.isatty(0):
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            os.tcsetpgrp(0, os.getpgrp())
            signal.signal(signal.SIGTTOU, signal.SIG_DFL)
    else:
        os.setsid()  # detached from the caller's terminal and session
    mon.connect()
    assert mon.agent is not None
    if conf["role"] == "init":
        mon.serve_proxy()
        mon.watch_vm()
        mon.serve_metrics()
    if mon.terminal:
        mon.open_terminal()
    if conf["role"] == "exec":
        mon.agent.exec_process(mon.cid, mon.exec_id, json.dumps(conf["process"]).encode())
    mon.install_signal_handlers()
    mon.start_relay()
    if mon.terminal and conf.get("foreground"):
        mon.resize()


def main() -> None:
    # argv: --control-fd N -- LABEL... (the label only tells `ps` readers what this stands for)
    threading.excepthook = _thread_died
    try:
        status = run(socket.socket(fileno=int(sys.argv[2])))
    except BaseException as exc:  # noqa: BLE001 - whatever happened, one line and a status that says "unknown"
        report(one_line(exc))
        status = VM_GONE_STATUS
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    os._exit(exit_status(status))


if __name__ == "__main__":
    main()
