"""containerd-shim-kata-v2's command line, as containerd runs it.

    containerd-shim-kata-v2 -namespace NS -address SOCK -publish-binary BIN -id ID [-debug] start|delete
    containerd-shim-kata-v2 -v | -info

`start` (in the bundle directory) starts the pod's shim (forked by the shim zygote, kata.shim.zygote,
or by `start` itself), or finds the running one of the task's pod, and prints its address; `delete`
cleans up after a shim that is gone.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kata import __version__
from kata.errors import KataError
from kata.shim.command import NAME, parser
from kata.utils.text import one_line


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
