"""`containerd-shim-kata-v2 delete`: containerd's cleanup after a shim that is gone (it died, or
the task's create failed). Whatever the task left on the host goes: its VM (if it was the pod's
sandbox), the rootfs mount, the socket. The answer is a DeleteResponse on stdout."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from kata.errors import KataError
from kata.shim import address, rootfs
from kata.shim.main import bundle_of

log = logging.getLogger("kata.shim")


def run(args: argparse.Namespace) -> int:
    from kata.core.paths import SandboxPaths
    from kata.protocols.containerd.runtime.v2.task import shim_pb2

    if not args.id:
        raise KataError("delete needs -id")
    bundle = bundle_of(args)
    if SandboxPaths(args.id).state_dir.exists():
        from kata.config import load_config
        from kata.core.sandbox import Sandbox

        for problem in Sandbox.attach(args.id, load_config(None)).destroy():
            print(f"cleanup of sandbox {args.id}: {problem}", file=sys.stderr)
    rootfs.unmount_rootfs(bundle)
    try:
        group = address.group_of(bundle, args.id)
    except KataError:
        group = args.id  # the bundle may be half gone: the socket is still ours to remove
    if group == args.id and args.namespace:
        path = address.socket_path(args.address, args.namespace, group)
        if not address.is_serving(path):
            path.unlink(missing_ok=True)
    resp = shim_pb2.DeleteResponse(exit_status=128 + signal.SIGKILL)
    resp.exited_at.FromNanoseconds(time.time_ns())
    sys.stdout.buffer.write(resp.SerializeToString())
    return 0
