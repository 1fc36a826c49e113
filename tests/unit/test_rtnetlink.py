"""Our rtnetlink requests (kata.utils.rtnetlink; the agent's through Network) against this host's kernel,
in a network namespace of the test's own, checked with iproute2."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import pytest

from tests.support.netns import in_netns, temporary_netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace)")

# Runs in the namespace: UpdateInterface and UpdateRoutes as the host would send them for a pod's eth0.
SCRIPT = """
import sys
from kata.guest.agent.network import Network, NetworkError
from kata.protocols import agent_pb2 as pb
net = Network()
iface = pb.Interface(device="kdummy0", name="eth0", mtu=1400, hw_addr="02:42:0a:58:00:07", ip_addresses=[
    pb.IPAddress(family=pb.v4, address="10.88.0.7", mask="16"),
    pb.IPAddress(family=pb.v6, address="fd00::7", mask="64")])
net.update_interface(iface)
iface.device = "eth0"
net.update_interface(iface)  # again: the addresses are replaced, not added twice
net.update_routes(pb.Routes(routes=[
    pb.Route(dest="default", gateway="10.88.0.1", device="eth0", family=pb.v4),
    pb.Route(dest="10.99.0.0/24", device="eth0", source="10.88.0.7", family=pb.v4),
    pb.Route(dest="default", gateway="fd00::1", device="eth0", family=pb.v6)]))
try:
    net.update_interface(pb.Interface(device="nope0"))
except NetworkError as e:
    print("refused:", e)
try:
    net.update_routes(pb.Routes(routes=[pb.Route(dest="10.1.0.0/16", gateway="192.0.2.1", device="eth0")]))
except NetworkError as e:
    print("refused:", e)
"""


@pytest.fixture
def netns() -> Iterator[str]:
    with temporary_netns("ktrtnl") as name:
        # (a veth pair: this host's kernel has no dummy links)
        in_netns(name, "ip", "link", "add", "kdummy0", "type", "veth", "peer", "name", "kpeer0")
        in_netns(name, "ip", "link", "set", "kpeer0", "up")
        yield name


def _json(ns: str, *args: str) -> list[dict]:  # type: ignore[type-arg]
    return json.loads(in_netns(ns, "ip", "-j", *args).stdout)  # type: ignore[no-any-return]


def test_update_interface_and_routes(netns: str) -> None:
    env_path = os.pathsep.join(sys.path)
    out = in_netns(netns, "env", f"PYTHONPATH={env_path}", sys.executable, "-c", SCRIPT).stdout
    (link,) = _json(netns, "addr", "show", "dev", "eth0")
    assert link["mtu"] == 1400 and link["address"] == "02:42:0a:58:00:07" and "UP" in link["flags"]
    addrs = sorted((a["local"], a["prefixlen"]) for a in link["addr_info"] if a.get("scope") == "global")
    assert addrs == [("10.88.0.7", 16), ("fd00::7", 64)]
    routes = {(r["dst"], r.get("gateway"), r.get("prefsrc")) for r in _json(netns, "route", "show")}
    assert ("default", "10.88.0.1", None) in routes and ("10.99.0.0/24", None, "10.88.0.7") in routes
    routes6 = _json(netns, "-6", "route", "show")
    assert any(r["dst"] == "default" and r.get("gateway") == "fd00::1" for r in routes6), routes6
    # Errors are one line naming what failed, with the kernel's reason.
    assert "refused: no link named 'nope0'" in out
    assert "refused: route 10.1.0.0/16: " in out and "unreachable" in out.lower()


def test_delete_link_by_name(netns: str) -> None:
    script = ("from kata.utils.rtnetlink import Rtnl\n"
              "with Rtnl() as r:\n"
              "    print(r.delete_link('kpeer0'), r.delete_link('kpeer0'))\n")
    env_path = os.pathsep.join(sys.path)
    out = in_netns(netns, "env", f"PYTHONPATH={env_path}", sys.executable, "-c", script).stdout
    assert out.split() == ["True", "False"]  # deleted, then nothing of that name
    names = {link["ifname"] for link in _json(netns, "link", "show")}
    assert names == {"lo"}, names  # the veth's other end went with it


def test_dumps_read_what_iproute2_made(netns: str) -> None:
    """Links (kind, alias, a tap's type), addresses, routes (table, source) and neighbours (state),
    as the host reads a pod's endpoints: from a socket made inside the namespace."""
    from kata.network import rtnl
    from kata.utils.rtnetlink import RT_TABLE_MAIN

    in_netns(netns, "ip", "link", "set", "kdummy0", "address", "02:42:0a:58:00:07", "mtu", "1400",
             "alias", "the pod's", "up")
    in_netns(netns, "ip", "addr", "add", "10.88.0.7/16", "dev", "kdummy0")
    in_netns(netns, "ip", "route", "add", "10.99.0.0/24", "dev", "kdummy0", "src", "10.88.0.7",
             "table", "1000")
    in_netns(netns, "ip", "route", "add", "default", "via", "10.88.0.1")
    in_netns(netns, "ip", "neigh", "add", "10.88.0.1", "lladdr", "02:42:0a:58:00:01", "dev", "kdummy0",
             "nud", "permanent")
    in_netns(netns, "ip", "tuntap", "add", "ktap0", "mode", "tap")
    with rtnl(netns) as r:
        links = {link.name: link for link in r.links()}
        eth = links["kdummy0"]
        assert (eth.kind, eth.mac, eth.mtu, eth.alias, eth.flags & 1) == ("veth", "02:42:0a:58:00:07", 1400,
                                                                         "the pod's", 1)
        assert (links["ktap0"].kind, links["ktap0"].tun_type) == ("tun", 2)
        assert r.link("ktap0") == links["ktap0"] and r.link("nope0") is None
        assert r.link("x" * 16) is None and r.link("") is None  # names no link can have
        assert (eth.index, 2, 16, bytes([10, 88, 0, 7])) in r.all_addresses()
        routes = [(x.dst, x.dst_len, x.gateway, x.source, x.table, x.oif) for x in r.routes(2)]
        assert ("10.99.0.0", 24, "", "10.88.0.7", 1000, eth.index) in routes
        assert ("", 0, "10.88.0.1", "", RT_TABLE_MAIN, eth.index) in routes
        neigh = [(n.dst, n.mac, n.index, n.state & 0x80) for n in r.neighbours()]
        assert ("10.88.0.1", "02:42:0a:58:00:01", eth.index, 0x80) in neigh


class _ScriptedSocket:
    """A netlink socket that answers each request with the next scripted datagrams (``seq`` filled in)."""

    def __init__(self, answers: list[list[tuple[int, int, bytes]]]) -> None:
        self.answers = answers
        self.queue: list[bytes] = []
        self.sent = 0

    def send(self, data: bytes) -> int:
        import struct

        seq = struct.unpack_from("=IHHII", data)[3]
        self.queue = [struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body
                      for kind, flags, body in self.answers[self.sent]]
        self.sent += 1
        return len(data)

    def recv(self, _size: int) -> bytes:
        if not self.queue:
            raise BlockingIOError
        return self.queue.pop(0)

    def settimeout(self, _t: float | None) -> None:
        pass

    def close(self) -> None:
        pass


def test_an_interrupted_dump_is_taken_again() -> None:
    """NLM_F_DUMP_INTR: the table changed during the dump, whose parts are then not all there is."""
    import struct

    from kata.utils.rtnetlink import NLM_F_DUMP_INTR, RTM_NEWLINK, Rtnl

    link = struct.pack("=BxHiII", 0, 1, 7, 1, 0)
    done = (3, 0, struct.pack("=i", 0))
    r = Rtnl()
    r.sock.close()
    r.sock = _ScriptedSocket([[(RTM_NEWLINK, NLM_F_DUMP_INTR, link), done],  # type: ignore[assignment]
                              [(RTM_NEWLINK, 0, link), done]])
    assert [x.index for x in r.links()] == [7]
    assert r.sock.sent == 2  # type: ignore[attr-defined]
    r.sock = _ScriptedSocket([[(RTM_NEWLINK, NLM_F_DUMP_INTR, link), done]] * 3)  # type: ignore[assignment]
    with pytest.raises(InterruptedError):
        r.links()
    r.sock = _ScriptedSocket([[(3, 0, struct.pack("=i", -16))]])  # type: ignore[assignment]
    with pytest.raises(OSError, match="busy"):  # a dump the kernel ended with an error
        r.links()
