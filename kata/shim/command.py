"""containerd-shim-kata-v2's command line, parsed alike by every shim command (`start`, `delete`,
the shim `start` or the zygote forks): the task's id and namespace, checked before anything is
built from them, and its bundle."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kata.errors import KataError
from kata.utils.usage import Parser

NAME = "containerd-shim-kata-v2"


def parser() -> argparse.ArgumentParser:
    p = Parser(prog=NAME, add_help=True)
    # Go's flag package: one dash or two, "-flag value" or "-flag=value".
    for flag in ("namespace", "address", "publish-binary", "id", "bundle", "socket"):
        p.add_argument(f"-{flag}", f"--{flag}", dest=flag.replace("-", "_"), default="")
    for flag in ("debug", "v", "info"):
        p.add_argument(f"-{flag}", f"--{flag}", dest=flag, action="store_true")
    p.add_argument("action", nargs="?", choices=("start", "delete"))
    return p


def check_ids(args: argparse.Namespace) -> None:
    """start and delete name a task (-id) in a namespace (-namespace): both are checked before
    anything is built from them, or done in their name."""
    from kata.sandbox.paths import validate_id

    if not args.id or not args.namespace:
        raise KataError(f"{args.action} needs -id and -namespace")
    validate_id(args.id)
    try:
        validate_id(args.namespace)  # containerd's namespaces follow a stricter rule than ids'
    except KataError as exc:
        raise KataError(f"namespace: {exc}") from None


def bundle_of(args: argparse.Namespace) -> Path:
    """containerd runs the shim in the bundle; newer releases also pass -bundle."""
    return Path(args.bundle or os.getcwd())
