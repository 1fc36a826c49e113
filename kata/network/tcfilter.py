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
import socket
import struct

from kata.network import rtnl
from kata.utils.netns import in_netns
from kata.utils.rtnetlink import (
    NLM_F_CREATE,
    NLM_F_EXCL,
    RTM_DELQDISC,
    RTM_NEWQDISC,
    RTM_NEWTFILTER,
    Rtnl,
    attr,
    nested,
)

# Marks the taps created here (IFLA_IFALIAS), so that endpoint discovery does not mirror them.
OWN_TAP_ALIAS = "kata-tap"
INGRESS = 0xFFFF0000  # "ffff:", the ingress qdisc's handle and its filters' parent
_TC_H_INGRESS = 0xFFFFFFF1  # where the ingress qdisc hangs
_FLOWID = 0x10001  # "1:1": a u32 filter's class; the mirred action decides, not the class
_ETH_P_ALL = 0x0003
_PRIO = 49152  # tc's default for the first filter

# <linux/pkt_cls.h>, <linux/tc_act/tc_mirred.h>: the attributes of a u32 filter and its action.
_TCA_KIND, _TCA_OPTIONS = 1, 2
_TCA_U32_CLASSID, _TCA_U32_SEL, _TCA_U32_ACT = 1, 5, 7
_TC_U32_TERMINAL = 1
_TCA_ACT_KIND, _TCA_ACT_OPTIONS = 1, 2
_TCA_MIRRED_PARMS = 2
_TC_ACT_STOLEN = 4  # "redirect": the frame leaves through the other device only
_TCA_EGRESS_REDIR = 1

# What deleting something already gone answers: no such device, qdisc or filter.
_GONE = frozenset({errno.ENODEV, errno.ENOENT, errno.EINVAL})

# <linux/if_tun.h>
_TUNSETIFF, _TUNSETPERSIST = 0x400454CA, 0x400454CB
_IFF_TAP, _IFF_NO_PI, _IFF_MULTI_QUEUE, _IFF_VNET_HDR = 0x0002, 0x1000, 0x0100, 0x4000


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
    # Whoever attaches (QEMU) sets NO_PI/VNET_HDR again with its TUNSETIFF; only MULTI_QUEUE is
    # fixed at creation.
    flags = _IFF_TAP | _IFF_NO_PI | (_IFF_MULTI_QUEUE if multi_queue else 0)

    def make() -> None:
        # /dev/net/tun makes the device in the namespace of the thread that opens it.
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
            fcntl.ioctl(fd, _TUNSETPERSIST, 1)
        finally:
            os.close(fd)

    in_netns(ns, make)
    adopt_tap(ns, name, mtu, mac)


def adopt_tap(ns: str | None, name: str, mtu: int, mac: str | None = None) -> None:
    """The tap ``name`` in ``ns`` (made there, or moved there from a VM pool's namespace) up, with
    ``mtu`` (and ``mac``), marked as ours."""
    with rtnl(ns) as r:
        r.set_link(_index(r, name), up=True, mtu=mtu, address=mac or "", alias=OWN_TAP_ALIAS)


def open_tap(ns: str, name: str, queues: int) -> list[int]:
    """``queues`` descriptors of the existing tap ``name`` in ``ns``, for a VMM that runs in another
    network namespace (a pooled VM): /dev/net/tun is opened from a thread inside ``ns``, and a tap
    is looked up in the namespace of the descriptor that attaches to it, so it stays there. The
    flags are those QEMU sets when it opens a tap by name."""
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

    return in_netns(ns, attach)


def connect(ns: str | None, veth_name: str, tap_name: str) -> None:
    """Redirect each device's ingress to the other's egress (u32 match-all + mirred), both ways.

    Replaces any ingress qdisc already on either device, so calling it twice leaves one pair of filters.
    """
    with rtnl(ns) as r:
        veth, tap = (_index(r, n) for n in (veth_name, tap_name))
        for src, dst in ((veth, tap), (tap, veth)):
            _del_ingress(r, src)
            r.tc(RTM_NEWQDISC, src, INGRESS, _TC_H_INGRESS, attrs=attr(_TCA_KIND, b"ingress\0"),
                 flags=NLM_F_CREATE | NLM_F_EXCL)
            r.tc(RTM_NEWTFILTER, src, 0, INGRESS, info=(_PRIO << 16) | socket.htons(_ETH_P_ALL),
                 attrs=_redirect_all_to(dst), flags=NLM_F_CREATE | NLM_F_EXCL)


def disconnect(ns: str | None, veth_name: str, tap_name: str) -> None:
    """Remove the ingress qdiscs (and with them the filters) from both; devices already gone are fine."""
    try:
        with rtnl(ns) as r:
            for name in (veth_name, tap_name):
                link = r.link(name)
                if link is not None:
                    _del_ingress(r, link.index)
    except FileNotFoundError:
        pass


def _redirect_all_to(ifindex: int) -> bytes:
    """A u32 filter that matches every frame (one key: offset 0, mask 0) and redirects it to the
    egress of ``ifindex`` (`tc filter add ... u32 match u32 0 0 action mirred egress redirect`)."""
    # struct tc_u32_sel: flags, offshift, nkeys, offmask, off, offoff, hoff, hmask; then one key
    # (struct tc_u32_key: mask, val, off, offmask).
    selector = struct.pack("=BBBxHHhhI", _TC_U32_TERMINAL, 0, 1, 0, 0, 0, 0, 0)
    selector += struct.pack("=IIii", 0, 0, 0, 0)
    # struct tc_mirred: tc_gen (index, capab, action, refcnt, bindcnt), eaction, ifindex.
    mirred = struct.pack("=IIiiiiI", 0, 0, _TC_ACT_STOLEN, 0, 0, _TCA_EGRESS_REDIR, ifindex)
    action = nested(1, attr(_TCA_ACT_KIND, b"mirred\0"),
                    nested(_TCA_ACT_OPTIONS, attr(_TCA_MIRRED_PARMS, mirred)))
    options = nested(_TCA_OPTIONS, attr(_TCA_U32_CLASSID, struct.pack("=I", _FLOWID)),
                     attr(_TCA_U32_SEL, selector), nested(_TCA_U32_ACT, action))
    return attr(_TCA_KIND, b"u32\0") + options


def _index(r: Rtnl, name: str) -> int:
    link = r.link(name)
    if link is None:
        raise OSError(errno.ENODEV, f"no device {name}")
    return link.index


def _del_ingress(r: Rtnl, index: int) -> None:
    try:
        r.tc(RTM_DELQDISC, index, INGRESS, _TC_H_INGRESS)
    except OSError as e:
        if e.errno not in _GONE:
            raise
