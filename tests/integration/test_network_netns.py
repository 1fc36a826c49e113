"""Endpoint discovery and the tcfilter veth<->tap wiring, in real network namespaces made per test.

Each test gets two namespaces, `c` (the container's, where discovery and tcfilter act) and `p` (the
peer side, where the other ends of the veths live), and removes both whatever happens.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kata.network.endpoints import Endpoint, Neighbour, Route, discover
from kata.network.tcfilter import connect, create_tap, disconnect, tap_name
from kata.utils.netns import delete_link
from tests.support.netns import call_in_netns, temporary_netns

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc") and os.path.exists("/dev/net/tun")),
    reason="needs root, iproute2 and /dev/net/tun",
)


TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def open_tap(ns: str, name: str) -> int:
    """Attach to the tap `name` of namespace `ns`, as QEMU does: an fd of raw Ethernet frames.
    /dev/net/tun finds the name in the opening thread's namespace, so a thread joins `ns` to open it."""
    def attach() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        except OSError:
            os.close(fd)
            raise
        return fd

    return call_in_netns(ns, attach)


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def netns_list() -> str:
    return sh("ip", "netns", "list")


@dataclass
class Pair:
    c: str  # the container's namespace
    p: str  # the peer side

    def ip(self, ns: str, *args: str) -> str:
        return sh("ip", "-n", ns, *args)

    def veth(self, name: str, peer: str, mac: str, mtu: int = 1500) -> None:
        """`name` in c, `peer` in p, both up."""
        self.ip(self.c, "link", "add", name, "address", mac, "mtu", str(mtu),
                "type", "veth", "peer", "name", peer, "netns", self.p)
        self.ip(self.p, "link", "set", peer, "mtu", str(mtu), "up")
        self.ip(self.c, "link", "set", name, "up")


@pytest.fixture
def pair() -> Iterator[Pair]:
    with temporary_netns("kt") as c, temporary_netns("kp") as p:
        yield Pair(c, p)
    listed = netns_list()
    assert c not in listed and p not in listed


def index_of(pair: Pair, name: str) -> int:
    return int(pair.ip(pair.c, "-o", "link", "show", name).split(":", 1)[0])


def wait_link_local(pair: Pair, dev: str) -> None:
    deadline = time.monotonic() + 5
    while "fe80::" not in pair.ip(pair.c, "-6", "addr", "show", "dev", dev):
        assert time.monotonic() < deadline, f"no IPv6 link-local address on {dev}"
        time.sleep(0.05)


def test_discover_returns_exactly_the_configured_interfaces(pair: Pair) -> None:
    c = pair.c
    pair.veth("eth0", "peer0", "02:42:ac:1e:00:02", mtu=1400)
    pair.ip(c, "addr", "add", "172.30.0.2/24", "dev", "eth0")
    pair.ip(c, "-6", "addr", "add", "fd00:30::2/64", "dev", "eth0", "nodad")
    pair.ip(c, "route", "add", "default", "via", "172.30.0.1")
    pair.ip(c, "route", "add", "10.50.0.0/16", "via", "172.30.0.254")
    pair.ip(c, "-6", "route", "add", "default", "via", "fd00:30::1")
    pair.ip(c, "neigh", "add", "172.30.0.1", "lladdr", "02:42:ac:1e:00:01", "dev", "eth0", "nud", "permanent")
    pair.ip(c, "neigh", "add", "172.30.0.9", "lladdr", "02:42:ac:1e:00:09", "dev", "eth0", "nud", "reachable")
    pair.veth("eth1", "peer1", "02:00:00:00:01:01")
    pair.ip(c, "addr", "add", "192.168.77.5/24", "dev", "eth1")
    pair.ip(c, "route", "add", "10.60.0.0/24", "dev", "eth1", "src", "192.168.77.5")
    pair.ip(c, "route", "add", "10.61.0.0/24", "via", "192.168.77.1")
    pair.ip(c, "link", "add", "mv0", "link", "eth1", "address", "02:00:00:00:02:01", "type", "macvlan")
    pair.ip(c, "addr", "add", "192.168.78.5/24", "dev", "mv0")
    pair.ip(c, "link", "set", "mv0", "up")
    pair.ip(c, "link", "add", "eth2", "address", "02:00:00:00:03:01", "type", "veth",
            "peer", "name", "eth2p", "address", "02:00:00:00:03:02")  # both ends here, both down
    create_tap(c, tap_name(0), 1400)  # ours: a rescan must not mirror it
    wait_link_local(pair, "eth0")
    pair.ip(c, "link", "set", "lo", "up")

    got = discover(c)

    expected = [
        Endpoint("eth0", index_of(pair, "eth0"), "veth", "02:42:ac:1e:00:02", 1400, True,
                 ((4, "172.30.0.2", 24), (6, "fd00:30::2", 64)),
                 (Route("default", "172.30.0.1", "eth0", 0, 4),
                  Route("10.50.0.0/16", "172.30.0.254", "eth0", 0, 4),
                  Route("default", "fd00:30::1", "eth0", 0, 6)),
                 (Neighbour("172.30.0.1", "02:42:ac:1e:00:01", "eth0", 4),)),
        Endpoint("eth1", index_of(pair, "eth1"), "veth", "02:00:00:00:01:01", 1500, True,
                 ((4, "192.168.77.5", 24),),
                 (Route("10.60.0.0/24", "", "eth1", 253, 4, source="192.168.77.5"),
                  Route("10.61.0.0/24", "192.168.77.1", "eth1", 0, 4))),
        Endpoint("mv0", index_of(pair, "mv0"), "macvlan", "02:00:00:00:02:01", 1500, True,
                 ((4, "192.168.78.5", 24),), ()),
        Endpoint("eth2", index_of(pair, "eth2"), "veth", "02:00:00:00:03:01", 1500, False, (), ()),
        Endpoint("eth2p", index_of(pair, "eth2p"), "veth", "02:00:00:00:03:02", 1500, False, (), ()),
    ]
    assert sorted(got, key=lambda e: e.index) == sorted(expected, key=lambda e: e.index)


def test_discover_accepts_netns_paths(pair: Pair) -> None:
    pair.veth("eth0", "peer0", "02:42:ac:1e:00:02")
    pair.ip(pair.c, "addr", "add", "172.30.0.2/24", "dev", "eth0")
    by_name = discover(pair.c)
    assert [e.name for e in by_name] == ["eth0"]
    assert discover(f"/run/netns/{pair.c}") == by_name
    sleeper = subprocess.Popen(["ip", "netns", "exec", pair.c, "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        # `ip netns exec` enters the namespace and then execs sleep: wait until it is in there (its
        # command line names sleep from the start).
        inside = os.stat(f"/run/netns/{pair.c}").st_ino
        while os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino != inside:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert discover(f"/proc/{sleeper.pid}/ns/net") == by_name
    finally:
        sleeper.kill()
        sleeper.wait()
    assert [e.name for e in discover(None)] != ["eth0"]  # None: this process's own namespace


def test_discover_of_a_missing_namespace_fails_without_creating_it() -> None:
    name = f"kt-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(FileNotFoundError):
        discover(name)
    with pytest.raises(FileNotFoundError):
        discover(f"/run/netns/{name}")
    assert name not in netns_list()


def mirred_filters(ns: str, dev: str) -> list[str]:
    out = sh("tc", "-n", ns, "-s", "filter", "show", "dev", dev, "ingress")
    return [line.strip() for line in out.splitlines() if "mirred" in line]


def test_connect_adds_redirects_both_ways_and_disconnect_removes_them(pair: Pair) -> None:
    c, tap = pair.c, tap_name(0)
    pair.veth("eth0", "peer0", "02:42:ac:1e:00:02", mtu=1400)
    create_tap(c, tap, 1400, mac="02:42:ac:1e:00:02")
    assert "mtu 1400" in pair.ip(c, "link", "show", tap)
    assert "tun type tap" in pair.ip(c, "-d", "link", "show", tap)

    connect(c, "eth0", tap)
    connect(c, "eth0", tap)  # again: replaces, does not stack

    assert mirred_filters(c, "eth0") == [f"action order 1: mirred (Egress Redirect to device {tap}) stolen"]
    assert mirred_filters(c, tap) == ["action order 1: mirred (Egress Redirect to device eth0) stolen"]

    disconnect(c, "eth0", tap)
    for dev in ("eth0", tap):
        assert sh("tc", "-n", c, "qdisc", "show", "dev", dev, "ingress") == ""
        assert sh("tc", "-n", c, "filter", "show", "dev", dev, "ingress") == ""
    disconnect(c, "eth0", tap)  # idempotent
    delete_link(c, tap)
    assert tap not in pair.ip(c, "link", "show")
    disconnect(c, "eth0", tap)  # the tap already gone
    delete_link(c, tap)
    disconnect(f"/run/netns/kt-gone-{uuid.uuid4().hex[:8]}", "eth0", tap)  # the namespace gone
    delete_link(f"/run/netns/kt-gone-{uuid.uuid4().hex[:8]}", tap)


# --- traffic through the redirects -------------------------------------------------------------------

C_MAC, P_IP, C_IP = "02:42:ac:1e:00:02", "10.77.0.1", "10.77.0.2"


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(
    dst_mac: str, src_mac: str, src: str, dst: str, sport: int, dport: int, payload: bytes
) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # checksum 0: none (IPv4)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x08\x00" + ip + udp


def read_frame_with(fd: int, needle: bytes, timeout: float) -> bytes | None:
    """The first frame read from the tap fd that contains `needle` (IPv6 chatter is skipped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            frame = os.read(fd, 65536)
            if needle in frame:
                return frame
    return None


def test_traffic_flows_between_peer_and_tap_both_ways(pair: Pair) -> None:
    c, p, tap = pair.c, pair.p, tap_name(0)
    pair.veth("eth0", "peer0", C_MAC)
    pair.ip(p, "addr", "add", f"{P_IP}/24", "dev", "peer0")
    # Nothing in c answers ARP for the guest's address (eth0's ingress goes to the tap): a static entry.
    pair.ip(p, "neigh", "add", C_IP, "lladdr", C_MAC, "dev", "peer0", "nud", "permanent")
    p_mac = pair.ip(p, "-o", "link", "show", "peer0").split("link/ether ")[1].split()[0]
    create_tap(c, tap, 1500)
    connect(c, "eth0", tap)
    fd = open_tap(c, tap)  # stands in for QEMU: the guest side of the tap
    # A socket belongs to the namespace of the thread that made it.
    sender = call_in_netns(p, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    receiver = call_in_netns(p, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        receiver.bind((P_IP, 5556))
        receiver.settimeout(5)

        # peer -> veth ingress -> tap egress -> the fd
        sender.sendto(b"to-the-guest", (C_IP, 5555))
        frame = read_frame_with(fd, b"to-the-guest", timeout=5)
        assert frame is not None, "the peer's packet did not come out of the tap"
        assert (frame[:6], frame[6:12], frame[12:14]) == (mac_bytes(C_MAC), mac_bytes(p_mac), b"\x08\x00")

        # the fd -> tap ingress -> veth egress -> peer's socket
        os.write(fd, udp_frame(p_mac, C_MAC, C_IP, P_IP, 4444, 5556, b"from-the-guest"))
        data, (src, sport) = receiver.recvfrom(2048)
        assert (data, src, sport) == (b"from-the-guest", C_IP, 4444)

        # Without the filters the path is gone: the redirects were what carried the traffic.
        disconnect(c, "eth0", tap)
        sender.sendto(b"after-disconnect", (C_IP, 5555))
        assert read_frame_with(fd, b"after-disconnect", timeout=0.5) is None
    finally:
        sender.close()
        receiver.close()
        os.close(fd)
        delete_link(c, tap)
    assert tap not in pair.ip(c, "link", "show")
    assert sh("tc", "-n", c, "qdisc", "show", "dev", "eth0", "ingress") == ""
