"""A few rtnetlink requests (links, addresses, routes) over a raw socket, standard library only.

The guest agent's (UpdateInterface used to run busybox `ip` six times: six fork+execs, which under
TCG cost more than the requests; the guest has no netlink library), and the host's where loading
pyroute2 (kata.network, ~0.07 s) would cost more than the request. Each request asks for an
acknowledgement, so a refusal is an OSError with the kernel's errno.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE = 24
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_CREATE = 0x100, 0x400
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU = 1, 3, 4
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC = 1, 4, 5, 7
RT_TABLE_MAIN, RTPROT_BOOT, RTN_UNICAST = 254, 3, 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
IFF_UP = 0x1

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")


def _attr(kind: int, data: bytes) -> bytes:
    raw = _RTATTR.pack(_RTATTR.size + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, pos)
        if length < _RTATTR.size:
            return
        yield kind, data[pos + _RTATTR.size:pos + length]
        pos += (length + 3) & ~3


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
                if kind == NLMSG_DONE:
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

    # -- links ------------------------------------------------------------------------------------

    def set_link(self, index: int, *, up: bool | None = None, name: str = "", mtu: int = 0,
                 address: str = "") -> None:
        flags = IFF_UP if up else 0
        change = IFF_UP if up is not None else 0
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)
        if name:
            body += _attr(IFLA_IFNAME, name.encode() + b"\0")
        if mtu:
            body += _attr(IFLA_MTU, struct.pack("=I", mtu))
        if address:
            body += _attr(IFLA_ADDRESS, bytes.fromhex(address.replace(":", "")))
        self.request(RTM_NEWLINK, body)

    def delete_link(self, name: str) -> bool:
        """Delete link ``name`` (of the namespace the socket was opened in); False if there is none."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _attr(IFLA_IFNAME, name.encode() + b"\0")
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
        found = []
        seq = self._send(RTM_GETADDR, NLM_F_DUMP, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))
        for kind, payload in self._replies(seq):
            if kind != RTM_NEWADDR:
                continue
            family, prefix, _flags, _scope, ifindex = _IFADDRMSG.unpack_from(payload)
            if ifindex != index:
                continue
            attrs = dict(_attrs(payload[_IFADDRMSG.size:]))
            address = attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))
            if address is not None:
                found.append((family, prefix, address))
        return found

    def flush_addresses(self, index: int) -> None:
        for family, prefix, address in self.addresses(index):
            body = _IFADDRMSG.pack(family, prefix, 0, 0, index) + _attr(IFA_LOCAL, address)
            try:
                self.request(RTM_DELADDR, body)
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL:  # gone with another (a v4 primary takes its secondaries)
                    raise

    def add_address(self, index: int, address: str, prefix: int) -> None:
        family, packed = _ip_bytes(address)
        body = _IFADDRMSG.pack(family, prefix, 0, 0, index)
        body += _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
        self.request(RTM_NEWADDR, body, NLM_F_CREATE | NLM_F_REPLACE)

    # -- routes -----------------------------------------------------------------------------------

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
            attrs += _attr(RTA_DST, net.network_address.packed)
        if gateway:
            family, packed = _ip_bytes(gateway)
            attrs += _attr(RTA_GATEWAY, packed)
        if index:
            attrs += _attr(RTA_OIF, struct.pack("=i", index))
        if source:
            attrs += _attr(RTA_PREFSRC, _ip_bytes(source)[1])
        if scope is None:
            scope = RT_SCOPE_LINK if family == socket.AF_INET and not gateway else RT_SCOPE_UNIVERSE
        body = _RTMSG.pack(family, prefix, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
        self.request(RTM_NEWROUTE, body + attrs, NLM_F_CREATE | NLM_F_REPLACE)
