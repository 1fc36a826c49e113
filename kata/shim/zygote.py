"""The shim zygote: one process with the shim's code loaded that forks each new pod's shim.

A shim is a Python process; about 10 MB of what it holds is the code it imports (protobuf's
descriptors, the sandbox service, the hypervisor and network modules), and importing it takes about
0.1 s in a new interpreter. Forked from a process that has it all loaded (and frozen out of the
garbage collector's reach, so that the child does not write to those pages), a shim shares those
pages with every other shim and starts serving at once.

`containerd-shim-kata-v2 start` asks the zygote first (`fork_shim`). The zygote makes the shim only
for a caller it cannot tell apart from itself by what the kernel shows (`process_context`: the
namespaces, cgroups, credentials, limits, scheduling, LSM labels...) and by the environment read at
import time, only while its code is still the installed one, and only for a pod whose configuration
keeps `shim_zygote` on; otherwise, or when no zygote runs, `start` forks the shim itself, as before,
and starts a zygote (`launch`) for the pods after it. A zygote that cannot serve a caller, or whose
code was replaced, ends, so that `start` starts a fresh one. The shim it makes (forked twice: not
its child) sets itself up, reports its pid, and serves only once `start`, holding that pid, says
so over a pipe only the two of them hold: whatever goes wrong on the way (a zygote that dies or
hangs, a shim that fails to set up, a `start` that gives up), `start` either has a serving shim or
forks its own, never both. The zygote ends after IDLE_EXIT seconds without making a shim, and after
MAX_FORKS shims (each zygote's shims share its address-space layout and Python's hash secret).

    python -m kata.shim.zygote [--idle S]    # one by hand, in the foreground (`launch` runs it
                                             # in a child of its own, in a session of its own)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from kata.utils.files import lock_held, pid_lock
from kata.utils.process import null_stdio
from kata.utils.procfs import stat_fields
from kata.utils.sockets import listen_private, peer_creds

RUN_DIR = Path("/run/kata-containers")
SOCKET = RUN_DIR / "shim-zygote.sock"
LOCK = RUN_DIR / "shim-zygote.lock"
# With no shim made for this long the zygote ends (its pages stay shared by the shims it made).
IDLE_EXIT = 600.0
# Shims forked by one zygote share its memory layout, stack canary and hash secret: after this many
# it ends, and the next `start` starts another.
MAX_FORKS = 32
# How long `start` waits for the zygote's answer before it forks the shim itself.
ASK_TIMEOUT = 2.0
MAX_REQUEST = 256 * 1024
# The word `start` writes to the shim it was told about: serve.
GO = b"go"

# What a pod's shim loads over its life, loaded before the zygote forks (module names; a test
# checks that each imports).
PRELOAD = (
    "kata.shim.command", "kata.shim.serve", "kata.shim.metrics", "kata.shim.oom", "kata.shim.rootfs",
    "kata.shim.stdio", "kata.shim.process",
    "kata.sandbox.sandbox", "kata.sandbox.container", "kata.sandbox.network", "kata.sandbox.portforward",
    "kata.sandbox.host_cgroups", "kata.sandbox.vm", "kata.sandbox.status",
    "kata.hypervisor.qemu", "kata.hypervisor.qmp", "kata.hypervisor.vsock", "kata.hypervisor.accel",
    "kata.agent_client.client", "kata.agent_client.relay", "kata.fs_share.virtiofsd",
    "kata.factory.template", "kata.factory.pool_client",
    "kata.network.endpoints", "kata.network.tcfilter", "kata.network.loopback_redirect",
    "kata.oci.hooks", "kata.oci.seccomp_bpf", "kata.oci.sysctls",
    "kata.metrics.sandbox", "kata.metrics.endpoint", "kata.cgroups.host",
    "kata.utils.rtnetlink", "kata.utils.pidwatch",
    "kata.protocols.cgroups.stats.v1.metrics_pb2",
)  # fmt: skip

_NAMESPACES = ("mnt", "net", "pid", "pid_for_children", "ipc", "uts", "user", "cgroup", "time",
               "time_for_children")
# /proc/<pid>/status lines, and /proc/<pid> files, that must match between the zygote and its caller.
_STATUS_KEYS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
                "Seccomp", "Seccomp_filters", "SigBlk", "SigIgn", "Umask", "THP_enabled",
                "Speculation_Store_Bypass", "SpeculationIndirectBranch", "Cpus_allowed_list",
                "Mems_allowed_list")
_FILES = ("cgroup", "limits", "oom_score_adj")
# ... where the kernel has them (audit, an LSM).
_OPTIONAL_FILES = ("loginuid", "sessionid", "personality", "timerslack_ns", "coredump_filter",
                   "attr/current", "attr/exec", "attr/fscreate", "attr/keycreate", "attr/sockcreate")
# Environment variables read while modules are imported (the state roots, the interpreter's, the
# locale's): a shim forked by the zygote has the zygote's reading of them.
_IMPORT_TIME_PREFIXES = ("KATA_", "PYTHON", "LC_", "PROTOCOL_BUFFERS_")
_IMPORT_TIME_NAMES = ("LANG", "LANGUAGE", "TZ")
_SYS_IOPRIO_GET = {"x86_64": 252, "aarch64": 31}
_IOPRIO_WHO_PROCESS = 1


def process_context(pid: int) -> dict[str, str]:
    """What a process passes on to a child it forks, apart from its memory, environment, working
    directory and descriptors, as far as the kernel shows it (not: securebits, a Landlock domain,
    keyrings). OSError if the process is gone."""
    proc = f"/proc/{pid}"
    found: dict[str, str] = {}
    for ns in _NAMESPACES:
        try:
            found[f"ns/{ns}"] = os.readlink(f"{proc}/ns/{ns}")
        except FileNotFoundError:
            found[f"ns/{ns}"] = ""  # a kernel without this namespace kind
    found["root"] = os.readlink(f"{proc}/root")
    for name in _FILES:
        found[name] = _read(f"{proc}/{name}")
    for name in _OPTIONAL_FILES:
        try:
            found[name] = _read(f"{proc}/{name}")
        except OSError:
            found[name] = ""
    status = {}
    for line in _read(f"{proc}/status").splitlines():
        key, _, value = line.partition(":")
        if key in _STATUS_KEYS:
            status[key] = value.strip()
    found.update({f"status/{k}": status.get(k, "") for k in _STATUS_KEYS})
    found["nice"] = str(os.getpriority(os.PRIO_PROCESS, pid))
    found["sched"] = f"{os.sched_getscheduler(pid)} {os.sched_getparam(pid).sched_priority}"
    found["ioprio"] = str(_ioprio(pid))
    return found


def _ioprio(pid: int) -> int | None:
    number = _SYS_IOPRIO_GET.get(os.uname().machine)
    if number is None:
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.syscall(ctypes.c_long(number), ctypes.c_int(_IOPRIO_WHO_PROCESS), ctypes.c_int(pid)))


def import_time_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of an environment that modules read as they are imported (KATA_CONF_FILE is not:
    each shim reads it when its pod's task is created)."""
    return {k: v for k, v in env.items()
            if (k.startswith(_IMPORT_TIME_PREFIXES) or k in _IMPORT_TIME_NAMES) and k != "KATA_CONF_FILE"}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def code_stamp() -> dict[str, Any]:
    """The interpreter and every module file of the package, by inode, size and times: a zygote
    whose code was replaced (an upgrade, an edit) must not make another shim."""
    import kata

    def stamp(st: os.stat_result) -> tuple[int, int, int, int]:
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    root = Path(kata.__file__).parent
    files = {str(path.relative_to(root)): stamp(path.stat()) for path in sorted(root.rglob("*.py"))}
    return {"python": (sys.executable, stamp(os.stat(sys.executable))), "files": files}


# --- the caller: `containerd-shim-kata-v2 start` ---


def ask(request: dict[str, Any], fds: list[int], path: Path = SOCKET,
        timeout: float = ASK_TIMEOUT) -> dict[str, Any] | None:
    """One request with its descriptors; the zygote's answer, or None when there was none (no
    zygote, one ending, a reset, a timeout, a malformed answer)."""
    data = json.dumps(request).encode()
    if len(data) > MAX_REQUEST:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(str(path))
            socket.send_fds(conn, [data], fds)
            data = conn.recv(MAX_REQUEST)
            answer = json.loads(data) if data else None
        except (OSError, ValueError):
            return None
    return answer if isinstance(answer, dict) else None


def fork_shim(cmdline: list[str], argv: list[str], bundle: Path, listener: socket.socket,
              path: Path = SOCKET, timeout: float = ASK_TIMEOUT) -> int | None:
    """The pid of the pod's shim, forked by the zygote to serve ``listener`` as the shim `start`
    would fork (parsing ``argv``, showing ``cmdline``, this process's environment, in ``bundle``)
    and serving from the moment this returns; None when no shim of the zygote's will serve (then
    `start` forks its own)."""
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            request = {"cmdline": cmdline, "argv": argv, "env": dict(os.environ), "cwd": str(bundle)}
            answer = ask(request, [listener.fileno(), go_r], path, timeout)
        finally:
            os.close(go_r)
        pid = answer.get("pid") if answer else None
        if type(pid) is not int or pid <= 0:
            return None
        try:
            os.write(go_w, GO)
        except OSError:
            return None  # the shim is gone already (EPIPE)
        return pid
    finally:
        os.close(go_w)  # a shim that got no GO reads the end of the pipe and ends


def is_running(path: Path = SOCKET, lock: Path = LOCK) -> bool:
    """Whether a zygote answers at ``path``, or one holds the lock (it is loading): a full queue
    (a zygote that stopped taking requests) counts as running, and never blocks the caller."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as conn:
        conn.settimeout(0.2)
        try:
            conn.connect(str(path))
            return True
        except (BlockingIOError, TimeoutError):
            return True
        except OSError:
            pass
    return lock_held(lock)


def launch(config_file: str | None) -> None:
    """Start a zygote for the pods after this one, if none runs and the configuration a pod's shim
    loads (``config_file``, or the one in effect) wants one. Returns at once: a child of this
    process (`start`, which is about to end) becomes the zygote in a session of its own, in this
    process's context but for its scheduling policy, which stays SCHED_IDLE until its code is
    loaded (its first pod is on its way up meanwhile). Never fails: the pod has its shim."""
    try:
        if is_running() or os.fork() > 0:
            return
    except OSError:
        return
    try:
        null_stdio()  # `start`'s output is containerd's to read to its end
        os.setsid()
        os.chdir("/")  # not the first pod's bundle, for its whole life
        policy = f"{os.sched_getscheduler(0)},{os.sched_getparam(0).sched_priority}"
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        if enabled(config_file, os.environ):
            # -P: no directory of the caller's on the module path.
            os.execv(sys.executable, [sys.executable, "-P", "-m", "kata.shim.zygote", "--policy", policy,
                                      "--room", " " * ROOM])
    except BaseException:  # noqa: BLE001 - nothing to report to: start's output is closed
        pass
    finally:
        os._exit(0)


def enabled(config_file: str | None, env: Mapping[str, str]) -> bool:
    """Whether the configuration a pod's shim will load (``config_file``, else as ``env`` and the
    system paths find it) has the zygote on; KataError if it cannot be loaded."""
    from kata.config import load_config

    return load_config(Path(config_file) if config_file else None, env=env).runtime.shim_zygote


def stop(lock: Path = LOCK, timeout: float = 10.0) -> int | None:
    """End the running zygote (its pid is in its lock file); its pid, or None if none runs."""
    import fcntl

    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        deadline = time.monotonic() + timeout
        pid = 0
        while time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return pid or None  # free: it ended, or none held it
            except OSError:
                pass
            # Read again each time: empty while a zygote writes it, and a new zygote may have
            # replaced the one signalled. Only a process that is a zygote is signalled.
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if text.isdigit() and int(text) != pid and _is_zygote(int(text)):
                pid = int(text)
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        raise OSError(f"the shim zygote (pid {pid or '?'}) did not end within {timeout:g}s")
    finally:
        os.close(fd)


def _is_zygote(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"\0kata.shim.zygote\0" in f.read()
    except OSError:
        return False


# --- the zygote ---


class Decline(Exception):
    """A request the zygote does not serve; ``end``: the zygote ends after answering."""

    def __init__(self, reason: str, end: bool = False) -> None:
        super().__init__(reason)
        self.end = end


@dataclasses.dataclass(frozen=True)
class Request:
    cmdline: list[str]  # what the shim's /proc/PID/cmdline shows
    argv: list[str]  # what it parses
    env: dict[str, str]
    cwd: str
    comm: str  # the caller's /proc/PID/comm

    @classmethod
    def parse(cls, data: bytes, comm: str) -> Request:
        request = json.loads(data)
        if not isinstance(request, dict):
            raise Decline("malformed request")
        cmdline, argv = _strings(request.get("cmdline")), _strings(request.get("argv"))
        env, cwd = request.get("env"), request.get("cwd")
        if not (cmdline and argv and isinstance(cwd, str) and isinstance(env, dict)
                and all(isinstance(k, str) and k and "=" not in k and "\0" not in k
                        and isinstance(v, str) and "\0" not in v for k, v in env.items())):
            raise Decline("malformed request")
        return cls(cmdline, argv, env, cwd, comm)


class Zygote:
    def __init__(self, server: socket.socket, path: Path, wake_fd: int, stamp: dict[str, Any],
                 lock: int | None = None) -> None:
        self.server = server
        self.path = path
        self.lock = lock  # held for the zygote's life; released by end()
        self.ended = False
        self.wake_fd = wake_fd  # readable when a signal asks the zygote to end
        self.stamp = stamp
        self.env = import_time_env(os.environ)
        self.forks = 0

    def serve(self, idle: float = IDLE_EXIT) -> None:
        """Take requests one at a time (the zygote stays single-threaded: it forks) until it has
        made no shim for ``idle`` seconds, has made MAX_FORKS, is asked to end or must end."""
        last = time.monotonic()
        while self.forks < MAX_FORKS:
            left = last + idle - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.server.fileno(), self.wake_fd], [], [], left)
            if self.wake_fd in ready:
                return
            if not ready:
                continue
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            with conn:
                outcome = self.handle(conn)
            if outcome == "forked":
                last = time.monotonic()
            elif outcome == "end":
                return

    def handle(self, conn: socket.socket) -> str:
        """One request: "forked", "declined", or "end" (declined, and the zygote must end; its
        socket is gone before the answer, so the caller can start another at once)."""
        fds: list[int] = []
        try:
            try:
                conn.settimeout(ASK_TIMEOUT)
                request = self._check(conn, fds)
                shim = self._fork(request, fds, conn)
            except Decline as d:
                if d.end:
                    # Gone before the answer: the caller's `start` finds no zygote, neither
                    # listening nor holding the lock, and starts a fresh one at once.
                    self.end()
                _answer(conn, {"declined": str(d)})
                return "end" if d.end else "declined"
            except (OSError, ValueError) as exc:
                _answer(conn, {"declined": str(exc)[:200]})
                return "declined"
            self.forks += 1
            _answer(conn, {"pid": shim})
            return "forked"
        except OSError:
            return "declined"  # the caller is gone: a shim we made gets no word from it and ends
        finally:
            for fd in fds:
                os.close(fd)

    def end(self) -> None:
        """The socket unlinked while the lock is held (a newer zygote's socket is never removed
        by an older one), the requests already queued closed unanswered (their callers fork their
        shims), then the lock released with no pid left for `stop` to signal. Once."""
        if self.ended:
            return
        self.ended = True
        self.path.unlink(missing_ok=True)
        self.server.setblocking(False)
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                break
            conn.close()
        self.server.close()
        if self.lock is not None:
            os.ftruncate(self.lock, 0)
            os.close(self.lock)
            self.lock = None

    def _check(self, conn: socket.socket, fds: list[int]) -> Request:
        """The request, read (its descriptors into ``fds``) and checked; Decline if not served."""
        pid, uid, _ = peer_creds(conn)
        data, received, flags, _ = socket.recv_fds(conn, MAX_REQUEST, 2)
        fds.extend(received)
        for fd in received:
            os.set_inheritable(fd, False)  # SCM_RIGHTS gives them without close-on-exec
        if uid != 0:
            raise Decline("not root")
        truncated = flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC)
        if (len(received) != 2 or truncated or not _is_listener(received[0])
                or not _is_pipe_reader(received[1])):
            raise Decline("a request takes a listening unix socket and a pipe")
        request = Request.parse(data, _read(f"/proc/{pid}/comm").strip())
        if code_stamp() != self.stamp:
            raise Decline("the zygote's code was replaced", end=True)
        if process_context(pid) != process_context(os.getpid()) or import_time_env(request.env) != self.env:
            raise Decline("the caller's process context or environment is not the zygote's", end=True)
        if not enabled(request.env.get("KATA_CONF_FILE"), request.env):
            raise Decline("shim_zygote is off in the pod's configuration")
        if len(os.listdir("/proc/self/task")) != 1:
            raise Decline("the zygote has threads: it cannot fork")
        return request

    def _fork(self, request: Request, fds: list[int], conn: socket.socket) -> int:
        """Fork twice (the shim must not be our child); the shim's pid once it is set up. The
        pod's socket and the go pipe are closed here before the answer: then only `start` and the
        shim hold the pipe, and `start` sees a shim that died (EPIPE)."""
        listen_fd, go_fd = fds
        if select.select([conn], [], [], 0)[0]:
            raise Decline("the caller is gone")  # a request queued while we were busy, given up
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            child = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            raise
        if child == 0:
            try:
                os.close(r)
                os.setsid()
                if os.fork() == 0:
                    _become_shim(request, listen_fd, go_fd, w)
            finally:
                os._exit(0)
        os.close(w)
        data = b""
        try:
            # A shim stuck setting up (a hung filesystem) must not stop the zygote: its report is
            # waited for as long as `start` waits for us; one that comes later finds no reader.
            deadline = time.monotonic() + ASK_TIMEOUT
            while (left := deadline - time.monotonic()) > 0 and select.select([r], [], [], left)[0]:
                chunk = os.read(r, 32)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(r)
            os.waitpid(child, 0)
            for fd in fds:
                os.close(fd)
            fds.clear()
        if not data.isdigit():
            raise Decline("the shim could not be set up")
        return int(data)


def _strings(value: object) -> list[str] | None:
    """``value`` if it is a non-empty list of strings without NULs."""
    if isinstance(value, list) and value and all(isinstance(a, str) and "\0" not in a for a in value):
        return value
    return None


def _is_listener(fd: int) -> bool:
    sock = socket.socket(fileno=fd)
    try:
        return (sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1)
    except OSError:
        return False
    finally:
        sock.detach()


def _is_pipe_reader(fd: int) -> bool:
    import fcntl
    import stat

    mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    return stat.S_ISFIFO(os.fstat(fd).st_mode) and mode == os.O_RDONLY


def _answer(conn: socket.socket, msg: dict[str, Any]) -> None:
    conn.sendall(json.dumps(msg).encode())


def _close_all_but(keep: set[int]) -> None:
    """Close every descriptor from 3 up but those in ``keep``."""
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _become_shim(request: Request, listen_fd: int, go_fd: int, report_fd: int) -> NoReturn:
    """The grandchild: the pod's shim, as `start` would have forked it. Reports its pid once set
    up, then serves only on `start`'s word."""
    try:
        signal.set_wakeup_fd(-1)
        # Nothing of the zygote's (its lock, its socket, the request's connection) stays open.
        _close_all_but({listen_fd, go_fd, report_fd})
        null_stdio((0, 1))  # as in `start`'s child; serve sends stderr to the bundle's log
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(request.env)
        os.chdir(request.cwd)
        set_command_line(request.cmdline, request.comm)
        from kata.shim import command, serve

        args = command.parser().parse_args(request.argv)
        os.write(report_fd, str(os.getpid()).encode())
        os.close(report_fd)
        if os.read(go_fd, len(GO)) != GO:
            os._exit(0)  # `start` gave up on us: it forks a shim of its own
        os.close(go_fd)
        serve.run(args, listen_fd)
    finally:
        os._exit(1)  # serve.run exits the process itself; this is for a failure before it


# Room for a shim's command line in the zygote's own (see set_command_line).
ROOM = 4096
_PR_SET_NAME = 15  # prctl(2)


def _arg_area() -> tuple[int, int]:
    # /proc/self/stat's fields 48 and 49 (arg_start, arg_end); stat_fields starts at the third.
    fields = stat_fields("self")
    if fields is None or len(fields) < 49 - 2:
        raise OSError("/proc/self/stat shows no argument area")
    return int(fields[48 - 3]), int(fields[49 - 3])


def set_command_line(argv: list[str], comm: str = "") -> None:
    """Make /proc/self/cmdline show ``argv`` (and /proc/self/comm ``comm``): a shim the zygote
    forked then looks like one `start` forked (operators and tools find a pod's shim by its id
    there). The new command line is written over the process's own argument strings, which must
    be long enough (the zygote runs with ROOM bytes of padding); the rest is zeroed, so the
    kernel shows the arguments as they are. OSError if they do not fit.
    (prctl's PR_SET_MM would take a new area, but needs CAP_SYS_RESOURCE.)"""
    import ctypes

    start, end = _arg_area()
    data = b"\0".join(os.fsencode(a) for a in argv) + b"\0"
    if len(data) > end - start:
        raise OSError(f"a command line of {len(data)} bytes does not fit in {end - start}")
    ctypes.memmove(start, data + bytes(end - start - len(data)), end - start)
    if comm:
        libc = ctypes.CDLL(None, use_errno=True)
        name = ctypes.create_string_buffer(os.fsencode(comm)[:15])
        libc.prctl(ctypes.c_int(_PR_SET_NAME), name, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kata-shim-zygote", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--idle", type=float, default=IDLE_EXIT, help="seconds without a shim made before it ends")
    p.add_argument("--policy", default="", help="POLICY,PRIORITY to serve in (default: the current one)")
    p.add_argument("--room", default="", help="padding: room for the command lines of the shims it forks")
    args = p.parse_args(argv)
    if not math.isfinite(args.idle) or args.idle <= 0:
        p.error("--idle must be a positive number of seconds")
    start, end = _arg_area()
    if end - start < ROOM:  # started by hand: again, with room for the shims' command lines
        os.execv(sys.executable, [sys.executable, "-P", "-m", "kata.shim.zygote", *sys.argv[1:],
                                  "--room", " " * ROOM])
    for fd in (0, 1, 2):  # open, so that no received descriptor lands there (a shim resets them)
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(os.open(os.devnull, os.O_RDWR), fd)
    RUN_DIR.mkdir(parents=True, exist_ok=True, mode=0o711)
    # One that is ending may still hold the lock for a moment.
    lock = pid_lock(LOCK, wait=2.0)
    if lock is None:
        return 0  # another zygote runs
    stamp = code_stamp()  # before the code is loaded: a change while it loads counts
    import importlib

    # Loading takes about 0.1 s of a core, while the pod whose `start` launched us is on its way up:
    # done only with CPU time nobody else wants, then in the policy the shims must inherit (the
    # launcher's, which it passes, having switched to SCHED_IDLE before the exec).
    if args.policy:
        number, priority = (int(x) for x in args.policy.split(","))
        policy, param = number, os.sched_param(priority)
    else:
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    try:
        for name in PRELOAD:
            importlib.import_module(name)
        # Everything loaded so far is left alone by the collector: a forked shim's collections do
        # not write to (and so copy) the pages it shares with the zygote and the other shims.
        gc.collect()
        gc.freeze()
    finally:
        os.sched_setscheduler(0, policy, param)
    # Our own command line without the padding, rewritten the way a shim's will be.
    set_command_line([sys.executable, "-m", "kata.shim.zygote"])
    server = listen_private(str(SOCKET), 64, socket.SOCK_SEQPACKET)
    # SIGTERM (`stop`), SIGINT and SIGHUP wake the loop through a pipe: the zygote never ends
    # halfway through a request.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda _signum, _frame: None)
    zygote = Zygote(server, SOCKET, wake_r, stamp, lock)
    try:
        zygote.serve(args.idle)
    finally:
        zygote.end()
    return 0


if __name__ == "__main__":
    sys.exit(main())
