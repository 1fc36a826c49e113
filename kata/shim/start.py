"""`containerd-shim-kata-v2 start`: one shim per pod.

The pod's first task (its sandbox) gets a new shim: the socket is bound here, and a forked child
serves it in its own session. containerd reads this command's output to its end, so the shim keeps
none of it. A later container of the pod gets the running shim's address.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

from kata.errors import KataError
from kata.shim import address, zygote
from kata.shim.command import bundle_of, check_ids
from kata.utils.process import null_stdio
from kata.utils.sockets import listen_private


def run(args: argparse.Namespace) -> int:
    check_ids(args)
    bundle = bundle_of(args)
    group = address.group_of(bundle, args.id)
    path = address.socket_path(args.address, args.namespace, group)
    if address.is_serving(path):
        found = address.as_address(path)
    elif group != args.id:
        raise KataError(f"container {args.id}: the shim of its pod {group} is not running")
    else:
        found = _start_shim(args, bundle, path)
    (bundle / "address").write_text(found)
    sys.stdout.write(found)
    return 0


def _start_shim(args: argparse.Namespace, bundle: Path, path: Path) -> str:
    # Read before the socket is made: bad options leave nothing behind.
    config = _config_from_options()
    if config:
        os.environ["KATA_CONF_FILE"] = config
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    # A shim that died left its socket: nothing listens on it (checked above); it is replaced.
    listener = listen_private(str(path), 128)
    try:
        # The zygote's shim (kata.shim.zygote), serving when this returns; or None, and ours.
        pid = zygote.fork_shim(sys.orig_argv, sys.argv[1:], bundle, listener)
        ours = pid is None
        if pid is None:
            pid = os.fork()
    except BaseException:
        listener.close()
        path.unlink(missing_ok=True)
        raise
    if pid == 0:
        _become_shim(args, bundle, listener)
    if ours:
        zygote.launch(config or None)
    listener.close()
    (bundle / "shim.pid").write_text(str(pid))
    return address.as_address(path)


def _become_shim(args: argparse.Namespace, bundle: Path, listener: socket.socket) -> NoReturn:
    """The forked child: the pod's shim, in a session of its own, holding none of `start`'s output
    (a fork, not a new interpreter: what `start` loaded is loaded already)."""
    try:
        os.setsid()
        null_stdio()
        os.chdir(bundle)
        from kata.shim import serve

        serve.run(args, listener.fileno())
    finally:
        os._exit(1)  # serve.run exits the process itself; this is for its failure


def _config_from_options() -> str:
    """The configuration.toml named by the runtime options containerd writes to our stdin."""
    from kata.shim.options import config_path_of_any

    if sys.stdin is None or sys.stdin.isatty():
        return ""
    try:
        data = sys.stdin.buffer.read()
        path = config_path_of_any(data) if data else None
    except (OSError, ValueError) as exc:
        raise KataError(f"runtime options on stdin: {exc}") from exc
    return str(path) if path else ""
