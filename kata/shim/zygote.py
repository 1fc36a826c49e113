"""The shim zygote: one process with the shim's code loaded that forks each new pod's shim.

A shim is a Python process; about 10 MB of what it holds is the code it imports (protobuf's
descriptors, the sandbox service, the hypervisor and network modules), and importing it takes about
0.1 s in a new interpreter. Forked from a process that has it all loaded (and frozen out of the
garbage collector's reach, so that the child does not write to those pages), a shim shares those
pages with every other shim and starts serving at once.

`containerd-shim-kata-v2 start` asks the zygote first (`fork_shim`); the zygote makes the shim only
for a caller it could not be told apart from (the same namespaces, cgroups, credentials, limits,
root, security label: `process_context`), and only with its code still the installed one;
otherwise, or when no zygote runs, `start` forks the shim itself, as before, and, when the pod's
configuration has `shim_zygote` on, starts a zygote (`launch`) for the pods after it. The zygote ends after
IDLE_EXIT seconds without a request; the shims it made are not its children (a second fork) and
live on.

    python -m kata.shim.zygote [--foreground] [--idle S]    # one by hand (`launch` runs it in
                                                            # the foreground of a child of its own)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from kata.errors import KataError
from kata.utils.sockets import listen_private, peer_creds

RUN_DIR = Path("/run/kata-containers")
SOCKET = RUN_DIR / "shim-zygote.sock"
LOCK = RUN_DIR / "shim-zygote.lock"
# With no request for this long the zygote ends (its pages stay shared by the shims it made).
IDLE_EXIT = 600.0
# How long `start` waits for the zygote to take its request; it forks the shim itself after that.
ASK_TIMEOUT = 2.0
# The zygote forks only before the caller's deadline; the caller waits this much longer for the
# answer, so that it never forks a second shim for a listener the zygote's shim serves.
ANSWER_MARGIN = 3.0
MAX_REQUEST = 256 * 1024

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

# /proc/<pid>/status lines that must match between the zygote and its caller.
_STATUS_KEYS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
                "Seccomp", "Umask", "Cpus_allowed_list", "Mems_allowed_list")
_NAMESPACES = ("mnt", "net", "pid", "ipc", "uts", "user", "cgroup", "time")


class ZygoteError(KataError):
    pass


def process_context(pid: int) -> dict[str, str]:
    """What a process passes on to a child it forks, apart from its memory, environment, working
    directory and descriptors: a shim forked by the zygote is one `start` could have forked when
    the two agree here. OSError if the process is gone."""
    proc = f"/proc/{pid}"
    found: dict[str, str] = {}
    for ns in _NAMESPACES:
        try:
            found[f"ns/{ns}"] = os.readlink(f"{proc}/ns/{ns}")
        except FileNotFoundError:
            found[f"ns/{ns}"] = ""  # a kernel without this namespace kind
    found["root"] = os.readlink(f"{proc}/root")
    for name in ("cgroup", "limits", "oom_score_adj"):
        found[name] = _read(f"{proc}/{name}")
    # The audit login id and the LSM's label (AppArmor, SELinux), where the kernel has them.
    for name in ("loginuid", "attr/current"):
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
    return found


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def code_stamp() -> dict[str, Any]:
    """The interpreter and every module file of the package, by size and modification time: a
    zygote whose code was replaced (an upgrade, an edit) must not make another shim."""
    import kata

    root = Path(kata.__file__).parent
    files = {}
    for path in sorted(root.rglob("*.py")):
        st = path.stat()
        files[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    exe = os.stat(sys.executable)
    return {"python": (sys.executable, exe.st_size, exe.st_mtime_ns), "files": files}


# --- the caller: `containerd-shim-kata-v2 start` ---


def fork_shim(argv: list[str], bundle: Path, listener: socket.socket, path: Path = SOCKET,
              timeout: float = ASK_TIMEOUT) -> int | None:
    """The pid of the pod's shim, forked by the zygote to serve ``listener`` as the shim `start`
    would fork (``argv``, this process's environment, in ``bundle``); None when there is no zygote
    or it will not make this caller's shim. ZygoteError when it took the request and did not say
    whether it forked: the caller must not fork a shim of its own then."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        conn.settimeout(timeout)
        try:
            conn.connect(str(path))
        except OSError:
            return None  # none runs (or it is going away)
        deadline = time.monotonic() + timeout
        request = {"argv": argv, "env": dict(os.environ), "cwd": str(bundle), "deadline": deadline}
        data = json.dumps(request).encode()
        if len(data) > MAX_REQUEST:
            return None
        try:
            socket.send_fds(conn, [data], [listener.fileno()])
        except OSError:
            return None  # not taken: it forked nothing
        conn.settimeout(timeout + ANSWER_MARGIN)
        try:
            answer = conn.recv(MAX_REQUEST)
        except OSError as exc:
            raise ZygoteError(f"the shim zygote at {path} did not answer: {exc}") from None
    finally:
        conn.close()
    if not answer:
        raise ZygoteError(f"the shim zygote at {path} closed the request without an answer")
    try:
        reply = json.loads(answer)
        pid = reply.get("pid")
    except (ValueError, AttributeError):
        raise ZygoteError(f"the shim zygote at {path} answered {answer[:80]!r}") from None
    if isinstance(pid, int) and pid > 0:
        return pid
    return None  # declined: another context, older code, too late


def is_running(path: Path = SOCKET) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as conn:
        try:
            conn.connect(str(path))
        except OSError:
            return False
    return True


def launch(config_file: str | None) -> None:
    """Start a zygote for the pods after this one, if none runs and the configuration a pod's shim
    loads (``config_file``, or the one in effect) wants one. Returns at once: a child of this
    process (`start`, which is about to end) becomes the zygote in a session of its own, in this
    process's context but for its scheduling policy, which stays SCHED_IDLE until its code is
    loaded (its first pod is on its way up meanwhile). One started meanwhile by another `start`
    finds the first's lock and ends at once."""
    if is_running():
        return
    if os.fork() > 0:
        return
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # `start`'s output is containerd's to read to its end
            os.dup2(devnull, fd)
        os.setsid()
        policy = f"{os.sched_getscheduler(0)},{os.sched_getparam(0).sched_priority}"
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        if enabled(config_file):
            os.execv(sys.executable, [sys.executable, "-m", "kata.shim.zygote", "--foreground",
                                      "--policy", policy, "--room", " " * ROOM])
    except BaseException:  # noqa: BLE001 - never `start`'s failure: its pod has its shim
        pass
    finally:
        os._exit(0)


def stop(lock: Path = LOCK, timeout: float = 10.0) -> int | None:
    """End the running zygote (its pid is in its lock file); its pid, or None if none runs."""
    import fcntl

    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None  # nobody holds it
        except OSError:
            pass
        pid = int(os.read(fd, 32).decode().strip() or 0)
        if pid <= 0:
            return None
        os.kill(pid, signal.SIGTERM)
        # It holds the lock until it ends.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return pid
            except OSError:
                time.sleep(0.02)
        raise ZygoteError(f"the shim zygote (pid {pid}) did not end within {timeout:g}s")
    finally:
        os.close(fd)


# --- the zygote ---


class Zygote:
    def __init__(self, server: socket.socket, wake_fd: int) -> None:
        self.server = server
        self.wake_fd = wake_fd  # readable when a signal asks the zygote to end
        self.context = process_context(os.getpid())
        self.stamp = code_stamp()

    def serve(self, idle: float = IDLE_EXIT) -> None:
        """Take requests one at a time (the zygote stays single-threaded: it forks) until idle."""
        while True:
            ready, _, _ = select.select([self.server.fileno(), self.wake_fd], [], [], idle)
            if not ready or self.wake_fd in ready:
                return
            conn, _ = self.server.accept()
            with conn:
                if not self.handle(conn):
                    return

    def handle(self, conn: socket.socket) -> bool:
        """One request; False when the zygote must end (its code is no longer the installed one)."""
        fds: list[int] = []
        try:
            conn.settimeout(ASK_TIMEOUT)
            pid, uid, _ = peer_creds(conn)
            data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 1)
            if uid != 0 or len(fds) != 1:
                _answer(conn, {"declined": "not root, or no listener"})
                return True
            request = json.loads(data)
            argv, env, cwd, deadline = (request["argv"], request["env"], request["cwd"],
                                        float(request["deadline"]))
            if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)
                    and isinstance(env, dict) and all(isinstance(v, str) for v in env.values())
                    and isinstance(cwd, str)):
                _answer(conn, {"declined": "malformed request"})
                return True
            if code_stamp() != self.stamp:
                _answer(conn, {"declined": "the zygote's code was replaced"})
                return False
            if process_context(pid) != self.context:
                _answer(conn, {"declined": "the caller's process context is not the zygote's"})
                return True
            if not enabled(env.get("KATA_CONF_FILE")):
                _answer(conn, {"declined": "shim_zygote is off in the pod's configuration"})
                return True
            if time.monotonic() > deadline:
                _answer(conn, {"declined": "too late"})
                return True
            if threading.active_count() != 1:
                _answer(conn, {"declined": "the zygote has threads: it cannot fork"})
                return True
            shim = self._fork(argv, env, cwd, fds[0], pid)
            _answer(conn, {"pid": shim})
            return True
        except (OSError, ValueError, KeyError, TypeError, KataError) as exc:
            try:
                _answer(conn, {"declined": str(exc)[:200]})
            except OSError:
                pass
            return True
        finally:
            for fd in fds:
                os.close(fd)

    def _fork(self, argv: list[str], env: dict[str, str], cwd: str, listen_fd: int, caller: int) -> int:
        """Fork twice (the shim must not be our child) and return the shim's pid."""
        comm = _read(f"/proc/{caller}/comm").strip()
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                os.close(r)
                os.setsid()
                shim = os.fork()
                if shim == 0:
                    # Nothing of the zygote's (its lock, its socket, the request's connection) stays
                    # open in the shim: all but stdio and the pod's socket are closed.
                    os.closerange(3, listen_fd)
                    os.closerange(listen_fd + 1, os.sysconf("SC_OPEN_MAX"))
                    _become_shim(argv, env, cwd, listen_fd, comm)
                os.write(w, str(shim).encode())
            finally:
                os._exit(0)
        os.close(w)
        try:
            data = b""
            while chunk := os.read(r, 32):
                data += chunk
        finally:
            os.close(r)
            os.waitpid(child, 0)
        if not data:
            raise OSError("the shim's fork failed")
        return int(data)


def enabled(config_file: str | None) -> bool:
    """Whether the configuration a pod's shim will load (KATA_CONF_FILE, or the one in effect) has
    the zygote on; KataError if it cannot be loaded (the shim would fail on it too)."""
    from kata.config import load_config

    return load_config(Path(config_file) if config_file else None).runtime.shim_zygote


def _answer(conn: socket.socket, msg: dict[str, Any]) -> None:
    conn.sendall(json.dumps(msg).encode())


def _become_shim(argv: list[str], env: dict[str, str], cwd: str, listen_fd: int, comm: str) -> NoReturn:
    """The grandchild: the pod's shim, as `start` would have forked it."""
    try:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        set_command_line(argv, comm)
        from kata.shim import command, serve

        args = command.parser().parse_args(argv[1:])
        serve.run(args, listen_fd)
    finally:
        os._exit(1)  # serve.run exits the process itself; this is for its failure


# Room for a shim's command line in the zygote's own (see set_command_line).
ROOM = 4096
_PR_SET_NAME = 15  # prctl(2)


def set_command_line(argv: list[str], comm: str = "") -> None:
    """Make /proc/self/cmdline show ``argv`` (and /proc/self/comm ``comm``): a shim the zygote
    forked then looks like one `start` forked (operators and tools find a pod's shim by its id
    there). The new command line is written over the process's own argument strings, which must
    be long enough (the zygote is started with ROOM bytes of padding); the rest is zeroed, so the
    kernel shows the arguments as they are. OSError if they do not fit.
    (prctl's PR_SET_MM would take a new area, but needs CAP_SYS_RESOURCE.)"""
    import ctypes

    # /proc/self/stat's fields 48 and 49, counted after the command's name (which may hold spaces).
    fields = _read("/proc/self/stat").rsplit(")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])
    data = b"\0".join(os.fsencode(a) for a in argv) + b"\0"
    if len(data) > end - start:
        raise OSError(f"a command line of {len(data)} bytes does not fit in {end - start}")
    ctypes.memmove(start, data + bytes(end - start - len(data)), end - start)
    if comm:
        libc = ctypes.CDLL(None, use_errno=True)
        name = ctypes.create_string_buffer(os.fsencode(comm)[:15])
        libc.prctl(ctypes.c_int(_PR_SET_NAME), name, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


def _daemonize() -> None:
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.chdir("/")


def _take_lock() -> int | None:
    import fcntl

    RUN_DIR.mkdir(parents=True, exist_ok=True, mode=0o711)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kata-shim-zygote", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--foreground", action="store_true", help="do not daemonize")
    p.add_argument("--idle", type=float, default=IDLE_EXIT, help="seconds without a request before it ends")
    p.add_argument("--policy", default="", help="POLICY,PRIORITY to serve in (default: the current one)")
    p.add_argument("--room", default="", help="padding: room for the command lines of the shims it forks")
    args = p.parse_args(argv)
    if not args.foreground:
        _daemonize()
    lock = _take_lock()
    if lock is None:
        return 0  # another zygote runs
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
    # Our own command line without the padding, rewritten the way a shim's will be: if that fails,
    # no zygote (its shims would not show their pods' ids).
    try:
        set_command_line([sys.executable, "-m", "kata.shim.zygote"])
    except (OSError, ValueError, IndexError):
        return 1
    server = listen_private(str(SOCKET), 64, socket.SOCK_SEQPACKET)
    # SIGTERM (`stop`) wakes the loop through a pipe: the zygote never ends halfway through a
    # request (a caller told nothing must be sure nothing was forked).
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    try:
        Zygote(server, wake_r).serve(args.idle)
    finally:
        # Unlinked while the lock is held: a newer zygote's socket is never removed by an older one.
        SOCKET.unlink(missing_ok=True)
        server.close()
        os.close(lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
