"""containerd's ttrpc (length-prefixed protobuf RPC) over sockets and file descriptors, with threads.

Kept free of asyncio, logging and concurrent.futures: the guest agent imports this under emulation, where
those imports alone cost most of a second.
"""

from typing import TYPE_CHECKING

from kata.ttrpc.errors import Code, ConnectionClosed, TTRPCError
from kata.ttrpc.server import Context, Forwarder, Handler, Method, Reply, Server
from kata.ttrpc.stream import Stream, fd_stream, socket_stream

if TYPE_CHECKING:
    from kata.ttrpc.client import Client


def __getattr__(name: str) -> object:
    # The client is loaded on first use: the guest agent only serves, and its start-up is timed.
    if name == "Client":
        from kata.ttrpc.client import Client

        return Client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Client",
    "Code",
    "ConnectionClosed",
    "Context",
    "Forwarder",
    "Handler",
    "Method",
    "Reply",
    "Server",
    "Stream",
    "TTRPCError",
    "fd_stream",
    "socket_stream",
]
