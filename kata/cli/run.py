"""`kata-runtime run`: create and start a container in a fresh VM, relay its stdio and signals,
exit with its status and leave nothing behind."""

from __future__ import annotations

import argparse
import os
import queue
import signal
import sys
import termios
import threading
import tty
from pathlib import Path
from typing import Any

from kata.cli import logs

# runc forwards every signal but these to the container.
_NOT_FORWARDED = {signal.SIGCHLD, signal.SIGWINCH, signal.SIGURG, signal.SIGKILL, signal.SIGSTOP,
                  signal.SIGPIPE, signal.SIGTTIN, signal.SIGTTOU}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="create and run a container in its own VM")
    p.add_argument("--bundle", "-b", default=".", help="path to the OCI bundle")
    p.add_argument("--pid-file", default=None,
                   help="write the pid of the process that stands for the container on the host")
    p.add_argument("--no-pivot", action="store_true", help="accepted for runc compatibility")
    p.add_argument("--no-new-keyring", action="store_true", help="accepted for runc compatibility")
    p.add_argument("container_id")
    p.set_defaults(func=run)


def _write_pid_file(path: Path, pid: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(str(pid))
    os.replace(tmp, path)


def _winsize(fd: int) -> tuple[int, int] | None:
    try:
        cols, rows = os.get_terminal_size(fd)
        return rows, cols
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    from kata.config import apply_annotations, load_config
    from kata.core.container import Container
    from kata.core.paths import validate_id
    from kata.core.sandbox import Sandbox
    from kata.core.stdio import StdioRelay
    from kata.core.timings import Timings
    from kata.oci.spec import load_bundle

    log = logs.get()
    timings = Timings()
    cid = validate_id(args.container_id)
    bundle = load_bundle(Path(args.bundle).resolve())
    cfg = apply_annotations(load_config(Path(args.config) if args.config else None), bundle.annotations)
    timings.mark("parsed")

    # Until the container runs, SIGINT/SIGTERM abort the bring-up (and the cleanup runs).
    interrupted: queue.SimpleQueue[int] = queue.SimpleQueue()

    def abort(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old_handlers = {s: signal.signal(s, abort) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    sandbox = Sandbox.create(cid, cfg, bundle.spec, debug=args.debug, timings=timings)
    saved_tty: list[Any] | None = None
    try:
        container = Container(sandbox, cid, bundle)
        container.create()
        stdin_fd: int | None = 0
        try:
            os.fstat(0)
        except OSError:
            stdin_fd = None
        relay = StdioRelay(sandbox.require_agent(), cid, "", stdin_fd, 1, 2, container.terminal)
        relay.start()
        container.start()
        if args.pid_file:
            # The container's process lives in the guest; on the host this process lives exactly as
            # long as it, relays its signals and exits with its status, so it stands for it.
            _write_pid_file(Path(args.pid_file), os.getpid())

        if container.terminal and stdin_fd is not None and os.isatty(stdin_fd):
            saved_tty = termios.tcgetattr(stdin_fd)
            tty.setraw(stdin_fd)
            size = _winsize(stdin_fd)
            if size:
                container.resize(*size)

        # Signals are queued by the handler and sent by a thread: an RPC must not run inside a handler.
        def forward(signum: int, _frame: Any) -> None:
            interrupted.put(signum)

        for s in signal.Signals:
            if s not in _NOT_FORWARDED:
                try:
                    signal.signal(s, forward)
                except (OSError, ValueError):
                    pass
        if container.terminal:
            signal.signal(signal.SIGWINCH, forward)

        def forwarder() -> None:
            while True:
                signum = interrupted.get()
                try:
                    if signum == signal.SIGWINCH:
                        size = _winsize(0)
                        if size:
                            container.resize(*size)
                    else:
                        container.signal(signum)
                except Exception as exc:
                    log.debug(f"forwarding signal {signum}: {exc}")

        threading.Thread(target=forwarder, daemon=True).start()

        result: dict[str, Any] = {}

        def waiter() -> None:
            try:
                result["status"] = container.wait()
            except BaseException as exc:
                result["error"] = exc

        w = threading.Thread(target=waiter, daemon=True)
        w.start()
        while w.is_alive():
            w.join(0.5)  # short joins keep the main thread free to run signal handlers
        if "error" in result:
            raise result["error"]
        relay.drain(timeout=10.0)
        status = int(result["status"])
        log.info(f"container {cid} exited with status {status}")
        return status
    finally:
        if saved_tty is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved_tty)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        for s in signal.Signals:
            if s not in _NOT_FORWARDED and s not in old_handlers:
                try:
                    signal.signal(s, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
        # Late signals must not interrupt the cleanup.
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        sandbox.destroy()
        log.debug(f"timings {timings.as_json()}")
        sys.stdout.flush()
