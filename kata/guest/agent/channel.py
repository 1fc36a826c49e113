"""The agent channel: vsock when the host asked for it and the kernel has it, else a virtio-serial port."""

from __future__ import annotations

import os
import select
import socket
import time

from kata import ttrpc
from kata.guest.agent import log
from kata.protocols.agent_api import AGENT_SERIAL_PORT_NAME, AGENT_VSOCK_PORT

VIRTIO_PORTS = "/sys/class/virtio-ports"
# How often to look again for a host client on a virtio-serial port (reads are EOF until one connects)
# when the port cannot signal its host's arrival; and the safety net when it can.
RECONNECT_POLL = 0.01
IDLE_POLL = 0.5


def find_serial_port(name: str = AGENT_SERIAL_PORT_NAME, sys_dir: str = VIRTIO_PORTS) -> str | None:
    """/dev/vportNpM of the port named `name`; the number depends on the other virtio devices."""
    try:
        ports = sorted(os.listdir(sys_dir))
    except OSError:
        return None
    for port in ports:
        try:
            with open(os.path.join(sys_dir, port, "name")) as f:
                if f.read().strip() == name:
                    return os.path.join("/dev", port)
        except OSError:
            continue
    return None


def vsock_listener(port: int = AGENT_VSOCK_PORT) -> socket.socket | None:
    if not hasattr(socket, "AF_VSOCK"):
        return None
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(8)
    except OSError as e:
        sock.close()
        log.warn(f"vsock port {port}: {e}")
        return None
    return sock


def serve_serial(server: ttrpc.Server, path: str) -> None:
    """Serve the port forever: each host connection is one serve(); between them reads are EOF.

    Polling for the next host would keep an idle guest busy (a read every few milliseconds, under
    emulation too); the port raises SIGIO when its host side opens, so wait for that, with a slow
    poll behind it in case a signal is missed.
    """
    from kata.guest.agent import sigio

    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    wake = sigio.watch(fd)
    stream = ttrpc.fd_stream(fd)
    log.info(f"serving on virtio-serial {path}")
    while True:
        server.serve(stream)
        if wake is None:
            time.sleep(RECONNECT_POLL)
            continue
        select.select([wake], [], [], IDLE_POLL)
        sigio.drain(wake)


def serve(server: ttrpc.Server, want_vsock: bool, wait_port: float = 10.0) -> None:
    if want_vsock:
        listener = vsock_listener()
        if listener is not None:
            log.info(f"serving on vsock port {AGENT_VSOCK_PORT}")
            server.serve_listener(listener)
            return
        log.warn("vsock unavailable, falling back to virtio-serial")
    deadline = time.monotonic() + wait_port
    while (path := find_serial_port()) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no virtio-serial port named {AGENT_SERIAL_PORT_NAME}")
        time.sleep(0.01)
    serve_serial(server, path)
