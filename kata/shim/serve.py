"""The shim's own life: serve the task API for one pod until containerd's Shutdown (or a signal),
logging to the bundle's `log` fifo, which containerd reads."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import NoReturn

from kata import ttrpc
from kata.shim import address, events
from kata.shim.main import bundle_of
from kata.shim.pod import Pod
from kata.shim.service import SERVICE, TaskService
from kata.utils.logfmt import LogfmtFormatter

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
    bundle = bundle_of(args)
    _log_to_bundle(bundle, args.debug)
    listener = socket.socket(fileno=listen_fd)
    ttrpc_address = os.environ.get("TTRPC_ADDRESS", "")
    publisher = events.Publisher(ttrpc_address, args.namespace) if ttrpc_address else None
    pod = Pod(args.namespace, publisher)
    done = threading.Event()
    server = ttrpc.Server(max_workers=256)
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
    while not done.wait(1.0):
        pass
    # A signal, or Shutdown: whatever is still up goes with us.
    pod.shutdown(now=True)
    if publisher is not None:
        publisher.flush()
        publisher.close()
    server.shutdown()
    listener.close()
    path = address.socket_path(args.address, args.namespace, args.id)
    path.unlink(missing_ok=True)
    # containerd waits for the connection to close: no interpreter teardown (its daemon threads
    # are blocked in calls that no longer matter).
    logging.shutdown()
    os._exit(0)
