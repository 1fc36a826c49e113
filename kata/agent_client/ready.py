"""Waiting for a fresh agent connection to answer: the one loop the sandbox (typed client) and the
process monitor (kata.agent_client.lite) share.

A first request may be lost while the guest has not yet seen its host connect, so Health.Check is
retried with short deadlines until the whole one runs out. A closed connection never comes back: it
ends the wait at once (the VMM died, or the guest hung up), instead of spinning until the deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kata import ttrpc

# One try's deadline; and the pause after a try that failed at once, so an agent that answers
# "deadline exceeded" immediately does not make us spin.
_TRY = 0.5
_PAUSE = 0.01


def wait_ready(check: Callable[[float], object], client: ttrpc.Client, timeout: float) -> None:
    """Call ``check(deadline_for_this_try)`` until it returns; its TTRPCError once ``timeout`` has run
    out or the connection has closed, and at once for any other status."""
    deadline = time.monotonic() + timeout
    while True:
        started = time.monotonic()
        try:
            check(max(0.05, min(_TRY, deadline - started)))
            return
        except ttrpc.TTRPCError as exc:
            retry = exc.code in (ttrpc.Code.DEADLINE_EXCEEDED, ttrpc.Code.UNAVAILABLE)
            if not retry or client.closed or time.monotonic() >= deadline:
                raise
        if time.monotonic() - started < _PAUSE:
            time.sleep(_PAUSE)
