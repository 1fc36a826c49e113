"""Kata's tcfilter model: a veth and a tap in the same netns, each one's ingress redirected to the other.

Frames the container's network delivers to the veth leave through the tap (to QEMU, the guest's NIC),
and frames the guest sends through the tap leave through the veth, without a bridge and without the
namespace's IP stack seeing them. The guest NIC carries the veth's MAC (QEMU's `mac=`), so the peer
side sees the same MAC and addresses as the veth had; the tap's own MAC never reaches the wire.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from collections.abc import Callable
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netns import setns
from pyroute2.protocols import ETH_P_ALL

from kata.network import rtnl

# Marks the taps created here (IFLA_IFALIAS), so that endpoint discovery does not mirror them.
OWN_TAP_ALIAS = "kata-tap"
INGRESS = 0xFFFF0000  # "ffff:", the ingress qdisc's handle and its filters' parent
_FLOWID = 0x10001  # "1:1": pyroute2's u32 requires a classid; the mirred action decides, not the class

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100

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
    (`-netdev tap,ifname=NAME,script=no,downscript=no`, QEMU running in `ns`), or be handed fds from
    open_tap(). It is deleted explicitly with delete_link(); it also goes when its namespace is
    destroyed. `multi_queue` must match how QEMU opens it (queues > 1), else TUNSETIFF fails.
    """
    with rtnl(ns) as ipr:
        # Whoever attaches (QEMU, open_tap) sets NO_PI/VNET_HDR again with its TUNSETIFF; only
        # MULTI_QUEUE is fixed at creation.
        flags = {"no_pi": True, "one_queue": False, "vnet_hdr": False, "multi_queue": multi_queue}
        ipr.link("add", ifname=name, kind="tuntap", mode="tap", ifr=flags)
        index = ipr.link_lookup(ifname=name)[0]
        attrs: dict[str, object] = {"mtu": mtu, "ifalias": OWN_TAP_ALIAS}
        if mac:
            attrs["address"] = mac
        ipr.link("set", index=index, state="up", **attrs)


def delete_link(ns: str | None, name: str) -> None:
    """Delete link `name` in `ns`; nothing to do when it (or the namespace) is already gone."""
    try:
        with rtnl(ns) as ipr:
            for index in ipr.link_lookup(ifname=name):
                try:
                    ipr.link("del", index=index)
                except NetlinkError as e:
                    if e.code not in _GONE:
                        raise
    except FileNotFoundError:
        pass


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


def open_tap(ns: str | None, name: str, vnet_hdr: bool = False, multi_queue: bool = False) -> int:
    """Attach to the existing tap `name` in `ns` and return its fd (raw Ethernet frames, no PI header).

    /dev/net/tun resolves the name in the namespace of the thread that opens it, so the open runs
    in a short-lived thread that has entered `ns` (setns changes only the calling thread's netns).
    """
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0) | (IFF_MULTI_QUEUE if multi_queue else 0)

    def attach() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        except OSError:
            os.close(fd)
            raise
        return fd

    return attach() if ns is None else _in_netns(ns, attach)


def _in_netns(ns: str, fn: Callable[[], int]) -> int:
    result: list[int] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            setns(ns, flags=0)
            result.append(fn())
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    thread = threading.Thread(target=run, name=f"netns:{ns}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


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
