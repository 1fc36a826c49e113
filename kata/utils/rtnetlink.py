"""The rtnetlink requests this project makes (links, addresses, routes, neighbours, tc) over a raw
socket, standard library only.

The guest agent's (UpdateInterface used to run busybox `ip` six times: six fork+execs, which under
TCG cost more than the requests; the guest has no netlink library), and the host's: a pod's
endpoints and the tc filters that mirror them (kata.network), where a netlink library (pyroute2)
cost every shim that mirrors a pod's network 7 MB kept for the pod's life, and 0.06 s to load. Each
request asks for an acknowledgement, so a refusal is an OSError with the kernel's errno.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
RTM_NEWQDISC, RTM_DELQDISC = 36, 37
RTM_NEWTFILTER = 44
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_DUMP = 0x300
NLM_F_DUMP_INTR = 0x10
_DUMP_ATTEMPTS = 3
_IFNAMSIZ = 16
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_IFALIAS, IFLA_NET_NS_FD = 1, 3, 4, 18, 20, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_TUN_TYPE = 3
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 7, 15
NDA_DST, NDA_LLADDR = 1, 2
RT_TABLE_MAIN, RTPROT_BOOT, RTN_UNICAST = 254, 3, 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
IFF_UP = 0x1
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # an attribute's type without NLA_F_NESTED and NLA_F_NET_BYTEORDER

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")
_TCMSG = struct.Struct("=BxxxiIII")
_RTATTR = struct.Struct("=HH")


def attr(kind: int, data: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    raw = _RTATTR.pack(_RTATTR.size + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, pos)
        if length < _RTATTR.size:
            return
        yield kind & NLA_TYPE_MASK, data[pos + _RTATTR.size:pos + length]
        pos += (length + 3) & ~3


def _text(data: bytes | None) -> str:
    return data.split(b"\0", 1)[0].decode(errors="replace") if data else ""


def _mac(data: bytes | None) -> str:
    return ":".join(f"{b:02x}" for b in data) if data else ""


def _ip(family: int, data: bytes | None) -> str:
    if not data:
        return ""
    return str(ipaddress.ip_address(data)) if family in (socket.AF_INET, socket.AF_INET6) else ""


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    flags: int  # IFF_*
    mtu: int
    mac: str  # "" for a link without one
    kind: str  # IFLA_INFO_KIND ("veth", "tun", ...), "" when the kernel names none
    alias: str
    tun_type: int = 0  # a tun link's IFF_TUN (1) or IFF_TAP (2)


@dataclass(frozen=True)
class RouteEntry:
    family: int  # AF_INET or AF_INET6
    dst: str  # "" for a default route
    dst_len: int
    gateway: str
    oif: int  # 0 when the route has none (a multipath route)
    source: str  # RTA_PREFSRC
    table: int
    protocol: int
    scope: int
    type: int


@dataclass(frozen=True)
class NeighbourEntry:
    family: int
    index: int
    state: int  # NUD_*
    dst: str
    mac: str


def _ip_bytes(address: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(address)
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), ip.packed


class Rtnl:
    """One NETLINK_ROUTE socket; requests are answered in order (one at a time)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _send(self, kind: int, flags: int, body: bytes) -> int:
        self.seq += 1
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | flags, self.seq, 0)
        self.sock.send(header + body)
        return self.seq

    def _replies(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """(type, payload) of each reply to ``seq`` until its ack or the dump's end; OSError on a NACK."""
        while True:
            data = self.sock.recv(65536)
            pos = 0
            while pos + _NLMSGHDR.size <= len(data):
                length, kind, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, pos)
                if length < _NLMSGHDR.size:
                    raise OSError(errno.EBADMSG, "truncated netlink message")
                payload = data[pos + _NLMSGHDR.size:pos + length]
                pos += (length + 3) & ~3
                if mseq != seq:
                    continue
                if _flags & NLM_F_DUMP_INTR:
                    # The table changed while the kernel dumped it: what came is not all there is.
                    raise InterruptedError(errno.EINTR, "netlink dump interrupted by a change")
                if kind == NLMSG_DONE:
                    code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if code > 0:
                        raise OSError(code, os.strerror(code))
                    return
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return
                yield kind, payload

    def request(self, kind: int, body: bytes, flags: int = 0) -> None:
        for _ in self._replies(self._send(kind, NLM_F_ACK | flags, body)):
            pass

    def dump(self, kind: int, body: bytes) -> list[tuple[int, bytes]]:
        """(type, payload) of every message of a dump, taken again when a change interrupted it."""
        for attempt in range(_DUMP_ATTEMPTS):
            try:
                return list(self._replies(self._send(kind, NLM_F_DUMP, body)))
            except InterruptedError:
                if attempt == _DUMP_ATTEMPTS - 1:
                    raise
                self._drain()
        raise AssertionError("unreachable")

    def _records(self, request: int, header: struct.Struct, reply: int, family: int = socket.AF_UNSPEC
                 ) -> Iterator[tuple[tuple[int, ...], dict[int, bytes]]]:
        """Each ``reply`` of a ``request`` dump of ``family``: its fixed header's fields (``header``,
        whose first field is the family) and its attributes."""
        body = struct.pack("=B", family) + bytes(header.size - 1)
        for kind, payload in self.dump(request, body):
            if kind == reply:
                yield header.unpack_from(payload), dict(_attrs(payload[header.size:]))

    def _drain(self) -> None:
        """Read what is left of an interrupted dump (its other parts and its end)."""
        self.sock.settimeout(0.0)
        try:
            while self.sock.recv(65536):
                pass
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(None)

    # -- links ------------------------------------------------------------------------------------

    def links(self) -> list[Link]:
        return [_link(head, attrs) for head, attrs in self._records(RTM_GETLINK, _IFINFOMSG, RTM_NEWLINK)]

    def link(self, name: str) -> Link | None:
        """The link called ``name``, or None when there is none."""
        if not 0 < len(name.encode()) < _IFNAMSIZ:
            return None  # no link has such a name (the kernel would answer EINVAL)
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr(IFLA_IFNAME, name.encode() + b"\0")
        try:
            for kind, payload in self._replies(self._send(RTM_GETLINK, 0, body)):
                if kind == RTM_NEWLINK:
                    return _link(_IFINFOMSG.unpack_from(payload), dict(_attrs(payload[_IFINFOMSG.size:])))
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return None

    def set_link(self, index: int, *, up: bool | None = None, name: str = "", mtu: int = 0,
                 address: str = "", alias: str | None = None, netns_fd: int | None = None) -> None:
        flags = IFF_UP if up else 0
        change = IFF_UP if up is not None else 0
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)
        if name:
            body += attr(IFLA_IFNAME, name.encode() + b"\0")
        if mtu:
            body += attr(IFLA_MTU, struct.pack("=I", mtu))
        if address:
            body += attr(IFLA_ADDRESS, bytes.fromhex(address.replace(":", "")))
        if alias is not None:
            body += attr(IFLA_IFALIAS, alias.encode())
        if netns_fd is not None:
            body += attr(IFLA_NET_NS_FD, struct.pack("=I", netns_fd))
        self.request(RTM_NEWLINK, body)

    def delete_link(self, name: str) -> bool:
        """Delete link ``name`` (of the namespace the socket was opened in); False if there is none."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr(IFLA_IFNAME, name.encode() + b"\0")
        try:
            self.request(RTM_DELLINK, body)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return False
            raise
        return True

    # -- addresses --------------------------------------------------------------------------------

    def addresses(self, index: int) -> list[tuple[int, int, bytes]]:
        """(family, prefix length, address) of each address on link ``index``."""
        return [(family, prefix, address) for link, family, prefix, address in self.all_addresses()
                if link == index]

    def all_addresses(self) -> list[tuple[int, int, int, bytes]]:
        """(link index, family, prefix length, address) of every address."""
        found = []
        for (family, prefix, _flags, _scope, ifindex), attrs in self._records(RTM_GETADDR, _IFADDRMSG,
                                                                              RTM_NEWADDR):
            # IFA_LOCAL is the link's own address on point-to-point links (IFA_ADDRESS is the peer).
            address = attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))
            if address is not None:
                found.append((ifindex, family, prefix, address))
        return found

    def flush_addresses(self, index: int) -> None:
        for family, prefix, address in self.addresses(index):
            body = _IFADDRMSG.pack(family, prefix, 0, 0, index) + attr(IFA_LOCAL, address)
            try:
                self.request(RTM_DELADDR, body)
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL:  # gone with another (a v4 primary takes its secondaries)
                    raise

    def add_address(self, index: int, address: str, prefix: int) -> None:
        family, packed = _ip_bytes(address)
        body = _IFADDRMSG.pack(family, prefix, 0, 0, index)
        body += attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed)
        self.request(RTM_NEWADDR, body, NLM_F_CREATE | NLM_F_REPLACE)

    # -- routes -----------------------------------------------------------------------------------

    def routes(self, family: int) -> list[RouteEntry]:
        found = []
        for head, attrs in self._records(RTM_GETROUTE, _RTMSG, RTM_NEWROUTE, family):
            fam, dst_len, _src_len, _tos, table, protocol, scope, rtype, _flags = head
            if fam != family:  # a kernel without IPv6 answers an AF_INET6 dump with every family's
                continue
            if RTA_TABLE in attrs:  # tables past 255 are only here
                table = struct.unpack("=I", attrs[RTA_TABLE][:4])[0]
            oif = attrs.get(RTA_OIF)
            found.append(RouteEntry(
                family=fam, dst=_ip(fam, attrs.get(RTA_DST)), dst_len=dst_len,
                gateway=_ip(fam, attrs.get(RTA_GATEWAY)), oif=struct.unpack("=i", oif[:4])[0] if oif else 0,
                source=_ip(fam, attrs.get(RTA_PREFSRC)), table=table, protocol=protocol, scope=scope,
                type=rtype))
        return found

    def replace_route(self, dest: str, *, gateway: str = "", index: int = 0, source: str = "",
                      scope: int | None = None, family: int = socket.AF_INET) -> None:
        """`ip route replace DEST [via GATEWAY] [dev] [src SOURCE] [scope SCOPE]`; DEST "default" or
        a CIDR. The scope defaults as ip's does: link for an IPv4 route with no gateway, else global."""
        attrs = b""
        prefix = 0
        if dest and dest != "default":
            net = ipaddress.ip_network(dest, strict=False)
            family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
            prefix = net.prefixlen
            attrs += attr(RTA_DST, net.network_address.packed)
        if gateway:
            family, packed = _ip_bytes(gateway)
            attrs += attr(RTA_GATEWAY, packed)
        if index:
            attrs += attr(RTA_OIF, struct.pack("=i", index))
        if source:
            attrs += attr(RTA_PREFSRC, _ip_bytes(source)[1])
        if scope is None:
            scope = RT_SCOPE_LINK if family == socket.AF_INET and not gateway else RT_SCOPE_UNIVERSE
        body = _RTMSG.pack(family, prefix, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
        self.request(RTM_NEWROUTE, body + attrs, NLM_F_CREATE | NLM_F_REPLACE)

    # -- neighbours -------------------------------------------------------------------------------

    def neighbours(self) -> list[NeighbourEntry]:
        return [NeighbourEntry(family, index, state, _ip(family, attrs.get(NDA_DST)),
                               _mac(attrs.get(NDA_LLADDR)))
                for (family, index, state, _flags, _type), attrs in self._records(RTM_GETNEIGH, _NDMSG,
                                                                                  RTM_NEWNEIGH)]

    # -- traffic control --------------------------------------------------------------------------

    def tc(self, kind: int, index: int, handle: int, parent: int, info: int = 0, attrs: bytes = b"",
           flags: int = 0) -> None:
        """A tc request (qdisc or filter) on link ``index``."""
        self.request(kind, _TCMSG.pack(socket.AF_UNSPEC, index, handle, parent, info) + attrs, flags)


def nested(kind: int, *attrs: bytes) -> bytes:
    """An attribute holding other attributes."""
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def _link(head: tuple[int, ...], attrs: dict[int, bytes]) -> Link:
    _family, _type, index, flags, _change = head
    info = dict(_attrs(attrs.get(IFLA_LINKINFO, b"")))
    data = dict(_attrs(info.get(IFLA_INFO_DATA, b"")))
    mtu = attrs.get(IFLA_MTU)
    tun_type = data.get(IFLA_TUN_TYPE)
    return Link(index=index, name=_text(attrs.get(IFLA_IFNAME)), flags=flags,
                mtu=struct.unpack("=I", mtu[:4])[0] if mtu else 0, mac=_mac(attrs.get(IFLA_ADDRESS)),
                kind=_text(info.get(IFLA_INFO_KIND)), alias=_text(attrs.get(IFLA_IFALIAS)),
                tun_type=tun_type[0] if tun_type else 0)
