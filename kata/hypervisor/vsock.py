"""Reserve a free vsock guest cid by holding it on an open /dev/vhost-vsock fd that QEMU then inherits.

Holding the fd makes the choice race-free: another VM cannot take the cid between choice and launch.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from .base import HypervisorError
from .qemu_argv import Vsock

VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"
# _IOW(VHOST_VIRTIO=0xAF, 0x60, __u64)
_VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60
# 0-2 are reserved (hypervisor, local, host).
FIRST_GUEST_CID = 3


def reserve_cid(first: int = FIRST_GUEST_CID, attempts: int = 4096) -> Vsock:
    try:
        fd = os.open(VHOST_VSOCK_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise HypervisorError(
            f"vsock agent channel needs {VHOST_VSOCK_DEVICE} ({exc.strerror}); use virtio-serial"
        ) from exc
    for cid in range(first, first + attempts):
        try:
            fcntl.ioctl(fd, _VHOST_VSOCK_SET_GUEST_CID, struct.pack("=Q", cid))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            os.close(fd)
            raise HypervisorError(f"cannot set vsock guest cid {cid}: {exc.strerror}") from exc
        return Vsock(cid=cid, vhostfd=fd)
    os.close(fd)
    raise HypervisorError(f"no free vsock guest cid in {first}..{first + attempts - 1}")
