"""UpdateInterface / UpdateRoutes through the `ip` tool (busybox in the guest): plain netlink, no library."""

from __future__ import annotations

import os

from kata.guest.agent.reaper import Reaper
from kata.protocols import agent_pb2 as pb

SYS_NET = "/sys/class/net"
_SCOPES = {0: "global", 200: "site", 253: "link", 254: "host"}


class NetworkError(Exception):
    pass


def ip_tool() -> list[str]:
    import shutil  # networking RPCs come after start-up; keep shutil off the boot path

    found = shutil.which("ip")
    if found:
        return [found]
    for bb in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(bb):
            return [bb, "ip"]
    raise NetworkError("no ip tool in the guest")


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
    def __init__(self, reaper: Reaper, sys_net: str = SYS_NET) -> None:
        self.reaper = reaper
        self.sys_net = sys_net

    def _ip(self, *args: str) -> None:
        r, w = os.pipe()
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        try:
            fut = self.reaper.spawn([*ip_tool(), *args], stdin=null, stdout=w, stderr=w)
            os.close(w)
            w = -1
            out = b""
            while chunk := os.read(r, 4096):
                out += chunk
            code = fut.wait(30.0)
        finally:
            for fd in (r, w, null):
                if fd >= 0:
                    os.close(fd)
        if code != 0:
            msg = out.decode(errors="replace").strip().replace("\n", "; ")
            raise NetworkError(f"ip {' '.join(args)}: {msg or f'exit {code}'}")

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
        dev = iface.device or (self.link_by_mac(iface.hw_addr) if iface.hw_addr else iface.name)
        if not dev:
            raise NetworkError("interface has neither device, name nor hw_addr")
        self._ip("link", "set", "dev", dev, "down")
        if iface.name and iface.name != dev:
            self._ip("link", "set", "dev", dev, "name", iface.name)
            dev = iface.name
        if iface.mtu:
            self._ip("link", "set", "dev", dev, "mtu", str(iface.mtu))
        self._ip("addr", "flush", "dev", dev)
        for a in iface.ip_addresses:
            fam = "-6" if a.family == pb.v6 else "-4"
            addr = f"{a.address}/{a.mask}" if a.mask else a.address
            self._ip(fam, "addr", "add", addr, "dev", dev)
        self._ip("link", "set", "dev", dev, "up")
        out = pb.Interface()
        out.CopyFrom(iface)
        out.device = dev
        out.name = dev
        return out

    def update_routes(self, routes: pb.Routes) -> pb.Routes:
        # Link-scope routes first: a gateway must be reachable before a route through it is added.
        ordered = sorted(routes.routes, key=lambda r: 0 if not r.gateway else 1)
        for r in ordered:
            args = ["-6" if r.family == pb.v6 else "-4", "route", "replace", r.dest or "default"]
            if r.gateway:
                args += ["via", r.gateway]
            if r.device:
                args += ["dev", r.device]
            if r.source:
                args += ["src", r.source]
            if r.scope:
                args += ["scope", _SCOPES.get(r.scope, str(r.scope))]
            self._ip(*args)
        return routes
