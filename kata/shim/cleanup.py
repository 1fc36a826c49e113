"""`containerd-shim-kata-v2 delete`: containerd's cleanup after a shim that is gone (it died, or
the task's create failed). Whatever the task left on the host goes: its VM (if it was the pod's
sandbox), the rootfs mount, the socket. The answer is a DeleteResponse on stdout."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from kata.errors import KataError
from kata.shim import address, rootfs
from kata.shim.command import bundle_of, check_ids


def run(args: argparse.Namespace) -> int:
    from kata.sandbox.paths import has_state, max_sandbox_id_length

    check_ids(args)  # nothing is torn down in the name of an invalid id
    bundle = bundle_of(args)
    # Only the pod's sandbox task has a VM (named after it); a longer id cannot be a sandbox's. After
    # a clean shutdown (containerd runs this after every shim) there is no state left: the sandbox
    # service is not even loaded.
    if len(args.id) <= max_sandbox_id_length() and has_state(args.id):
        from kata.sandbox.pod import tear_down

        try:
            problems = tear_down(args.id)
        except KataError as exc:
            problems = [str(exc)]
        for problem in problems:
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
    sys.stdout.buffer.write(delete_response(128 + signal.SIGKILL, time.time_ns()))
    return 0


def delete_response(exit_status: int, exited_at_ns: int) -> bytes:
    """containerd.task.v2.DeleteResponse{exit_status, exited_at}, encoded without the protobuf
    runtime: containerd runs this command after every shim's exit, so it should start fast."""
    from kata.ttrpc import wire

    seconds, nanos = divmod(exited_at_ns, 1_000_000_000)
    return wire.encode(((2, exit_status), (3, wire.encode(((1, seconds), (2, nanos))))))
