"""A network interface hot-added into a running VM: QEMU opens a tap of the container's network
namespace, the guest sees a virtio-net device with the given MAC, the agent configures it, and
traffic flows between the namespace and the VM. (The mirroring of the namespace's veth onto the tap
is the networking issue's; here the tap itself carries the host side's address.)"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata.bundles import make_busybox_bundle
from tests.conftest import leftovers, runtime_bin

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("needs_guest")]

TIMEOUT = 120
MAC = "02:42:0a:4d:00:02"


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def in_ns(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # nsenter rather than `ip netns exec`, which remounts /sys (FACTS.md).
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *cmd], capture_output=True, text=True,
                          check=check, timeout=30)


def test_hot_added_nic_reaches_the_namespace(tmp_path: Path, netns: str, cid: str) -> None:
    from kata.hypervisor.qemu import Qemu
    from kata.protocols import agent_pb2 as pb
    from kata.runtime.operations import agent_of
    from kata.runtime.records import ContainerStore

    in_ns(netns, "ip", "link", "set", "lo", "up")
    in_ns(netns, "ip", "tuntap", "add", "dev", "ktap0", "mode", "tap")
    in_ns(netns, "ip", "addr", "add", "10.77.0.1/24", "dev", "ktap0")
    in_ns(netns, "ip", "link", "set", "ktap0", "up")

    bundle = make_busybox_bundle(tmp_path / "b", ["sleep", "1000"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    spec["linux"]["namespaces"].append({"type": "network", "path": f"/run/netns/{netns}"})
    (bundle / "config.json").write_text(json.dumps(spec))
    root = tmp_path / "root"
    cli = [runtime_bin(), "--root", str(root)]
    with open(tmp_path / "out", "wb") as out:
        subprocess.run([*cli, "create", "--bundle", str(bundle), cid], check=True, stdout=out, stderr=out,
                       stdin=subprocess.DEVNULL, timeout=TIMEOUT)
    qemu = Qemu.attach(Path("/run/vc/vm") / cid)
    try:
        subprocess.run([*cli, "start", cid], check=True, capture_output=True, timeout=TIMEOUT)
        qemu.hotplug_nic(0, "ktap0", MAC, 1500)
        iface = pb.Interface(name="eth0", hw_addr=MAC, mtu=1500,
                             ip_addresses=[pb.IPAddress(family=pb.v4, address="10.77.0.2", mask="24")])
        with agent_of(ContainerStore(root).load(cid)) as agent:
            for _ in range(100):  # the guest's PCIe hotplug takes a moment
                try:
                    agent.update_interface(interface=iface)
                    break
                except Exception as exc:  # noqa: BLE001 - "no link with that MAC" until it is there
                    last = exc
                    subprocess.run(["sleep", "0.1"])
            else:
                pytest.fail(f"the guest never showed the NIC: {last}")
        ping = in_ns(netns, "/bin/busybox", "ping", "-c", "2", "-W", "10", "10.77.0.2", check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        shown = subprocess.run([*cli, "exec", cid, "cat", "/sys/class/net/eth0/address"], capture_output=True,
                               text=True, timeout=TIMEOUT)
        assert shown.stdout.strip() == MAC, shown.stderr
    finally:
        qemu.release()
        subprocess.run([*cli, "delete", "--force", cid], capture_output=True, timeout=TIMEOUT)
    assert leftovers(cid) == []
    # QEMU opened the tap; the tap (made by the test) stays in the namespace, which the fixture removes.


@pytest.fixture
def peer_netns() -> Iterator[str]:
    name = f"kp-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_the_namespace_is_mirrored_into_the_vm_at_start(tmp_path: Path, netns: str, peer_netns: str,
                                                        cid: str) -> None:
    """A veth in the container's namespace (its peer in another, as a bridge would be): at start the
    VM gets an interface with its MAC, addresses and routes, traffic flows both ways through the tc
    mirroring, and delete leaves the namespace as it found it."""
    in_ns(netns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "kpeer")
    in_ns(netns, "ip", "link", "set", "kpeer", "netns", f"/run/netns/{peer_netns}")
    in_ns(netns, "ip", "addr", "add", "10.88.0.2/24", "dev", "eth0")
    in_ns(netns, "ip", "link", "set", "eth0", "up")
    in_ns(netns, "ip", "route", "add", "default", "via", "10.88.0.1")
    in_ns(peer_netns, "ip", "addr", "add", "10.88.0.1/24", "dev", "kpeer")
    in_ns(peer_netns, "ip", "link", "set", "kpeer", "up")
    mac = in_ns(netns, "ip", "-o", "link", "show", "eth0").stdout.split("link/ether ")[1].split()[0]

    bundle = make_busybox_bundle(tmp_path / "b", ["sleep", "1000"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    spec["linux"]["namespaces"].append({"type": "network", "path": f"/run/netns/{netns}"})
    (bundle / "config.json").write_text(json.dumps(spec))
    cli = [runtime_bin(), "--root", str(tmp_path / "root")]
    with open(tmp_path / "out", "wb") as out:
        subprocess.run([*cli, "create", "--bundle", str(bundle), cid], check=True, stdout=out, stderr=out,
                       stdin=subprocess.DEVNULL, timeout=TIMEOUT)
    try:
        started = subprocess.run([*cli, "start", cid], capture_output=True, text=True, timeout=TIMEOUT)
        assert started.returncode == 0, started.stderr
        probe = "cat /sys/class/net/eth0/address; ip -4 addr show eth0; ip route"
        inside = subprocess.run([*cli, "exec", cid, "sh", "-c", probe], capture_output=True, text=True,
                                timeout=TIMEOUT)
        assert inside.stdout.startswith(mac), inside.stdout + inside.stderr
        assert "10.88.0.2/24" in inside.stdout and "default via 10.88.0.1" in inside.stdout
        ping = in_ns(peer_netns, "/bin/busybox", "ping", "-c", "2", "-W", "10", "10.88.0.2", check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        out_ping = subprocess.run([*cli, "exec", cid, "ping", "-c", "2", "-W", "10", "10.88.0.1"],
                                  capture_output=True, text=True, timeout=TIMEOUT)
        assert out_ping.returncode == 0, out_ping.stdout + out_ping.stderr
    finally:
        subprocess.run([*cli, "delete", "--force", cid], capture_output=True, timeout=TIMEOUT)
    assert leftovers(cid) == []
    links = in_ns(netns, "ip", "-o", "link").stdout
    assert "tap0_kata" not in links and "eth0" in links
    assert in_ns(netns, "tc", "qdisc", "show", "dev", "eth0", "ingress").stdout.strip() == ""
