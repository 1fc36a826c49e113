"""`kata-runtime debug-console SANDBOX_ID`: a root shell in a sandbox's guest, on the operator's
terminal (Kata's `kata-ctl exec`; runc's `exec` keeps its meaning). Needs debug_console_enabled.

On a terminal, the terminal goes raw and the guest's pty does the line discipline; otherwise (pipe
mode, for scripts) the shell runs on pipes as a script's would (no prompt, no echo), and the end of
our input is the end of its. The command exits with the shell's status.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from kata.errors import KataError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("debug-console", help="open a root shell in a sandbox's VM (debug_console_enabled)")
    # Named as the other verbs' ids are, so that it is checked as they are (kata.cli.main).
    p.add_argument("container_id", metavar="sandbox-id",
                   help="the sandbox: a container's id (kata-runtime) or a pod's (containerd's kata shim)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kata.agent_client.console import Session, terminal_size
    from kata.cli.foreground import raw_terminal
    from kata.sandbox.pod import Pod

    sid = args.container_id
    if os.geteuid() != 0:
        raise KataError("debug-console: only root may open a guest's console")
    endpoint = Pod.attach(sid).debug_console()
    interactive = os.isatty(0)
    rows, cols = terminal_size(0)
    session = Session.open(endpoint, f"sandbox {sid}", rows=rows, cols=cols, tty=interactive,
                           term=os.environ.get("TERM", "") if interactive else "dumb")
    try:
        sys.stdout.flush()
        # SIGTERM and SIGHUP end us through the finally blocks: the terminal is given back.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _exit_on)
        with raw_terminal(interactive):
            return session.relay(0, 1, resize_from=0 if interactive else None)
    finally:
        session.close()


def _exit_on(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)
