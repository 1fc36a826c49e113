"""Kata's tcfilter model: a veth and a tap in the same netns, each one's ingress redirected to the other.

Frames the container's network delivers to the veth leave through the tap (to QEMU, the guest's NIC),
and frames the guest sends through the tap leave through the veth, without a bridge and without the
namespace's IP stack seeing them. The guest NIC carries the veth's MAC (QEMU's `mac=`), so the peer
side sees the same MAC and addresses as the veth had; the tap's own MAC never reaches the wire.
"""

from __future__ import annotations

import errno
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.protocols import ETH_P_ALL

from kata.network import rtnl

# Marks the taps created here (IFLA_IFALIAS), so that endpoint discovery does not mirror them.
OWN_TAP_ALIAS = "kata-tap"
INGRESS = 0xFFFF0000  # "ffff:", the ingress qdisc's handle and its filters' parent
_FLOWID = 0x10001  # "1:1": pyroute2's u32 requires a classid; the mirred action decides, not the class


# What deleting something already gone answers: no such device, qdisc or filter.
_GONE = frozenset({errno.ENODEV, errno.ENOENT, errno.EINVAL})


def tap_name(index: int) -> str:
    """Kata's name for the tap of the index-th endpoint (within IFNAMSIZ)."""
    return f"tap{index}_kata"


def create_tap(
    ns: str | None, name: str, mtu: int, mac: str | None = None, multi_queue: bool = False
) -> None:
    """Create a persistent tap `name` in `ns`, up, with `mtu` (and `mac`), marked as ours.

    Persistent (TUNSETPERSIST): it outlives the fd used to create it, so QEMU must open it by name
    (`-netdev tap,ifname=NAME,script=no,downscript=no`, QEMU running in `ns`), or be handed fds
    opened with TUNSETIFF on that name. It is deleted explicitly (kata.utils.netns.delete_link); it also goes
    when its namespace is destroyed. `multi_queue` must match how QEMU opens it (queues > 1), else
    TUNSETIFF fails.
    """
    with rtnl(ns) as ipr:
        # Whoever attaches (QEMU) sets NO_PI/VNET_HDR again with its TUNSETIFF; only
        # MULTI_QUEUE is fixed at creation.
        flags = {"no_pi": True, "one_queue": False, "vnet_hdr": False, "multi_queue": multi_queue}
        ipr.link("add", ifname=name, kind="tuntap", mode="tap", ifr=flags)
    adopt_tap(ns, name, mtu, mac)


def adopt_tap(ns: str | None, name: str, mtu: int, mac: str | None = None) -> None:
    """The tap ``name`` in ``ns`` (made there, or moved there from a VM pool's namespace) up, with
    ``mtu`` (and ``mac``), marked as ours."""
    with rtnl(ns) as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        attrs: dict[str, object] = {"mtu": mtu, "ifalias": OWN_TAP_ALIAS}
        if mac:
            attrs["address"] = mac
        ipr.link("set", index=index, state="up", **attrs)


# <linux/if_tun.h>
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_MULTI_QUEUE, _IFF_VNET_HDR = 0x0002, 0x1000, 0x0100, 0x4000


def open_tap(ns: str, name: str, queues: int) -> list[int]:
    """``queues`` descriptors of the existing tap ``name`` in ``ns``, for a VMM that runs in another
    network namespace (a pooled VM): /dev/net/tun is opened from a thread inside ``ns``, and a tap
    is looked up in the namespace of the descriptor that attaches to it, so it stays there. The
    flags are those QEMU sets when it opens a tap by name."""
    import fcntl
    import os
    import struct

    from kata.utils import netns

    flags = _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR | (_IFF_MULTI_QUEUE if queues > 1 else 0)
    ifreq = struct.pack("16sH22x", name.encode(), flags)

    def attach() -> list[int]:
        fds: list[int] = []
        try:
            for _ in range(queues):
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
                fds.append(fd)
                fcntl.ioctl(fd, _TUNSETIFF, ifreq)
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    return netns.call_in(netns.path_of(ns), attach)


def connect(ns: str | None, veth_name: str, tap_name: str) -> None:
    """Redirect each device's ingress to the other's egress (u32 match-all + mirred), both ways.

    Replaces any ingress qdisc already on either device, so calling it twice leaves one pair of filters.
    """
    with rtnl(ns) as ipr:
        veth, tap = (_index(ipr, n) for n in (veth_name, tap_name))
        for src, dst in ((veth, tap), (tap, veth)):
            _del_ingress(ipr, src)
            ipr.tc("add", "ingress", src, INGRESS)
            ipr.tc(
                "add-filter",
                "u32",
                src,
                parent=INGRESS,
                protocol=ETH_P_ALL,
                keys=["0x0/0x0+0"],
                target=_FLOWID,
                action=[{"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": dst}],
            )


def disconnect(ns: str | None, veth_name: str, tap_name: str) -> None:
    """Remove the ingress qdiscs (and with them the filters) from both; devices already gone are fine."""
    try:
        with rtnl(ns) as ipr:
            for name in (veth_name, tap_name):
                for index in ipr.link_lookup(ifname=name):
                    _del_ingress(ipr, index)
    except FileNotFoundError:
        pass


def _index(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NetlinkError(errno.ENODEV, f"no device {name}")
    return int(found[0])


def _del_ingress(ipr: Any, index: int) -> None:
    try:
        ipr.tc("del", "ingress", index, INGRESS)
    except NetlinkError as e:
        if e.code not in _GONE:
            raise
