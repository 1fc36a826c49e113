"""`kata-runtime metrics SANDBOX`: one sandbox's Prometheus text, as kata-monitor gathers it."""

from __future__ import annotations

import argparse
import sys
from typing import Any

# A sandbox that does not answer by then is reported, not waited for.
TIMEOUT = 10.0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("metrics", help="print a sandbox's metrics (Prometheus text)")
    p.add_argument("container_id", metavar="SANDBOX", help="the sandbox (a pod's, or a container's) id")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kata.errors import KataError
    from kata.metrics.endpoint import fetch
    from kata.sandbox.paths import SandboxPaths

    paths = SandboxPaths(args.container_id)
    if not paths.state_dir.is_dir():
        raise KataError(f"sandbox {args.container_id} does not exist")
    if not paths.metrics_socket.exists():
        raise KataError(f"sandbox {args.container_id} serves no metrics (it is starting, stopping, or "
                        "older than them)")
    sys.stdout.buffer.write(fetch(paths.metrics_socket, TIMEOUT))
    sys.stdout.flush()
    return 0
