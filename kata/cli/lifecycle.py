"""`create`, `start`, `run`, `kill`, `delete`, `pause` and `resume`: runc's verbs and flags, on VMs."""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kata.runtime.records import ContainerStore


def store(args: argparse.Namespace) -> ContainerStore:
    return ContainerStore(Path(args.root))


def write_pid_file(path: str, pid: int) -> None:
    """Atomically, as runc does: a reader never sees a half-written pid."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(str(pid))
    os.replace(tmp, target)


@contextmanager
def aborting_on_termination() -> Iterator[None]:
    """SIGINT, SIGTERM or SIGHUP during a bring-up abort it and its cleanup runs; their default
    action would end us at once and leave the VM behind."""
    def abort(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, abort) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _config(args: argparse.Namespace) -> Path | None:
    return Path(args.config) if args.config else None


def _add_create_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", "-b", default=".", help="path to the OCI bundle")
    p.add_argument("--pid-file", default=None,
                   help="write the pid of the process that stands for the container")
    p.add_argument("--console-socket", default=None,
                   help="unix socket that receives the master of the container's pty")
    p.add_argument("--no-pivot", action="store_true", help="accepted for runc compatibility")
    p.add_argument("--no-new-keyring", action="store_true", help="accepted for runc compatibility")
    p.add_argument("--preserve-fds", type=int, default=0,
                   help="accepted; descriptors cannot be passed into a VM")
    p.add_argument("container_id")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("create", help="create a container in its own VM")
    _add_create_flags(p)
    p.set_defaults(func=create)

    p = sub.add_parser("run", help="create and run a container in its own VM")
    _add_create_flags(p)
    p.add_argument("--detach", "-d", action="store_true", help="detach from the container's process")
    p.add_argument("--keep", action="store_true", help="do not delete the container after it exits")
    p.set_defaults(func=run)

    p = sub.add_parser("start", help="start a created container")
    p.add_argument("container_id")
    p.set_defaults(func=start)

    p = sub.add_parser("kill", help="send a signal to the container's init process")
    p.add_argument("--all", "-a", action="store_true", help="signal all the container's processes")
    p.add_argument("container_id")
    p.add_argument("signal", nargs="?", default="SIGTERM")
    p.set_defaults(func=kill)

    p = sub.add_parser("delete", help="delete a container and its VM")
    p.add_argument("--force", "-f", action="store_true", help="kill the container first if it runs")
    p.add_argument("container_id")
    p.set_defaults(func=delete)

    for verb, text in (("pause", "suspend all processes of the container"),
                       ("resume", "resume all processes of a paused container")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("container_id")
        p.set_defaults(func=pause if verb == "pause" else resume)


def create(args: argparse.Namespace) -> int:
    from kata.runtime import operations

    with aborting_on_termination():
        rec, _proc = operations.create(store(args), args.container_id, Path(args.bundle),
                                       config_path=_config(args), console_socket=args.console_socket,
                                       debug=args.debug)
    if args.pid_file:
        write_pid_file(args.pid_file, rec.pid)
    return 0


def run(args: argparse.Namespace) -> int:
    """create + start; in the foreground, wait for the process and delete the container after."""
    from kata.cli import foreground
    from kata.errors import KataError
    from kata.monitor import VM_GONE_STATUS
    from kata.oci.spec import load_bundle
    from kata.runtime import operations

    st = store(args)
    terminal = bool(load_bundle(Path(args.bundle).resolve()).spec.get("process", {}).get("terminal"))
    with foreground.raw_terminal(terminal and not args.detach and not args.console_socket):
        with aborting_on_termination():
            rec, proc = operations.create(st, args.container_id, Path(args.bundle), config_path=_config(args),
                                          console_socket=args.console_socket, debug=args.debug,
                                          foreground=not args.detach)
        try:
            if args.pid_file:
                write_pid_file(args.pid_file, rec.pid)
            operations.start(st, args.container_id)
            if args.detach:
                return 0
            status = foreground.wait(proc)
            if status == VM_GONE_STATUS and not operations.vm_running(st, args.container_id):
                raise KataError(f"container {args.container_id}: its VM stopped under it")
        finally:
            if not args.detach and not args.keep:
                operations.delete(st, args.container_id, force=True)
    return status


def start(args: argparse.Namespace) -> int:
    from kata.runtime import operations

    operations.start(store(args), args.container_id)
    return 0


def kill(args: argparse.Namespace) -> int:
    from kata.errors import KataError
    from kata.runtime import operations
    from kata.utils.signals import parse_signal

    try:
        signum = parse_signal(args.signal)
    except ValueError as exc:
        raise KataError(str(exc)) from exc
    operations.kill(store(args), args.container_id, signum, all_processes=args.all)
    return 0


def delete(args: argparse.Namespace) -> int:
    from kata.runtime import operations

    operations.delete(store(args), args.container_id, force=args.force)
    return 0


def pause(args: argparse.Namespace) -> int:
    from kata.runtime import operations

    operations.pause(store(args), args.container_id)
    return 0


def resume(args: argparse.Namespace) -> int:
    from kata.runtime import operations

    operations.resume(store(args), args.container_id)
    return 0
