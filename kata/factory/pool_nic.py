"""The NIC a pooled VM gets before any pod asks for one (kata.factory.pool).

Each clone gets a tap in the daemon's own network namespace, hot-added as the VM's first NIC (index 0,
its root port, a MAC of the pool's), so the guest has taken it (PCIe hotplug and virtio-net's probe,
about 0.3 s under TCG) long before a pod's network is mirrored. A take that names the pod's network
namespace moves the tap there, under the name the pod's first tap has (tcfilter.tap_name(0)), QEMU
holding it all along; the pod connects it to its first interface, and the agent gives the guest's
link that interface's MAC and addresses (kata.sandbox.network). A NIC no interface uses is unplugged.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kata.network import rtnl, tcfilter
from kata.utils.netns import delete_link

if TYPE_CHECKING:
    from kata.hypervisor.base import Hypervisor

# The device's ceiling (virtio-net's host_mtu): the agent sets the pod's MTU below it.
MAX_MTU = 9000


@dataclass(frozen=True)
class PooledNic:
    tap: str  # its name in the daemon's network namespace
    mac: str  # the guest link's MAC until the pod's


def prepare(vmm: Hypervisor, seq: int) -> PooledNic:
    """A tap in this process's network namespace, hot-added to ``vmm`` as NIC 0."""
    nic = PooledNic(f"kpool{seq}", "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5)))
    queues = vmm.nic_queues()
    tcfilter.create_tap(None, nic.tap, MAX_MTU, multi_queue=queues > 1)
    try:
        fds = tcfilter.open_tap("/proc/self/ns/net", nic.tap, queues)
        try:
            vmm.hotplug_nic(0, nic.tap, nic.mac, MAX_MTU, queues=queues, tap_fds=fds)
        finally:
            for fd in fds:  # QEMU holds its own copies
                os.close(fd)
    except BaseException:
        remove(nic)
        raise
    return nic


def remove(nic: PooledNic) -> None:
    delete_link(None, nic.tap)


def move(nic: PooledNic, netns_path: str) -> str:
    """Move the tap into the network namespace at ``netns_path``, renamed as a pod's first tap;
    returns that name. OSError when the path is not a network namespace or the move fails."""
    from kata.utils.nsfiles import NamespacePathError, identify

    try:
        # Checked first through O_PATH (nsfs, then the type): nothing else at the path is opened.
        inode = identify("network", netns_path)
    except NamespacePathError as exc:
        raise OSError(str(exc)) from None
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_ino != inode:
            raise OSError(f"{netns_path} changed while it was checked")
        name = tcfilter.tap_name(0)
        with rtnl(None) as r:
            link = r.link(nic.tap)
            if link is None:
                raise OSError(f"tap {nic.tap} is gone")
            try:
                r.set_link(link.index, netns_fd=fd, name=name)
            except OSError as exc:
                raise OSError(exc.errno, f"moving tap {nic.tap}: {os.strerror(exc.errno or 0)}") from None
        return name
    finally:
        os.close(fd)
