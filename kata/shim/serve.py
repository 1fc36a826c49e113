"""The shim's own life: serve the task API for one pod until containerd's Shutdown (or a signal),
logging to the bundle's `log` fifo, which containerd reads."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from kata import ttrpc
from kata.shim import address, events
from kata.shim.command import bundle_of
from kata.shim.service import SERVICE, TaskService
from kata.shim.tasks import PodTasks
from kata.utils.logfmt import LogfmtFormatter
from kata.utils.text import one_line, thread_failure

log = logging.getLogger("kata.shim")


def _log_to_bundle(bundle: Path, debug: bool) -> None:
    try:
        # containerd holds the fifo open for reading; non-blocking, so a missing reader fails fast.
        fd = os.open(bundle / "log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        os.dup2(fd, 2)
        os.close(fd)
    except OSError:
        pass  # no log fifo (started by hand): stderr stays where it is
    handler = logging.StreamHandler()
    # Messages carry guest text (errors, container ids): escaped, so that none can forge a line.
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger("kata")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def run(args: argparse.Namespace, listen_fd: int) -> NoReturn:
    """Serve until Shutdown or a signal; whatever fails is one line in the log, and the pod, the
    events and the socket are cleaned up all the same."""
    bundle = bundle_of(args)
    _log_to_bundle(bundle, args.debug)
    threading.excepthook = _thread_died
    listener = socket.socket(fileno=listen_fd)
    ttrpc_address = os.environ.get("TTRPC_ADDRESS", "")
    publisher = events.Publisher(ttrpc_address, args.namespace) if ttrpc_address else None
    pod = PodTasks(args.namespace, publisher)
    server = ttrpc.Server(max_workers=256)
    code = 0
    try:
        _serve(args, pod, server, listener)
    except BaseException as exc:  # noqa: BLE001 - the shim's last word is one line, then the cleanup
        log.error(f"shim for {args.id}: {one_line(exc)}")
        code = 1
    # A signal, Shutdown or a failure: whatever is still up goes with us.
    _cleanup("pod", lambda: pod.shutdown(now=True))
    if publisher is not None:
        _cleanup("events", publisher.flush)
        _cleanup("events", publisher.close)
    _cleanup("server", server.shutdown)
    _cleanup("socket", listener.close)
    path = address.socket_path(args.address, args.namespace, args.id)
    _cleanup("socket", lambda: path.unlink(missing_ok=True))
    # containerd waits for the connection to close: no interpreter teardown (its daemon threads
    # are blocked in calls that no longer matter).
    logging.shutdown()
    os._exit(code)


def _serve(args: argparse.Namespace, pod: PodTasks, server: ttrpc.Server, listener: socket.socket) -> None:
    done = threading.Event()
    config = os.environ.get("KATA_CONF_FILE")
    service = TaskService(pod, done.set, Path(config) if config else None)
    server.register_service(SERVICE, service.methods())

    def stop(signum: int, _frame: object) -> None:
        log.info(f"signal {signum}: shutting down pod {pod.sandbox_id or args.id}")
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=server.serve_listener, args=(listener,), name="accept", daemon=True).start()
    log.info(f"shim for {args.id} serving (pid {os.getpid()})")
    # A blocking wait: a signal interrupts it and its handler runs at once (no wake-up each second).
    done.wait()


def _cleanup(what: str, step: Callable[[], object]) -> None:
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - one failed step must not skip the others
        log.error(f"cleanup of the {what}: {one_line(exc)}")


def _thread_died(args: threading.ExceptHookArgs) -> None:
    """A thread's uncaught exception: one line in the log (never a traceback on a pipe)."""
    failure = thread_failure(args)
    if failure is not None:
        log.error(f"thread {failure}")
