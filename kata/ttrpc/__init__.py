"""containerd's ttrpc (length-prefixed protobuf RPC) over sockets and file descriptors, with threads.

Kept free of asyncio, logging and concurrent.futures: the guest agent imports this under emulation, where
those imports alone cost most of a second.
"""

from kata.ttrpc.client import Client
from kata.ttrpc.errors import Code, ConnectionClosed, TTRPCError
from kata.ttrpc.server import Context, Forwarder, Handler, Method, Reply, Server
from kata.ttrpc.stream import Stream, fd_stream, socket_stream

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
