"""kata-runtime: the runc-compatible command line. Parses arguments and hands each verb to its module."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kata.cli import quick

if TYPE_CHECKING:
    import argparse

# Each module adds its verbs with add_parser(subparsers); a verb's parser sets func(args) -> int.
_VERB_MODULES = ("lifecycle", "exec", "inspect", "update", "spec", "features", "check", "env", "factory",
                 "metrics", "debug_console", "version")
# Which module has each verb: a command loads only its own module (containerd runs one kata-runtime
# per step, so every millisecond of start-up counts), help and unknown verbs load them all.
_MODULE_OF = {
    **dict.fromkeys(("create", "run", "start", "kill", "delete", "pause", "resume"), "lifecycle"),
    **dict.fromkeys(("state", "list", "ps", "events"), "inspect"),
    "exec": "exec", "update": "update", "spec": "spec", "features": "features", "check": "check",
    "kata-check": "check", "env": "env", "factory": "factory", "metrics": "metrics",
    "debug-console": "debug_console", "version": "version",
}


def _verb_modules(argv: Sequence[str]) -> tuple[str, ...]:
    words = iter(argv)
    for word in words:
        if word in quick.VALUED_OPTIONS:
            next(words, None)
        elif word in ("-h", "--help"):
            break
        elif not word.startswith("-"):
            module = _MODULE_OF.get(word)
            return (module,) if module else _VERB_MODULES
    return _VERB_MODULES


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    from kata.utils.usage import Parser

    p = Parser(prog="kata-runtime", description="OCI runtime that runs containers in lightweight VMs")
    p.add_argument("--root", default=quick.DEFAULT_ROOT, help="root directory for container state")
    p.add_argument("--log", default=None, help="log file (default: stderr only with --debug)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--debug", action="store_true", help="enable debug output")
    p.add_argument("--config", "--kata-config", dest="config", default=None, help="configuration.toml to use")
    p.add_argument("--systemd-cgroup", action="store_true", help="accepted for runc compatibility")
    p.add_argument("--criu", default=None, help="accepted and ignored, for runc compatibility")
    p.add_argument("--version", "-v", action="store_true", help="print the version")
    sub = p.add_subparsers(dest="verb", metavar="COMMAND")
    import importlib

    for module in _VERB_MODULES if argv is None else _verb_modules(argv):
        importlib.import_module(f"kata.cli.{module}").add_parser(sub)
    return p


def _fail(msg: str) -> int:
    print(f"kata-runtime: {msg}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if quick.nothing_to_delete(argv):
        return 0
    from kata import __version__
    from kata.cli import logs
    from kata.errors import USER_ERRORS, strerror
    from kata.utils.text import one_line
    from kata.utils.usage import UsageError

    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return _fail(one_line(str(exc)))
    if args.version and not args.verb:
        print(f"kata-runtime  : {__version__}")
        return 0
    if not args.verb:
        parser.print_help()
        return 0
    try:
        log = logs.setup(args.log, args.log_format, args.debug)
    except OSError as exc:  # the log cannot be opened: say so on stderr, the only place left
        return _fail(one_line(f"open {args.log}: {strerror(exc)}"))
    try:
        _check_id(args)
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): not an error worth a message
        sys.stderr.close()
        return 1
    except Exception as exc:  # every failure is one line for the user; details go to the log
        msg = one_line(exc)
        if not isinstance(exc, USER_ERRORS):
            msg = f"internal error: {type(exc).__name__}: {msg}"
            log.debug("traceback", exc_info=True)
        log.error(msg)
        return _fail(msg)


def _check_id(args: argparse.Namespace) -> None:
    """Every verb that names a container checks its id first, whatever it does next: the id becomes
    paths under --root and the sandbox's directories (each container is a sandbox of its own)."""
    cid = getattr(args, "container_id", None)
    if cid is not None:
        from kata.sandbox.paths import validate_sandbox_id

        validate_sandbox_id(cid)


if __name__ == "__main__":
    sys.exit(main())
