"""`update`: new resource limits for a running container (the VM grows first when it must)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kata.cli.lifecycle import store


def add_parser(sub: Any) -> None:
    from kata.oci.resources import add_update_arguments

    p = sub.add_parser("update", help="update a container's resource limits")
    add_update_arguments(p)
    p.add_argument("container_id")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kata.oci.resources import resources_from_args
    from kata.runc import operations

    resources = resources_from_args(args, sys.stdin.read)
    operations.update(store(args), args.container_id, resources)
    return 0
