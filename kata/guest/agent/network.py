"""UpdateInterface / UpdateRoutes: rtnetlink requests of our own (kata.utils.rtnetlink)."""

from __future__ import annotations

import os
import socket

from kata.protocols import agent_pb2 as pb
from kata.utils.rtnetlink import Rtnl

SYS_NET = "/sys/class/net"
# An address given without a mask is a host address, as for `ip addr add`.
_HOST_PREFIX = {pb.v4: 32, pb.v6: 128}


class NetworkError(Exception):
    pass


_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def loopback_up() -> None:
    """The VM's loopback, up as in any container's network namespace (127.0.0.1 must answer).
    Two ioctls at boot, rather than running `ip`."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
        flags = struct.unpack("16sH14x", ifr)[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


class Network:
    def __init__(self, sys_net: str = SYS_NET) -> None:
        self.sys_net = sys_net

    def link_by_mac(self, mac: str) -> str:
        mac = mac.lower()
        for name in sorted(os.listdir(self.sys_net)):
            try:
                with open(os.path.join(self.sys_net, name, "address")) as f:
                    if f.read().strip().lower() == mac:
                        return name
            except OSError:
                continue
        raise NetworkError(f"no link with hardware address {mac}")

    def update_interface(self, iface: pb.Interface) -> pb.Interface:
        """The link named ``device`` (or the one with ``current_hw_addr``, or with ``hw_addr``, or
        named ``name``) gets the name, MTU, hardware address and IP addresses given, and is up."""
        found_by = iface.current_hw_addr or iface.hw_addr
        dev = iface.device or (self.link_by_mac(found_by) if found_by else iface.name)
        if not dev:
            raise NetworkError("interface has neither device, name nor hw_addr")
        try:
            index = socket.if_nametoindex(dev)
        except OSError:
            raise NetworkError(f"no link named {dev!r}") from None
        try:
            with Rtnl() as nl:
                nl.set_link(index, up=False)
                # The hardware address too, unless the link was found by it (it has it then).
                address = iface.hw_addr if iface.hw_addr and (iface.device or iface.current_hw_addr) else ""
                name = iface.name if iface.name and iface.name != dev else ""
                if name or iface.mtu or address:
                    nl.set_link(index, name=name, mtu=iface.mtu, address=address)
                nl.flush_addresses(index)
                for a in iface.ip_addresses:
                    nl.add_address(index, a.address, int(a.mask) if a.mask else _HOST_PREFIX[a.family])
                nl.set_link(index, up=True)
        except (OSError, ValueError) as e:
            raise NetworkError(f"interface {dev}: {e}") from None
        out = pb.Interface()
        out.CopyFrom(iface)
        out.device = out.name = name or dev
        return out

    def update_routes(self, routes: pb.Routes) -> pb.Routes:
        # Link-scope routes first: a gateway must be reachable before a route through it is added.
        ordered = sorted(routes.routes, key=lambda r: 0 if not r.gateway else 1)
        with Rtnl() as nl:
            for r in ordered:
                try:
                    index = socket.if_nametoindex(r.device) if r.device else 0
                    nl.replace_route(r.dest or "default", gateway=r.gateway, index=index, source=r.source,
                                     scope=r.scope or None,
                                     family=socket.AF_INET6 if r.family == pb.v6 else socket.AF_INET)
                except (OSError, ValueError) as e:
                    raise NetworkError(f"route {r.dest or 'default'}: {e}") from None
        return routes
