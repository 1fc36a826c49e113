"""Unix sockets born root-only: the monitor's agent proxy and the shim's task API.

Imports only os, socket and struct: the per-process monitor loads it.
"""

from __future__ import annotations

import os
import socket
import struct


def listen_private(path: str, backlog: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A listening unix socket (a stream one, or ``kind``) at ``path`` (a stale one there is
    replaced), created 0600: the umask is 077 around bind(2), so there is no moment at which
    another user could connect.
    The umask is process-wide; a file another thread creates meanwhile is only born stricter."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, kind)
    try:
        old = os.umask(0o077)
        try:
            listener.bind(path)
        finally:
            os.umask(old)
    except BaseException:
        listener.close()
        raise
    try:
        listener.listen(backlog)
    except BaseException:
        listener.close()
        os.unlink(path)
        raise
    return listener


def peer_creds(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected a unix socket (SO_PEERCRED); OSError if unknown."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    return pid, uid, gid


def peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process that connected a unix socket, None if unknown."""
    try:
        pid = peer_creds(sock)[0]
    except OSError:
        return None
    return pid if pid > 0 else None
