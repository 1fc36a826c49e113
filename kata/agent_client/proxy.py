"""The agent proxy: a ttrpc server that forwards every call, as it is, over one agent connection.

A container's init monitor holds the VM's only agent connection (a virtio-serial port takes one client)
and serves this on a unix socket for every later command and exec monitor. Calls are forwarded
asynchronously: one in flight holds no thread, however long the agent takes (a WaitProcess lasts as long
as its process), and its deadline is kept by the agent client's timer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kata import ttrpc
from kata.protocols.agent_api import AGENT_SERVICE, LONG_POLL_METHODS

# A forwarded call that is not a long-poll and came without a deadline gets this one, so that an
# agent that never answers cannot pile up calls here.
DEFAULT_TIMEOUT = 60.0
# Workers only send answers back; one is held only while a client is slow to read its answer.
_WORKERS = 16


def forwarding_server(agent: ttrpc.Client,
                      seen: Callable[[ttrpc.Context], None] | None = None) -> ttrpc.Server:
    """A server (not yet serving) whose every call goes to ``agent``, errors and deadlines included;
    ``seen`` hears of each call before it is forwarded."""

    def forward(ctx: ttrpc.Context, payload: bytes, reply: ttrpc.Reply) -> None:
        if seen is not None:
            seen(ctx)
        if ctx.deadline is not None:
            timeout: float | None = ctx.deadline - time.monotonic()
        elif ctx.service == AGENT_SERVICE and ctx.method in LONG_POLL_METHODS:
            timeout = None
        else:
            timeout = DEFAULT_TIMEOUT
        agent.call_async(ctx.service, ctx.method, payload, reply, timeout, ctx.metadata or None)

    server = ttrpc.Server(max_workers=_WORKERS)
    server.set_fallback(forward)
    return server
