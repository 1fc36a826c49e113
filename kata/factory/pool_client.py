"""The warm VM pool's protocol and what a sandbox calls (kata.factory.pool is the daemon): one
bounded JSON line each way over the daemon's root-only socket. Apart from the daemon so that the
sandbox service, which the daemon uses to make its clones, does not import the daemon."""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kata.errors import KataError
from kata.sandbox.paths import VM_ROOT

if TYPE_CHECKING:
    from kata.hypervisor.base import VMConfig

log = logging.getLogger("kata.pool")

# A request or an answer is one JSON line of at most this many bytes.
MAX_MESSAGE = 16 * 1024
# How long a sandbox waits for the daemon before it restores a VM itself.
TAKE_TIMEOUT = 2.0


class PoolError(KataError):
    pass





def send(conn: socket.socket, msg: dict[str, Any]) -> None:
    data = json.dumps(msg).encode() + b"\n"
    if len(data) > MAX_MESSAGE:
        raise PoolError("message too long")
    conn.sendall(data)


def receive(conn: socket.socket) -> dict[str, Any]:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(MAX_MESSAGE + 1 - len(buf))
        if not chunk:
            raise PoolError("connection closed before a whole message")
        buf += chunk
        if len(buf) > MAX_MESSAGE:
            raise PoolError(f"message longer than {MAX_MESSAGE} bytes")
    msg = json.loads(buf)
    if not isinstance(msg, dict):
        raise PoolError("message is not a JSON object")
    return msg


def call(endpoint: Path, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request to the daemon at ``endpoint``; PoolError (one line) when it cannot be had."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(str(endpoint))
            send(conn, msg)
            answer = receive(conn)
        except (OSError, ValueError) as exc:
            raise PoolError(f"VM pool at {endpoint}: {exc}") from None
    if "error" in answer:
        raise PoolError(f"VM pool: {answer['error']}")
    return answer


@dataclass(frozen=True)
class Taken:
    vm_dir: Path  # VM_ROOT/<sid>: the VM's directory, now the sandbox's (its virtio-fs share, when
    # the take asked for one, came along: SHARED_ROOT/<sid>, served, the device hot-added)
    # Its first NIC, hot-added already: {"mac": the guest link's MAC, "tap": its tap's name in the
    # pod's network namespace, or "" when it stayed in the daemon's (no namespace, or a failed move)}.
    nic: dict[str, str] | None = None


def take(endpoint: Path, key: str, sid: str, share: list[str] | None = None, netns: str | None = None,
         timeout: float = TAKE_TIMEOUT) -> Taken | None:
    """A warm VM of template key ``key``, moved to sandbox ``sid``'s VM directory; None when there
    is no daemon, no clone of that shape ready, or the daemon fails: the caller restores; PoolError
    when a VM was moved there but no answer came (the caller stops it). ``share``:
    the options of the virtiofsd the sandbox would start (a clone's own must match); ``netns``: the
    pod's network namespace (a path), where the tap of the clone's first NIC is moved."""
    if not endpoint.exists():
        return None
    try:
        answer = call(endpoint, {"op": "take", "key": key, "sid": sid, "share": share, "netns": netns},
                      timeout)
    except PoolError as exc:
        if (VM_ROOT / sid / "qemu.json").exists():
            # The daemon handed a VM over, but its answer never came: the VM is the sandbox's to stop.
            raise PoolError(f"VM pool: a VM was handed over without an answer ({exc})") from None
        log.info(f"sandbox {sid}: no pooled VM: {exc}")
        return None
    vm_dir = answer.get("vm_dir")
    if vm_dir is None:
        log.debug(f"sandbox {sid}: no pooled VM ({str(answer.get('why'))[:40]})")
        return None
    if vm_dir != str(VM_ROOT / sid):  # only ever the sandbox's own directory
        raise PoolError(f"VM pool answered an unexpected directory {vm_dir!r}")
    nic = answer.get("nic")
    if not (isinstance(nic, dict) and isinstance(nic.get("mac"), str) and isinstance(nic.get("tap"), str)):
        nic = None
    return Taken(Path(vm_dir), nic)


def poolable(config: VMConfig) -> str | None:
    """Why VMs of ``config`` cannot be pooled, or None: a clone must be what any sandbox of its shape
    could use, so nothing of a sandbox's may be on its command line (a 9p share names its directory)."""
    from kata.factory.template import templatable

    why = templatable(config)
    if why is not None:
        return why
    fs = config.shared_fs
    if fs is not None and not (fs.kind == "virtio-fs" and fs.hotplug):
        return f"a {fs.kind} share is on QEMU's command line (only a hot-added virtio-fs share is pooled)"
    return None
