"""`exec`: run another process in a running container, as runc's flags describe it."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from kata.cli.lifecycle import check_pid_file, store, write_pid_file
from kata.errors import KataError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("exec", help="execute a new process inside the container")
    p.add_argument("--process", "-p", default=None, help="a JSON file with the process to run")
    p.add_argument("--tty", "-t", action="store_true", help="allocate a pseudo-TTY")
    p.add_argument("--detach", "-d", action="store_true", help="detach from the process")
    p.add_argument("--pid-file", default=None, help="write the pid of the process that stands for it")
    p.add_argument("--console-socket", default=None, help="unix socket that receives the pty's master")
    p.add_argument("--cwd", default=None, help="working directory in the container")
    p.add_argument("--env", "-e", action="append", default=[], help="set an environment variable")
    p.add_argument("--user", "-u", default=None, help="UID[:GID]")
    p.add_argument("--additional-gids", "-g", action="append", type=int, default=[])
    p.add_argument("--cap", "-c", action="append", default=[], help="add a capability")
    p.add_argument("--no-new-privs", action="store_true", help="set no_new_privileges")
    p.add_argument("--apparmor", default=None, help="accepted; the guest has no AppArmor")
    p.add_argument("--process-label", default=None, help="accepted; the guest has no SELinux")
    p.add_argument("--preserve-fds", type=int, default=0, help="accepted; descriptors cannot enter a VM")
    p.add_argument("container_id")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def process_from_args(spec_process: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """runc's rule: without --process, the container's own process is the template and the flags
    change it (the command, a tty, the cwd, added env and capabilities, the user)."""
    if not args.command:
        raise KataError("exec failed: process args cannot be empty")
    proc = copy.deepcopy(spec_process)
    proc["args"] = list(args.command)
    proc["terminal"] = bool(args.tty)
    if args.cwd:
        proc["cwd"] = args.cwd
    proc["env"] = [*proc.get("env", []), *args.env]
    if args.user:
        uid, _, gid = args.user.partition(":")
        try:
            proc["user"] = {"uid": int(uid), "gid": int(gid or 0)}
        except ValueError:
            raise KataError(f"parsing {args.user} as UID[:GID]: not numeric") from None
    if args.additional_gids:
        proc.setdefault("user", {})["additionalGids"] = list(args.additional_gids)
    if args.cap:
        caps = proc.setdefault("capabilities", {})
        for kind in ("bounding", "effective", "permitted", "ambient"):
            caps[kind] = sorted({*caps.get(kind, []), *args.cap})
    if args.no_new_privs:
        proc["noNewPrivileges"] = True
    return proc


def run(args: argparse.Namespace) -> int:
    from kata.cli import foreground
    from kata.oci.spec import load_process
    from kata.runc import operations
    from kata.runc.monitor_launch import PendingMonitor

    st = store(args)
    check_pid_file(args.pid_file)
    # A --process file is read (bounded: it may be anything) and checked before the monitor starts.
    process = load_process(Path(args.process)) if args.process else None
    # Started before the rest: its Python start-up overlaps our checks and the process's preparation.
    # Its argv names the container only: host command lines are readable by every local user.
    monitor = PendingMonitor([args.container_id, "exec"])
    try:
        if process is None:
            from kata.oci.spec import load_bundle

            rec = st.load(args.container_id)
            spec = load_bundle(Path(rec.bundle), require_process=False).spec
            process = process_from_args(spec.get("process") or {"cwd": "/"}, args)
    except BaseException:
        monitor.cancel()
        raise
    fg = not args.detach
    with foreground.raw_terminal(bool(process.get("terminal")) and fg and not args.console_socket), \
            foreground.forwarding_signals(monitor.proc, enabled=fg):
        ident = operations.exec_process(st, args.container_id, process, console_socket=args.console_socket,
                                        foreground=fg, monitor=monitor)
        if args.pid_file:
            write_pid_file(args.pid_file, ident.pid)
        if args.detach:
            return 0
        return foreground.wait(monitor.proc)
