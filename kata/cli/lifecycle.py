"""`create`, `start`, `run`, `kill`, `delete`, `pause` and `resume`: runc's verbs and flags, on VMs."""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kata.runc.state import ContainerStore


def store(args: argparse.Namespace) -> ContainerStore:
    return ContainerStore(Path(args.root))


def check_pid_file(path: str | None) -> None:
    """runc writes the pid file once the process exists; a place that cannot take it must fail
    before a VM is booted (or a process started) for nothing. Go's words, as runc's open would say."""
    from kata.errors import KataError

    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise KataError(f"open {path}: is a directory")
    if not target.parent.is_dir():
        what = "not a directory" if target.parent.exists() else "no such file or directory"
        raise KataError(f"open {path}: {what}")


def write_pid_file(path: str, pid: int) -> None:
    """Atomically, as runc does: a reader never sees a half-written pid."""
    from kata.errors import KataError, strerror

    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(str(pid))
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise KataError(f"open {path}: {strerror(exc)}") from None


def _write_pid_file_or_delete(st: ContainerStore, cid: str, path: str | None, pid: int) -> None:
    """The pid file of a container just created; if it cannot be written, the container goes
    again (runc destroys it too): no caller would ever learn its process."""
    if not path:
        return
    try:
        write_pid_file(path, pid)
    except BaseException:
        from kata.runc import operations

        operations.delete(st, cid, force=True)
        raise


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
    from kata.runc import operations

    check_pid_file(args.pid_file)
    st = store(args)
    with aborting_on_termination():
        rec, _proc = operations.create(st, args.container_id, Path(args.bundle),
                                       config_path=_config(args), console_socket=args.console_socket,
                                       debug=args.debug)
        _write_pid_file_or_delete(st, args.container_id, args.pid_file, rec.pid)
    return 0


def run(args: argparse.Namespace) -> int:
    """create + start; in the foreground, wait for the process and delete the container after."""
    from kata.cli import foreground
    from kata.errors import KataError
    from kata.oci.spec import load_bundle
    from kata.runc import operations
    from kata.sandbox.status import VM_GONE_STATUS

    check_pid_file(args.pid_file)
    st = store(args)
    terminal = bool(load_bundle(Path(args.bundle).resolve()).spec.get("process", {}).get("terminal"))
    with foreground.raw_terminal(terminal and not args.detach and not args.console_socket):
        with aborting_on_termination():
            rec, proc = operations.create(st, args.container_id, Path(args.bundle), config_path=_config(args),
                                          console_socket=args.console_socket, debug=args.debug,
                                          foreground=not args.detach)
            _write_pid_file_or_delete(st, args.container_id, args.pid_file, rec.pid)
        try:
            with foreground.forwarding_signals(proc, enabled=not args.detach):
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
    from kata.runc import operations

    operations.start(store(args), args.container_id)
    return 0


def kill(args: argparse.Namespace) -> int:
    from kata.errors import KataError
    from kata.runc import operations
    from kata.utils.signals import parse_signal

    try:
        signum = parse_signal(args.signal)
    except ValueError as exc:
        raise KataError(str(exc)) from exc
    operations.kill(store(args), args.container_id, signum, all_processes=args.all)
    return 0


def delete(args: argparse.Namespace) -> int:
    from kata.runc import operations

    operations.delete(store(args), args.container_id, force=args.force)
    return 0


def pause(args: argparse.Namespace) -> int:
    from kata.runc import operations

    operations.pause(store(args), args.container_id)
    return 0


def resume(args: argparse.Namespace) -> int:
    from kata.runc import operations

    operations.resume(store(args), args.container_id)
    return 0
