"""containerd-shim-kata-v2's command line, as containerd runs it.

    containerd-shim-kata-v2 -namespace NS -address SOCK -publish-binary BIN -id ID [-debug] start|delete
    containerd-shim-kata-v2 -v | -info

`start` (in the bundle directory) starts the pod's shim (a child it forks), or finds the running
one of the task's pod, and prints its address; `delete` cleans up after a shim that is gone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kata import __version__
from kata.errors import KataError
from kata.utils.text import one_line
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


def main(argv: Sequence[str] | None = None) -> None:
    try:
        args = parser().parse_args(argv)
        if args.v:
            print(f"{NAME}:\n  Version: {__version__}\n  Runtime: kata-containers-py (one VM per pod)")
            code = 0
        elif args.info:
            code = _info()
        elif args.action == "start":
            from kata.shim import start

            code = start.run(args)
        elif args.action == "delete":
            from kata.shim import cleanup

            code = cleanup.run(args)
        else:
            raise KataError("an action is required: start or delete (containerd runs the shim)")
    except KataError as exc:
        print(f"{NAME}: {one_line(exc)}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.exit(code)


def _info() -> int:
    """The runtime's name, version and OCI features (containerd 1.7 asks with -info)."""
    import json

    from kata.oci.features import features

    info = {"name": NAME, "version": {"version": __version__}, "features": features()}
    print(json.dumps(info, indent=2))
    return 0
